import pytest
import torch

from server.kernels.state_pool import PoolFullError, StatePool
from server.model import ModelConfig, State

LSTM = ModelConfig(cell="lstm", layers=2, hidden=6, embed=3)
RNN = ModelConfig(cell="rnn", layers=3, hidden=5, embed=3)


def random_state(cfg: ModelConfig, n: int = 1) -> State:
    h = torch.randn(cfg.layers, n, cfg.hidden)
    return State(h, torch.randn_like(h) if cfg.cell == "lstm" else None)


def assert_state_equal(a: State, b: State) -> None:
    assert torch.equal(a.h, b.h)
    assert (a.c is None and b.c is None) or torch.equal(a.c, b.c)


@pytest.mark.parametrize("cfg", [LSTM, RNN], ids=["lstm", "rnn"])
def test_layout_and_sizes(cfg):
    pool = StatePool(cfg, "cpu", initial_slots=4, max_slots=16)
    assert pool.h.shape == (2, cfg.layers, 5, cfg.hidden) and pool.h.dtype == torch.float32
    assert (pool.c is None) == (cfg.cell == "rnn")
    assert pool.capacity == 4 and pool.in_use == 0 and pool.max_slots == 16 and pool.pad_slot == 0
    assert pool.state_bytes_per_slot == cfg.layers * cfg.hidden * 4 * (2 if cfg.cell == "lstm" else 1)


def test_allocate_free_reuses_lowest_slot_and_never_the_pad_slot():
    pool = StatePool(LSTM, "cpu", 4, 4)
    slots = [pool.allocate() for _ in range(4)]
    assert slots == [1, 2, 3, 4] and pool.in_use == 4
    pool.free(3)
    pool.free(2)
    assert pool.in_use == 2 and not pool.is_allocated(2)
    assert pool.allocate() == 2
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(3)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(pool.pad_slot)


def test_a_new_slot_holds_the_zero_state_even_after_reuse():
    pool = StatePool(LSTM, "cpu", 2, 2)
    slot = pool.allocate()
    pool.write(slot, random_state(LSTM))
    pool.parity[slot] = 1
    pool.free(slot)
    assert pool.allocate() == slot
    state = pool.read(slot)
    assert not state.h.any() and not state.c.any() and not pool.h[:, :, slot].any()


def test_grows_by_doubling_keeps_states_then_refuses():
    pool = StatePool(LSTM, "cpu", 2, 5)
    states = {}
    for _ in range(2):
        slot = pool.allocate()
        states[slot] = random_state(LSTM)
        pool.write(slot, states[slot])
    pool.parity[2] = 1  # a state living in the second h buffer must survive growth too
    pool.write(2, states[2])
    assert pool.generation == 0
    assert pool.allocate() == 3 and pool.capacity == 4 and pool.generation == 1
    pool.allocate()
    assert pool.allocate() == 5 and pool.capacity == 5 and pool.generation == 2  # capped at max_slots
    for slot, state in states.items():
        assert_state_equal(pool.read(slot), state)
    with pytest.raises(PoolFullError, match="all 5 state slots are in use"):
        pool.allocate()


@pytest.mark.parametrize("cfg", [LSTM, RNN], ids=["lstm", "rnn"])
def test_fork_reset_and_read_follow_parity(cfg):
    pool = StatePool(cfg, "cpu", 4, 4)
    slot = pool.allocate()
    state = random_state(cfg)
    pool.parity[slot] = 1
    pool.write(slot, state)
    assert torch.equal(pool.h[1, :, slot], state.h[:, 0]) and not pool.h[0, :, slot].any()
    child = pool.fork(slot)
    assert child != slot and pool.in_use == 2
    assert_state_equal(pool.read(child), state)
    pool.reset(slot)
    assert not pool.read(slot).h.any() and pool.parity[slot] == 0
    assert_state_equal(pool.read(child), state)  # the fork is a copy
    both = pool.read([child, slot])
    assert both.h.shape == (cfg.layers, 2, cfg.hidden)


@pytest.mark.parametrize("cfg", [LSTM, RNN], ids=["lstm", "rnn"])
def test_top_h_reads_the_buffer_that_holds_each_slots_state(cfg):
    """What classification heads read: a fused kernel leaves a slot's state in either buffer."""
    pool = StatePool(cfg, "cpu", 4, 4)
    flipped, straight = pool.allocate(), pool.allocate()
    states = {flipped: random_state(cfg), straight: random_state(cfg)}
    pool.parity[flipped] = 1
    for slot, state in states.items():
        pool.write(slot, state)
    pool.h[0, :, flipped] = 99.0  # the stale buffer: never read
    top = pool.top_h(torch.tensor([straight, flipped]))
    assert torch.equal(top, torch.stack([states[straight].h[-1, 0], states[flipped].h[-1, 0]]))


@pytest.mark.parametrize("cfg", [LSTM, RNN], ids=["lstm", "rnn"])
def test_export_import_round_trip(cfg):
    pool = StatePool(cfg, "cpu", 2, 4)
    slot = pool.allocate()
    state = random_state(cfg)
    pool.parity[slot] = 1
    pool.write(slot, state)
    blob = pool.export(slot)
    assert isinstance(blob, bytes) and len(blob) == 16 + pool.state_bytes_per_slot
    other = StatePool(cfg, "cpu", 1, 1)
    new = other.import_(blob)
    assert_state_equal(other.read(new), state)
    assert other.export(new) == blob


def test_import_rejects_blobs_that_do_not_fit():
    pool = StatePool(LSTM, "cpu", 2, 2)
    blob = pool.export(pool.allocate())
    with pytest.raises(ValueError, match="too short"):
        pool.import_(blob[:7])
    with pytest.raises(ValueError, match="magic"):
        pool.import_(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="payload is"):
        pool.import_(blob[:-4])
    for cfg in (RNN, LSTM.model_copy(update={"hidden": 7}), LSTM.model_copy(update={"layers": 1})):
        foreign = StatePool(cfg, "cpu", 1, 1)
        with pytest.raises(ValueError, match="this model has cell=lstm layers=2 hidden=6"):
            pool.import_(foreign.export(foreign.allocate()))
    nan = bytearray(blob)
    nan[16:20] = bytes.fromhex("0000c07f")
    with pytest.raises(ValueError, match="non-finite"):
        pool.import_(bytes(nan))
    assert pool.in_use == 1  # nothing was allocated by a failed import


def test_import_into_a_full_pool_raises_pool_full():
    pool = StatePool(LSTM, "cpu", 1, 1)
    blob = pool.export(pool.allocate())
    with pytest.raises(PoolFullError):
        pool.import_(blob)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        StatePool(LSTM, "cpu", 0, 4)
    with pytest.raises(ValueError):
        StatePool(LSTM, "cpu", 8, 4)
