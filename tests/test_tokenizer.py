import pytest

from server import tokenizer
from server.tokenizer import BOS, EOS, IncrementalDecoder

TEXTS = ["hello, world", "def f(x):\n    return x\n", "机器学习很有趣", "emoji 🦀🚀 and é", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text):
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", ["机器学习很有趣", "a🦀b🚀", "Grüße"])
def test_incremental_decoder_emits_whole_characters_only(text):
    decoder = IncrementalDecoder()
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) + decoder.flush() == text
    assert all(p == "" or p in text for p in pieces)  # never a fragment or a replacement char
    assert [p for p in pieces if p] == list(text)  # each character arrives once, whole


def test_pending_while_a_character_is_incomplete():
    decoder = IncrementalDecoder()
    first, *rest = "机".encode()
    assert decoder.push(first) == "" and decoder.pending
    assert "".join(decoder.push(b) for b in rest) == "机" and not decoder.pending


def test_invalid_bytes_are_replaced_deterministically():
    ids = [0x61, 0xFF, 0x62, 0xE6, 0x9C, 0x63]  # a, invalid, b, truncated 3-byte char, c
    expected = "a\ufffdb\ufffdc"
    assert tokenizer.decode(ids) == expected
    decoder = IncrementalDecoder()
    assert "".join(decoder.push(t) for t in ids) + decoder.flush() == expected


def test_specials_emit_nothing_and_flush_incomplete_characters():
    assert tokenizer.decode([BOS, 0x68, 0x69, EOS]) == "hi"
    decoder = IncrementalDecoder()
    assert decoder.push(0xE6) == ""
    assert decoder.push(EOS) == "\ufffd"
    assert decoder.push(0x61) == "a"


@pytest.mark.parametrize("bad", [-1, tokenizer.VOCAB_SIZE, 10**9])
def test_out_of_range_ids_are_refused(bad):
    with pytest.raises(ValueError, match="out of range"):
        IncrementalDecoder().push(bad)


def test_special_ids_are_documented_values():
    assert (BOS, EOS, tokenizer.VOCAB_SIZE) == (256, 257, 258)
