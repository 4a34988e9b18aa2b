"""The training job: truncated backpropagation through time on stateful batches.

Each of the B batch rows is one contiguous stretch of the corpus; step s trains on chunk s
of every row, starting from the state the previous chunk ended in (detached, so gradients
flow through seq_len steps only). AdamW, linear warmup then cosine decay, gradient
clipping, bf16 autocast on CUDA and on CPUs with native bf16 (precision.py; evaluation on
the CPU stays fp32, as served). The best checkpoint by held-out loss goes to `out`; the
resumable state (last weights, optimizer, carried state, RNG) to `out`'s `.train/` folder.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from server import checkpoint
from server.device import pick_device
from server.model import ModelConfig, RecurrentLM, State, cross_entropy
from server.training.config import TrainConfig
from server.training.corpus import Corpus, CorpusError, load_corpus
from server.training.log import RunLog, write_prom_file
from server.training.precision import autocast, resolve_autocast
from server.training.state import RunState, load_run_state, save_run_state

CALIBRATION_STEPS = 20  # steps timed before a --max-minutes run chooses its horizon
LOG_INTERVAL = 10  # steps between "train" lines in log.jsonl (the plot's train curve)
LN2 = math.log(2)


class StreamBatches:
    """The token stream laid out as `rows` contiguous rows, read chunk by chunk."""

    def __init__(self, stream: torch.Tensor, rows: int, seq_len: int, split: str) -> None:
        row_len = len(stream) // rows
        if row_len < seq_len + 1:
            raise CorpusError(
                f"the {split} split has {len(stream)} tokens, too few for {rows} rows of "
                f"seq_len + 1 = {seq_len + 1}: use a larger corpus or lower --batch-size / --seq-len"
            )
        self.rows = stream[: rows * row_len].view(rows, row_len)  # int16 [rows, row_len]
        self.seq_len = seq_len
        self.chunks_per_epoch = (row_len - 1) // seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets of chunk `step` (wrapping per epoch): int64 [rows, seq_len]."""
        start = (step % self.chunks_per_epoch) * self.seq_len
        chunk = self.rows[:, start : start + self.seq_len + 1].long()
        return chunk[:, :-1], chunk[:, 1:]


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    heldout_bits_per_byte: float  # of the best checkpoint
    finished: bool  # False when stopped early (--stop-after-steps, Ctrl-C); --resume continues


def learning_rate(cfg: TrainConfig, step: int, horizon: int | None) -> float:
    """Linear warmup to cfg.lr, then cosine decay to min_lr_ratio * lr at the horizon."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if horizon is None:  # calibrating a --max-minutes run: still at the peak
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: RecurrentLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def detach(state: State) -> State:
    """The carry without its graph, in fp32 (autocast may return it in bf16: the cast back is exact)."""
    return State(
        state.h.detach().to(torch.float32), None if state.c is None else state.c.detach().to(torch.float32)
    )


def train_step(model, optimizer, x, y, carry: State, cfg: TrainConfig, device) -> tuple[float, State]:
    """One chunk of truncated BPTT; returns the loss in nats and the detached carry.

    cfg.autocast is the resolved precision ("bf16" or "off"), see resolve_autocast.
    """
    with autocast(device, cfg.autocast):
        logits, carry = model(x, carry)  # [B, T, V]
    loss = cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.item(), detach(carry)


@torch.no_grad()
def evaluate(model: RecurrentLM, stream: torch.Tensor, cfg: TrainConfig, device: torch.device) -> float:
    """Held-out bits per byte over the first cfg.eval_tokens tokens, state carried across chunks."""
    n = min(len(stream), cfg.eval_tokens + 1)
    rows = max(1, min(cfg.batch_size, (n - 1) // cfg.seq_len))
    row_len = (n - 1) // rows
    if row_len < 1:
        raise CorpusError(
            f"the held-out split has {len(stream)} tokens: too few to evaluate; use a larger corpus"
        )
    data = stream[: rows * row_len + 1]
    inputs = data[:-1].view(rows, row_len).long().to(device)
    targets = data[1:].view(rows, row_len).long().to(device)
    model.eval()
    state, total = model.initial_state(rows, device), 0.0
    precision = cfg.autocast if device.type == "cuda" else "off"  # the CPU serves in fp32: measure that
    for start in range(0, row_len, cfg.seq_len):
        x, y = inputs[:, start : start + cfg.seq_len], targets[:, start : start + cfg.seq_len]
        with autocast(device, precision):
            logits, state = model(x, state)
        total += cross_entropy(logits, y).item() * y.numel()
    model.train()
    return total / targets.numel() / LN2


def choose_horizon(
    cfg: TrainConfig, step: int, elapsed: float, seconds_per_step: float, seconds_per_eval: float
) -> int:
    """Steps that fit in cfg.max_minutes, counting the evaluations they bring."""
    remaining = cfg.max_minutes * 60 - elapsed - seconds_per_eval  # the final evaluation included
    per_step = seconds_per_step + seconds_per_eval / cfg.eval_interval
    return max(step + 1, step + int(remaining / per_step))


class StopFlag:
    """Ctrl-C ends the run after the current step, leaving a resumable state; a second one aborts."""

    def __init__(self) -> None:
        self.stop = False

    def __enter__(self) -> StopFlag:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training job described by `cfg`."""
    if cfg.resume:
        saved, run = load_run_state(cfg.run_dir)
        cfg = saved.model_copy(
            update={"stop_after_steps": cfg.stop_after_steps, "progress": cfg.progress, "resume": True}
        )
    device = pick_device(cfg.device)
    if cfg.resume and "autocast" not in saved.model_fields_set:  # saved before the setting existed
        cfg = cfg.model_copy(update={"autocast": "bf16" if device.type == "cuda" else "off"})
    cfg = cfg.model_copy(update={"autocast": resolve_autocast(cfg.autocast, device)})
    corpus = load_corpus(cfg.corpus)
    batches = StreamBatches(corpus.train, cfg.batch_size, cfg.seq_len, "training")
    torch.manual_seed(cfg.seed)
    model_config = ModelConfig(
        cell=cfg.cell, layers=cfg.layers, hidden=cfg.hidden, embed=cfg.embed, dropout=cfg.dropout
    )
    model = RecurrentLM(model_config).to(device).train()
    optimizer = make_optimizer(model, cfg)
    if cfg.resume:
        run.restore(model, optimizer, corpus.digest, device)
    else:
        run = RunState(horizon=cfg.max_steps, carry=model.initial_state(cfg.batch_size, device))
    log = RunLog(cfg.run_dir, resume_step=run.step if cfg.resume else None)
    if not cfg.resume:
        log.write(event="start", step=0, config=cfg.model_dump(mode="json"), corpus_digest=corpus.digest)
    with StopFlag() as stop:
        return Trainer(cfg, corpus, batches, model, optimizer, run, log, device).loop(stop)


