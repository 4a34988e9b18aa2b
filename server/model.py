"""The recurrent language model: embedding -> N recurrent layers -> linear head.

Two cells, from the course notes on RNNs:
    rnn  (Elman): h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    lstm:         [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh   (PyTorch's gate order)
                  c_t = σ(f)·c_{t-1} + σ(i)·tanh(g);  h_t = σ(o)·tanh(c_t)
The weights are torch.nn.LSTM / torch.nn.RNN's own (`weight_ih_l{k}`, ...), so training
uses the fused torch modules and every serving backend reads the very same tensors.
`forward` runs whole sequences (training); `step` advances one token with plain torch
ops and is the reference that every faster backend is tested against.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from server.classifier import ClassifierHead, HeadSpec
from server.tokenizer import VOCAB_SIZE

Cell = Literal["lstm", "rnn"]


class ModelConfig(BaseModel):
    """Shape of a model; stored inside every checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cell: Cell = "lstm"
    vocab_size: int = Field(VOCAB_SIZE, ge=2)
    embed: int = Field(128, ge=1)
    hidden: int = Field(512, ge=1)
    layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    heads: tuple[HeadSpec, ...] = ()  # classification heads on the top layer's h (server/classifier.py)

    @field_validator("heads")
    @classmethod
    def _named_once(cls, heads: tuple[HeadSpec, ...]) -> tuple[HeadSpec, ...]:
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"head names must be distinct, got {names}")
        return heads

    @property
    def gates(self) -> int:
        """Rows of each W_ih / W_hh: 4 for the LSTM (i, f, g, o), 1 for the Elman RNN."""
        return 4 if self.cell == "lstm" else 1


class State(NamedTuple):
    """Recurrent state of a batch: h and c are [layers, batch, hidden]; c is None for the RNN."""

    h: Tensor
    c: Tensor | None


class RecurrentLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed)
        rnn_type = nn.LSTM if config.cell == "lstm" else nn.RNN
        self.rnn = rnn_type(
            config.embed,
            config.hidden,
            num_layers=config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden, config.vocab_size)
        if config.heads:  # absent otherwise: a language model's tensors are exactly what they were
            self.heads = nn.ModuleDict({s.name: ClassifierHead(s, config.hidden) for s in config.heads})

    def classify(self, h_top: Tensor) -> dict[str, Tensor]:
        """The top layer's h [B, H] -> each head's label probabilities [B, labels]."""
        return {name: head.probabilities(h_top) for name, head in getattr(self, "heads", {}).items()}

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> State:
        """All-zero state for `batch` rows, in the weights' dtype."""
        cfg, p = self.config, self.head.weight
        zeros = torch.zeros(cfg.layers, batch, cfg.hidden, dtype=p.dtype, device=device or p.device)
        return State(zeros, zeros.clone() if cfg.cell == "lstm" else None)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens [B, T] -> logits [B, T, V] and the state after the last token."""
        x = self.embedding(tokens)  # [B, T, E]
        if state is None:
            state = self.initial_state(tokens.shape[0], tokens.device)
        hx = (state.h, state.c) if self.config.cell == "lstm" else state.h
        out, hx = self.rnn(x, hx)  # out [B, T, H]
        new_state = State(*hx) if self.config.cell == "lstm" else State(hx, None)
        return self.head(out), new_state

    def layer_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_ih [G*H, in], W_hh [G*H, H], b_ih [G*H], b_hh [G*H]) of one layer."""
        return tuple(
            getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        )

    @torch.no_grad()
    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """One token per row, plain torch: tokens [B] -> logits [B, V] and the next state."""
        x = self.embedding(tokens)  # [B, E]
        hs, cs = [], []
        for layer in range(self.config.layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(layer)
            gates = x @ w_ih.T + b_ih + state.h[layer] @ w_hh.T + b_hh  # [B, G*H]
            if self.config.cell == "lstm":
                h, c = lstm_cell(gates, state.c[layer])
                cs.append(c)
            else:
                h = torch.tanh(gates)
            hs.append(h)
            x = h
        new_c = torch.stack(cs) if cs else None
        return self.head(x), State(torch.stack(hs), new_c)


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """gates [B, 4H] (i, f, g, o pre-activations), c [B, H] -> (h, c) after one step."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token loss in nats: logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
