import pytest
import torch

from server.model import ModelConfig, RecurrentLM, State

SHAPES = [  # (cell, layers, hidden, embed)
    ("lstm", 1, 8, 5),
    ("lstm", 3, 13, 7),
    ("rnn", 1, 9, 4),
    ("rnn", 2, 17, 6),
]


def make_model(cell, layers, hidden, embed, seed=0) -> RecurrentLM:
    torch.manual_seed(seed)
    return RecurrentLM(ModelConfig(cell=cell, layers=layers, hidden=hidden, embed=embed)).double().eval()


@pytest.mark.parametrize("cell,layers,hidden,embed", SHAPES)
def test_step_by_step_equals_sequence_forward(cell, layers, hidden, embed):
    model = make_model(cell, layers, hidden, embed)
    batch, steps = 3, 11
    tokens = torch.randint(0, model.config.vocab_size, (batch, steps))
    with torch.no_grad():
        seq_logits, seq_state = model(tokens)
    state = model.initial_state(batch)
    for t in range(steps):
        logits, state = model.step(tokens[:, t], state)
        torch.testing.assert_close(logits, seq_logits[:, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.h, seq_state.h, rtol=1e-10, atol=1e-10)
    if cell == "lstm":
        torch.testing.assert_close(state.c, seq_state.c, rtol=1e-10, atol=1e-10)
    else:
        assert state.c is None and seq_state.c is None


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_forward_continues_from_a_given_state(cell):
    model = make_model(cell, 2, 10, 4)
    tokens = torch.randint(0, 258, (2, 12))
    with torch.no_grad():
        whole, _ = model(tokens)
        _, mid = model(tokens[:, :5])
        rest, _ = model(tokens[:, 5:], mid)
    torch.testing.assert_close(rest, whole[:, 5:], rtol=1e-10, atol=1e-10)


def test_lstm_step_follows_the_gate_equations():
    """The course-notes equations, written out gate by gate (PyTorch order i, f, g, o)."""
    model = make_model("lstm", 1, 6, 3)
    token = torch.tensor([42])
    h0, c0 = torch.randn(1, 1, 6, dtype=torch.float64), torch.randn(1, 1, 6, dtype=torch.float64)
    w_ih, w_hh, b_ih, b_hh = model.layer_weights(0)
    x = model.embedding(token)[0]
    W = torch.cat([w_hh, w_ih], dim=1)  # acts on [h_{t-1}, x_t]
    z = W @ torch.cat([h0[0, 0], x]) + b_ih + b_hh
    i, f, g, o = (z[k * 6 : (k + 1) * 6] for k in range(4))
    c = torch.sigmoid(f) * c0[0, 0] + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    _, state = model.step(token, State(h0, c0))
    torch.testing.assert_close(state.h[0, 0], h.detach())
    torch.testing.assert_close(state.c[0, 0], c.detach())


def test_config_refuses_unknown_cells_and_fields():
    with pytest.raises(ValueError):
        ModelConfig(cell="gru")
    with pytest.raises(ValueError):
        ModelConfig(hiden=3)
