"""Classification heads: many-to-one answers read off a recurrent model's state.

The course notes' third shape of RNN reads a whole sequence and answers once, from the final
hidden state (their example: the sentiment of a review). A checkpoint may carry such heads
beside its language-model head; each maps the top layer's h after the last token absorbed
to one score per label:
    linear   logits = W h + b                                  (hidden = None)
    mlp      logits = W2 tanh(W1 h + b1) + b2, W1: [hidden, H]  (hidden = N)
so a session can be classified at any moment of a stream, for the cost of a small matrix
product on a state that is already there, without moving the session.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

HEAD_NAME = r"^[a-z][a-z0-9_]{0,31}$"  # also the tensors' name prefix: heads.NAME.*


class HeadSpec(BaseModel):
    """One head's shape and labels; stored in the checkpoint's model config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=HEAD_NAME)
    labels: tuple[str, ...] = Field(min_length=2)
    hidden: int | None = Field(None, ge=1)  # None: a linear head; N: an MLP with N tanh units

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(labels)) != len(labels) or not all(labels):
            raise ValueError("labels must be distinct, non-empty names")
        return labels


class ClassifierHead(nn.Module):
    """h [B, H] -> logits [B, labels]."""

    def __init__(self, spec: HeadSpec, hidden: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.hidden is None:
            self.layers = nn.Sequential(nn.Linear(hidden, len(spec.labels)))
        else:
            self.layers = nn.Sequential(
                nn.Linear(hidden, spec.hidden), nn.Tanh(), nn.Linear(spec.hidden, len(spec.labels))
            )

    def forward(self, h: Tensor) -> Tensor:
        return self.layers(h)

    @torch.no_grad()
    def probabilities(self, h: Tensor) -> Tensor:
        """h [B, H] -> label probabilities [B, labels], in float32."""
        return torch.softmax(self(h.to(self.layers[0].weight.dtype)).float(), dim=-1)
