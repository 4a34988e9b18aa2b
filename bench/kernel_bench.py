"""Benchmark of one recurrent step: the Triton kernel against torch baselines.

    python bench/kernel_bench.py            # CUDA: the GPU table below; no CUDA: --cpu
    python bench/kernel_bench.py --cpu      # the torch backend on CPU, batched vs single steps
    python bench/kernel_bench.py --smoke    # tiny sizes on CPU, Triton under its interpreter

GPU: bf16 weights, 2 layers, H in {512, 1024}, B in {1, 8, 64, 256, 1024}. Each variant's
time per step is the median (and p90) of CUDA-event timings over --iters calls, with L2
flushed before each call. Variants: ours (the triton backend's CUDA graph for the bucket),
our torch backend (eager), two nn.LSTMCell (eager and graphed), nn.LSTM with seq_len 1
(cuDNN, eager and graphed); every variant embeds the tokens and applies the vocabulary head.
Bandwidth and FLOP rates are set against a device copy and a bf16 matmul measured in the
same run. Prints a table and the issue's targets, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from server.kernels import make_backend  # noqa: E402
from server.kernels.cuda_graphs import bucket  # noqa: E402
from server.kernels.state_pool import StatePool  # noqa: E402
from server.model import ModelConfig, RecurrentLM  # noqa: E402

Step = Callable[[], object]


# ---- what a step must move and compute -------------------------------------------------------


def step_bytes(cfg: ModelConfig, batch: int, weight_bytes: int) -> int:
    """Every weight once, plus per row: its table entry, the state in and out, its logits."""
    H, V, G, L = cfg.hidden, cfg.vocab_size, cfg.gates, cfg.layers
    weights = (G * H * H + (L - 1) * G * H * 2 * H + V * H) * weight_bytes
    state = L * H * 4 * 2 * (2 if cfg.cell == "lstm" else 1)
    return weights + batch * (G * H * 4 + state + V * 4)


def step_flops(cfg: ModelConfig, batch: int) -> int:
    H, V, G, L = cfg.hidden, cfg.vocab_size, cfg.gates, cfg.layers
    return 2 * batch * (G * H * H + (L - 1) * G * H * 2 * H + V * H)


# ---- timing -----------------------------------------------------------------------------------


def time_cuda(fn: Step, iters: int, flush: torch.Tensor) -> list[float]:
    """µs per call from CUDA events, L2 flushed before each call. The flush also lets the host
    queue work ahead, so launch-bound (eager) baselines come out faster than they are."""
    for _ in range(10):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_host(fn: Step, iters: int) -> list[float]:
    """µs per call from the wall clock (CPU)."""
    fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_us": statistics.median(ordered), "p90_us": ordered[int(0.9 * (len(ordered) - 1))]}


def l2_flush() -> torch.Tensor:
    """A buffer twice the size of the GPU's L2: zeroing it evicts what a step left there."""
    return torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size // 4 + 1, device="cuda")


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = statistics.median(time_cuda(lambda: dst.copy_(src), 20, torch.empty(1, device="cuda")))
    return 2 * src.numel() / t / 1e3


def matmul_rate() -> float:
    """TFLOP/s of an 8192³ bf16 matmul."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    t = statistics.median(time_cuda(lambda: a @ b, 20, torch.empty(1, device="cuda")))
    return 2 * 8192**3 / t / 1e6


# ---- the variants -----------------------------------------------------------------------------


def graphed(fn: Step) -> Step:
    """fn captured in a CUDA graph (its tensors are static)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class Baseline(nn.Module):
    """Embedding -> 2 nn.LSTMCell or a 2-layer cuDNN nn.LSTM (seq_len 1) -> head, on static tensors."""

    def __init__(self, cfg: ModelConfig, batch: int, kind: str, device: str, dtype: torch.dtype) -> None:
        super().__init__()
        E, H, L = cfg.embed, cfg.hidden, cfg.layers
        self.kind = kind
        self.embedding = nn.Embedding(cfg.vocab_size, E)
        if kind == "cells":
            self.cells = nn.ModuleList(nn.LSTMCell(E if i == 0 else H, H) for i in range(L))
        else:
            self.lstm = nn.LSTM(E, H, num_layers=L, batch_first=True)
        self.head = nn.Linear(H, cfg.vocab_size)
        self.to(device, dtype).eval()
        self.tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)
        self.h = torch.zeros(L, batch, H, device=device, dtype=dtype)
        self.c = torch.zeros_like(self.h)

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        x = self.embedding(self.tokens)
        if self.kind == "cells":
            for i, cell in enumerate(self.cells):
                h, c = cell(x, (self.h[i], self.c[i]))
                self.h[i].copy_(h)
                self.c[i].copy_(c)
                x = h
            return self.head(x)
        out, (h, c) = self.lstm(x[:, None], (self.h, self.c))
        self.h.copy_(h)
        self.c.copy_(c)
        return self.head(out[:, 0])


