"""`lstm-serve train --task classify`: a many-to-one head on a recurrent model's final state.

Each example is read like a served session reads text (<bos>, then its bytes); the head sees
the top layer's h after the last token. Backpropagation runs through each example's last
`bptt` tokens; a longer example's earlier tokens only set the state the tail starts from
(truncated BPTT, as the course notes describe). Starting from a language model (`--init`),
its encoder is frozen unless `--fine-tune`; its LM head is kept, so the model still
generates. Class weights (inverse frequency) balance imbalanced data. After each epoch:
held-out accuracy, macro-F1 and the confusion matrix, logged to models/NAME.train/log.jsonl
and plotted; the best epoch by macro-F1 goes to `--out`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.nn.utils.rnn import pack_sequence

from server import checkpoint
from server.checkpoint import TrainingSummary
from server.classifier import HEAD_NAME, HeadSpec
from server.device import pick_device
from server.model import Cell, ModelConfig, RecurrentLM
from server.training.labelled import Dataset, Example, load_dataset
from server.training.log import RunLog

log = logging.getLogger(__name__)


class ClassifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Path
    eval_data: Path | None = None
    out: Path
    init: Path | None = None  # a language model to start from
    fine_tune: bool = False  # train the encoder too (always, without --init)
    head: str = Field("label", pattern=HEAD_NAME)
    head_hidden: int | None = Field(None, ge=1)  # None: a linear head
    cell: Cell = "lstm"  # shape of a model trained from scratch
    layers: int = Field(1, ge=1)
    hidden: int = Field(256, ge=1)
    embed: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    epochs: int = Field(10, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    bptt: int = Field(256, ge=1)
    seed: int = 1337
    device: str = "auto"


class ClassifyResult(BaseModel):
    epochs: int
    accuracy: float
    macro_f1: float
    confusion: list[list[int]]  # [true label][predicted label]
    wall_seconds: float


def build_model(cfg: ClassifyConfig, labels: tuple[str, ...]) -> tuple[RecurrentLM, TrainingSummary | None]:
    """A model with one head `cfg.head` over `labels`: the --init LM's weights (and its training
    summary, which the new checkpoint keeps), or new ones."""
    spec = HeadSpec(name=cfg.head, labels=labels, hidden=cfg.head_hidden)
    if cfg.init is None:
        config = ModelConfig(
            cell=cfg.cell, layers=cfg.layers, hidden=cfg.hidden, embed=cfg.embed, heads=(spec,)
        )
        return RecurrentLM(config), None
    base = checkpoint.load(cfg.init)
    if any(h.name == cfg.head for h in base.meta.model.heads):
        raise ValueError(f"{cfg.init} already has a head named {cfg.head!r}; choose another --head")
    config = base.meta.model.model_copy(update={"heads": (*base.meta.model.heads, spec)})
    model = RecurrentLM(config)
    missing, _ = model.load_state_dict(base.model.state_dict(), strict=False)
    assert all(name.startswith(f"heads.{cfg.head}.") for name in missing), missing
    if not cfg.fine_tune:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(f"heads.{cfg.head}.")
    return model, base.meta.training


def final_hidden(model: RecurrentLM, sequences: list[list[int]], bptt: int) -> Tensor:
    """The top layer's h after each sequence's last token [B, H]; gradients flow through the
    last `bptt` tokens of each (truncated BPTT)."""
    device = model.head.weight.device
    state = model.initial_state(len(sequences), device)
    h, c = state.h.clone(), None if state.c is None else state.c.clone()
    long = [i for i, s in enumerate(sequences) if len(s) > bptt]
    if long:  # the state each long example's tail starts from, without gradients
        with torch.no_grad():
            _, (ph, pc) = run_packed(model, [sequences[i][:-bptt] for i in long], None)
        h[:, long] = ph
        if c is not None:
            c[:, long] = pc
    _, (h, _) = run_packed(model, [s[-bptt:] for s in sequences], (h, c))
    return h[-1]


def run_packed(model: RecurrentLM, sequences: list[list[int]], state: tuple[Tensor, Tensor | None] | None):
    """The recurrent layers over variable-length sequences; (h_n, c_n), each [layers, B, H]."""
    device = model.head.weight.device
    packed = pack_sequence(
        [model.embedding(torch.tensor(s, device=device)) for s in sequences], enforce_sorted=False
    )
    if model.config.cell == "lstm":
        return model.rnn(packed, state)
    out, h = model.rnn(packed, None if state is None else state[0])
    return out, (h, None)


def class_weights(dataset: Dataset) -> Tensor:
    """Inverse frequency in the training split, normalised to a mean of 1."""
    counts = torch.tensor(dataset.counts("train"), dtype=torch.float32)
    return counts.sum() / (len(counts) * counts)


@torch.no_grad()
def evaluate(
    model: RecurrentLM, head: str, examples: list[Example], labels: int, cfg: ClassifyConfig
) -> dict:
    """Accuracy, macro-F1 and the confusion matrix [true][predicted] on `examples`."""
    model.eval()
    confusion = torch.zeros(labels, labels, dtype=torch.long)
    for start in range(0, len(examples), cfg.batch_size):
        batch = examples[start : start + cfg.batch_size]
        predicted = model.heads[head](final_hidden(model, [e.tokens for e in batch], cfg.bptt)).argmax(-1)
        for example, guess in zip(batch, predicted.tolist()):
            confusion[example.label, guess] += 1
    model.train()
    return scores(confusion)


def scores(confusion: Tensor) -> dict:
    """Accuracy, macro-F1 and the matrix itself, from a confusion matrix [true][predicted]."""
    tp = confusion.diag().float()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp)
    )
    return {
        "accuracy": (tp.sum() / confusion.sum()).item(),
        "macro_f1": f1.mean().item(),
        "confusion": confusion.tolist(),
    }


def train_classifier(cfg: ClassifyConfig) -> ClassifyResult:
    """Train, evaluate after every epoch, keep the best epoch's checkpoint at cfg.out."""
    torch.manual_seed(cfg.seed)
    dataset = load_dataset(cfg.data, cfg.eval_data)
    device = pick_device(cfg.device)
    model, lm_summary = build_model(cfg, dataset.labels)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    weights = class_weights(dataset).to(device)
    run = RunLog(cfg.out.with_suffix(".train"))
    order = torch.Generator().manual_seed(cfg.seed)
    start, best = time.monotonic(), None
    log.info(
        "classify: %d training and %d held-out examples, labels %s (train counts %s)",
        len(dataset.train),
        len(dataset.heldout),
        list(dataset.labels),
        dataset.counts("train"),
    )
    for epoch in range(1, cfg.epochs + 1):
        shuffled = [dataset.train[i] for i in torch.randperm(len(dataset.train), generator=order).tolist()]
        total = 0.0
        for first in range(0, len(shuffled), cfg.batch_size):
            batch = shuffled[first : first + cfg.batch_size]
            logits = model.heads[cfg.head](final_hidden(model, [e.tokens for e in batch], cfg.bptt))
            target = torch.tensor([e.label for e in batch], device=device)
            loss = F.cross_entropy(logits, target, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(batch)
        scores = evaluate(model, cfg.head, dataset.heldout, len(dataset.labels), cfg)
        elapsed = time.monotonic() - start
        run.write(event="classify_eval", epoch=epoch, loss=total / len(shuffled), seconds=elapsed, **scores)
        log.info(
            "epoch %d: loss %.4f, held-out accuracy %.3f, macro-F1 %.3f",
            epoch,
            total / len(shuffled),
            scores["accuracy"],
            scores["macro_f1"],
        )
        if best is None or scores["macro_f1"] > best.macro_f1:
            best = ClassifyResult(epochs=epoch, wall_seconds=elapsed, **scores)
            checkpoint.save(cfg.out, model.cpu(), lm_summary)
            model.to(device)
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            break
    plot(run, cfg.out.with_suffix(".train") / "classify.png")
    return best


def plot(run: RunLog, path: Path) -> None:
    """Held-out accuracy and macro-F1, and the training loss, by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in run.records if r.get("event") == "classify_eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    epochs = [r["epoch"] for r in evals]
    left.plot(epochs, [r["loss"] for r in evals], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (weighted cross-entropy)")
    right.plot(epochs, [r["accuracy"] for r in evals], marker="o", label="accuracy")
    right.plot(epochs, [r["macro_f1"] for r in evals], marker="o", label="macro-F1")
    right.set(xlabel="epoch", ylabel="held-out", ylim=(0, 1))
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
