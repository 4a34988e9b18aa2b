"""Generation without the server: the model's reference step, token by token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from server import checkpoint, tokenizer
from server.sampling import SamplingParams, sample_one


@torch.no_grad()
def generate_text(
    path: Path, prompt: str, max_tokens: int, params: SamplingParams, seed: int
) -> Iterator[str]:
    """Absorb <bos> and the prompt, then yield text pieces (whole characters) as tokens are sampled."""
    model = checkpoint.load(path).model
    state = model.initial_state(1)
    logits = None
    for token in [tokenizer.BOS, *tokenizer.encode(prompt)]:
        logits, state = model.step(torch.tensor([token]), state)
    position = 1 + len(tokenizer.encode(prompt))
    decoder = tokenizer.IncrementalDecoder()
    for _ in range(max_tokens):
        token = sample_one(logits[0], seed, position, params)
        if token == tokenizer.EOS:
            break
        logits, state = model.step(torch.tensor([token]), state)
        position += 1
        yield decoder.push(token)
    yield decoder.flush()