def scattered_batch(
    cfg: ModelConfig, batch: int, device: str
) -> tuple[StatePool, torch.Tensor, torch.Tensor]:
    """A full pool of max(batch, 2) sessions, and (seeded) tokens [B] and slots [B] scattered over it, on CPU."""
    torch.manual_seed(0)
    pool = StatePool(cfg, device, initial_slots=max(batch, 2), max_slots=max(batch, 2))
    taken = [pool.allocate() for _ in range(pool.capacity)]
    slots = torch.tensor(taken)[torch.randperm(len(taken))[:batch]]
    return pool, torch.randint(0, cfg.vocab_size, (batch,)), slots


def ours(cfg: ModelConfig, batch: int, backend: str, device: str, dtype: torch.dtype) -> tuple[Step, Step]:
    """(one step, the replay of its CUDA graph or None) of our backend over scattered pool slots."""
    pool, tokens, slots = scattered_batch(cfg, batch, device)
    be = make_backend(RecurrentLM(cfg), pool, backend, dtype)
    on_device = (tokens.to(device), slots.to(device))

    def step() -> object:
        return be.step(*on_device)

    step()  # captures the bucket's graph (triton on CUDA)
    graphs = getattr(be, "graphs", None)
    return step, graphs.graphs[bucket(batch)][0].replay if graphs else None


# ---- the three modes --------------------------------------------------------------------------


def gpu_bench(args: argparse.Namespace) -> dict:
    dtype, dev = torch.bfloat16, "cuda"
    flush = l2_flush()
    bandwidth, tflops = copy_bandwidth(), matmul_rate()
    from server.kernels.triton_step import default_plan  # not at the top: --smoke sets TRITON_INTERPRET first

    plan = [{"from_batch": size, **vars(config)} for size, config in default_plan("lstm", dtype)]
    print("ours: the default tile plan", *plan, sep="\n  ")
    rows = []
    for hidden in args.hidden:
        cfg = ModelConfig(cell="lstm", layers=2, hidden=hidden, embed=128)
        for batch in args.batch:
            variants: dict[str, Step | None] = {}
            variants["ours step()"], variants["ours"] = ours(cfg, batch, "triton", dev, dtype)
            variants["torch backend"], _ = ours(cfg, batch, "torch", dev, dtype)
            for kind, name in (("cells", "LSTMCell"), ("cudnn", "cuDNN LSTM")):
                model = Baseline(cfg, batch, kind, dev, dtype)
                variants[f"{name} eager"] = model
                try:
                    variants[f"{name} graphed"] = graphed(model)
                except RuntimeError as e:  # record it and go on
                    print(f"  {name} could not be graphed: {e}", file=sys.stderr)
            for name, fn in variants.items():
                if fn is None:
                    continue
                stats = summary(time_cuda(fn, args.iters, flush))
                t = stats["median_us"]
                gbs = step_bytes(cfg, batch, 2) / t / 1e3
                tf = step_flops(cfg, batch) / t / 1e6
                rows.append({"hidden": hidden, "batch": batch, "variant": name, **stats,
                             "tokens_per_s": batch / t * 1e6, "gb_per_s": gbs, "bw_frac": gbs / bandwidth,
                             "tflop_per_s": tf, "mm_frac": tf / tflops})  # fmt: skip
                print_row(rows[-1])
    return {"device": torch.cuda.get_device_name(), "copy_gb_per_s": bandwidth, "matmul_tflop_per_s": tflops,
            "tile_plan": plan, "rows": rows, "targets": targets(rows)}  # fmt: skip