class Trainer:
    """The loop of one run: steps, evaluations, checkpoints, progress."""

    def __init__(
        self, cfg, corpus: Corpus, batches, model, optimizer, run: RunState, log: RunLog, device
    ) -> None:
        self.cfg, self.corpus, self.batches, self.model, self.optimizer = (
            cfg,
            corpus,
            batches,
            model,
            optimizer,
        )
        self.run, self.log, self.device = run, log, device
        self.tokens_per_step = cfg.batch_size * cfg.seq_len
        self.started = time.perf_counter()
        self.elapsed_at_start = run.elapsed_seconds
        self.window_losses: list[float] = []
        self.evaluated_step = run.step
        self.eval_seconds = 0.0  # the last evaluation's duration: the final one must fit the budget

    def elapsed(self) -> float:
        return self.elapsed_at_start + time.perf_counter() - self.started

    def loop(self, stop: StopFlag) -> TrainResult:
        cfg, run = self.cfg, self.run
        bar = tqdm(
            total=run.horizon,
            initial=run.step,
            unit="step",
            disable=not cfg.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        calibration_start = None
        window_start, window_step = time.perf_counter(), run.step
        while run.horizon is None or run.step < run.horizon:
            if stop.stop or (cfg.stop_after_steps and run.step >= cfg.stop_after_steps):
                return self.stop_early(bar)
            if cfg.max_minutes and self.elapsed() + self.eval_seconds >= cfg.max_minutes * 60:
                bar.write(f"time budget of {cfg.max_minutes} min reached at step {run.step} of {run.horizon}")
                break
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, run.step, run.horizon)
            x, y = self.batches.batch(run.step)
            loss, run.carry = train_step(
                self.model, self.optimizer, x.to(self.device), y.to(self.device), run.carry, cfg, self.device
            )
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {run.step}: lower --lr")
            run.step += 1
            self.window_losses.append(loss)
            tokens_per_s = (
                self.tokens_per_step * (run.step - window_step) / (time.perf_counter() - window_start)
            )
            if run.step % LOG_INTERVAL == 0:
                recent = self.window_losses[-LOG_INTERVAL:]
                self.log.write(
                    event="train",
                    step=run.step,
                    tokens_seen=run.step * self.tokens_per_step,
                    bits_per_byte=sum(recent) / len(recent) / LN2,
                    tokens_per_second=tokens_per_s,
                )
            bar.set_postfix(
                loss=f"{loss:.3f}", bpb=f"{loss / LN2:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False
            )
            bar.update(1)
            if run.horizon is None and run.step == 2:
                calibration_start = time.perf_counter()  # the first steps pay one-off costs
            if run.horizon is None and run.step == CALIBRATION_STEPS:
                self.calibrate(bar, calibration_start)
            elif run.step % cfg.eval_interval == 0 or run.step == run.horizon:
                self.evaluate_and_save(tokens_per_s)
                window_start, window_step = time.perf_counter(), run.step
        if self.evaluated_step != run.step:  # stopped by the time budget between evaluations
            self.evaluate_and_save(
                self.tokens_per_step
                * (run.step - window_step)
                / max(1e-9, time.perf_counter() - window_start)
            )
        bar.close()
        return self.finish()

    def calibrate(self, bar: tqdm, calibration_start: float) -> None:
        """Choose the horizon of a --max-minutes run from the measured step and evaluation times."""
        run = self.run
        seconds_per_step = (time.perf_counter() - calibration_start) / (run.step - 2)
        eval_start = time.perf_counter()
        self.evaluate_and_save(self.tokens_per_step / seconds_per_step)
        seconds_per_eval = time.perf_counter() - eval_start
        run.horizon = choose_horizon(self.cfg, run.step, self.elapsed(), seconds_per_step, seconds_per_eval)
        bar.total = run.horizon
        bar.write(
            f"{seconds_per_step * 1e3:.0f} ms/step, {seconds_per_eval:.1f} s/eval: "
            f"{run.horizon} steps fit in {self.cfg.max_minutes} min"
        )
        self.log.write(
            event="horizon",
            step=run.step,
            horizon=run.horizon,
            seconds_per_step=seconds_per_step,
            seconds_per_eval=seconds_per_eval,
        )

    def evaluate_and_save(self, tokens_per_s: float) -> None:
        """Held-out loss; the best checkpoint so far goes to cfg.out; the resumable state is saved."""
        cfg, run = self.cfg, self.run
        started = time.perf_counter()
        heldout = evaluate(self.model, self.corpus.heldout, cfg, self.device)
        self.eval_seconds = time.perf_counter() - started
        train_bpb = sum(self.window_losses) / max(1, len(self.window_losses)) / LN2
        self.window_losses.clear()
        run.last_train_bpb, self.evaluated_step = train_bpb, run.step
        record = dict(
            event="eval",
            step=run.step,
            tokens_seen=run.step * self.tokens_per_step,
            lr=self.optimizer.param_groups[0]["lr"],
            train_bits_per_byte=train_bpb,
            heldout_bits_per_byte=heldout,
            tokens_per_second=tokens_per_s,
            elapsed_seconds=self.elapsed(),
        )
        self.log.write(**record)
        if heldout < run.best_heldout:
            run.best_heldout = heldout
            checkpoint.save(cfg.out, self.model, self.summary(heldout))
        self.save_state()
        self.log.plot()

    def summary(self, heldout: float) -> checkpoint.TrainingSummary:
        run = self.run
        return checkpoint.TrainingSummary(
            corpus=self.corpus.sources,
            corpus_digest=self.corpus.digest,
            corpus_bytes=self.corpus.total_bytes,
            steps=run.step,
            horizon_steps=run.horizon or run.step,
            tokens_seen=run.step * self.tokens_per_step,
            train_bits_per_byte=run.last_train_bpb,
            heldout_bits_per_byte=heldout,
            wall_seconds=self.elapsed(),
            seed=self.cfg.seed,
        )

    def save_state(self) -> None:
        self.run.elapsed_seconds = self.elapsed()
        save_run_state(self.cfg, self.run, self.model, self.optimizer, self.corpus.digest)

    def stop_early(self, bar: tqdm) -> TrainResult:
        self.save_state()
        bar.close()
        print(
            f"stopped at step {self.run.step}; continue with: lstm-serve train --out {self.cfg.out} --resume",
            file=sys.stderr,
        )
        return TrainResult(
            self.run.step, self.run.step * self.tokens_per_step, self.run.best_heldout, finished=False
        )

    def finish(self) -> TrainResult:
        run = self.run
        self.log.write(
            event="end",
            step=run.step,
            best_heldout_bits_per_byte=run.best_heldout,
            elapsed_seconds=self.elapsed(),
        )
        tokens = run.step * self.tokens_per_step
        write_prom_file(
            self.cfg.run_dir / "metrics.prom", self.cfg.out.stem, run.best_heldout, tokens, self.elapsed()
        )
        print(
            f"done: {run.step} steps, {run.step * self.tokens_per_step:,} tokens in {self.elapsed() / 60:.1f} min; "
            f"best held-out {run.best_heldout:.3f} bits/byte -> {self.cfg.out}",
            file=sys.stderr,
        )
        return TrainResult(run.step, run.step * self.tokens_per_step, run.best_heldout, finished=True)