def cpu_bench(args: argparse.Namespace) -> dict:
    """Our torch backend on CPU: a batched step vs B single steps."""
    rows = []
    for layers, hidden in ((1, 512), (2, 1024)):
        cfg = ModelConfig(cell="lstm", layers=layers, hidden=hidden, embed=128)
        single = None
        for batch in (1, 8, 64, 256):
            step, _ = ours(cfg, batch, "torch", "cpu", torch.float32)
            stats = summary(time_host(step, max(3, args.cpu_iters // batch)))
            single = single or stats["median_us"]
            rows.append({"layers": layers, "hidden": hidden, "batch": batch, **stats,
                         "tokens_per_s": batch / stats["median_us"] * 1e6,
                         "speedup_vs_single_steps": batch * single / stats["median_us"]})  # fmt: skip
            r = rows[-1]
            print(
                f"L={layers} H={hidden:5d} B={batch:4d}  {r['median_us']:10.0f} µs/step  p90 {r['p90_us']:10.0f}"
                f"  {r['tokens_per_s']:9.0f} tok/s  x{r['speedup_vs_single_steps']:.1f} vs {batch} single steps"
            )
    return {"device": cpu_name(), "threads": torch.get_num_threads(), "rows": rows}


def smoke(args: argparse.Namespace) -> dict:
    """Every variant at a tiny size on CPU (triton under the interpreter), wall-clock timed."""
    cfg, rows = ModelConfig(cell="lstm", layers=2, hidden=24, embed=8), []
    for batch in (1, 4):
        variants = {"ours": ours(cfg, batch, "triton", "cpu", torch.bfloat16)[0],
                    "torch backend": ours(cfg, batch, "torch", "cpu", torch.bfloat16)[0],
                    "LSTMCell eager": Baseline(cfg, batch, "cells", "cpu", torch.bfloat16),
                    "cuDNN LSTM eager": Baseline(cfg, batch, "cudnn", "cpu", torch.bfloat16)}  # fmt: skip
        for name, fn in variants.items():
            rows.append({"hidden": cfg.hidden, "batch": batch, "variant": name, **summary(time_host(fn, 3))})
            print_row(rows[-1])
    return {"device": "cpu (smoke)", "rows": rows}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


# ---- report -----------------------------------------------------------------------------------


def print_row(r: dict) -> None:
    extra = ""
    if "gb_per_s" in r:
        extra = (f"  {r['tokens_per_s']:12.0f} tok/s  {r['gb_per_s']:7.0f} GB/s ({r['bw_frac']:4.0%})"
                 f"  {r['tflop_per_s']:6.1f} TFLOP/s ({r['mm_frac']:4.0%})")  # fmt: skip
    head = f"H={r['hidden']:5d} B={r['batch']:5d} {r['variant']:18s}"
    print(f"{head} {r['median_us']:9.1f} µs  p90 {r['p90_us']:9.1f}{extra}")


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with what was measured."""
    t = {(r["hidden"], r["batch"], r["variant"]): r for r in rows}
    out = []

    def check(name: str, value: float, goal: float, higher: bool) -> None:
        out.append(
            {"target": name, "value": value, "goal": goal, "met": value >= goal if higher else value <= goal}
        )

    if (512, 1, "ours") in t:
        check("B=1 H=512 µs per step", t[512, 1, "ours"]["median_us"], 6.0, higher=False)
    for (h, b, v), r in sorted(t.items()):
        if v != "ours" or b > 64:
            continue
        for base, goal in (("cuDNN LSTM graphed", 2.0), ("LSTMCell eager", 5.0)):
            if (h, b, base) in t:
                check(
                    f"H={h} B={b} speedup vs {base}", t[h, b, base]["median_us"] / r["median_us"], goal, True
                )
    if (1024, 64, "ours") in t:
        check("B=64 H=1024 fraction of copy bandwidth", t[1024, 64, "ours"]["bw_frac"], 0.70, True)
    if (1024, 1024, "ours") in t:
        check("B=1024 H=1024 fraction of bf16 matmul rate", t[1024, 1024, "ours"]["mm_frac"], 0.50, True)
    for x in out:
        print(f"{'MET ' if x['met'] else 'MISS'} {x['target']}: {x['value']:.3g} (goal {x['goal']})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="the torch backend on CPU")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, triton interpreted")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    p.add_argument("--iters", type=int, default=1000, help="timed calls per GPU variant")
    p.add_argument("--cpu-iters", type=int, default=400, help="timed B=1 steps on CPU (fewer at larger B)")
    p.add_argument("--out", type=Path, default=Path("bench/results/kernel_bench.json"))
    args = p.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        result = smoke(args)
    elif args.cpu or not torch.cuda.is_available():
        result = cpu_bench(args)
    else:
        result = gpu_bench(args)
    result.update(
        torch=torch.__version__, python=platform.python_version(), args=vars(args) | {"out": str(args.out)}
    )
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
