"""Sweep the Triton kernel's tile configs on a GPU: time per step, and whether each config
computes bitwise what the default config computes.

    python bench/kernel_sweep.py                         # CUDA: the candidates below
    python bench/kernel_sweep.py --config 64,4,128,16,4,4 128,32,64,64,8,3
    python bench/kernel_sweep.py --smoke                 # tiny sizes, CPU, Triton interpreted

Why: one tile config cannot suit every batch. B=1 wants many programs over the hidden units
(small block_h) and deep pipelines; B=1024 wants large MMA tiles. Choosing the config per
CUDA-graph bucket keeps a session's output independent of load only if every config yields
the same bits, which holds when each output element still runs the same K-chunk order
through the same MMA instruction (bench/kernel_compile.py shows which instruction each config
compiles to); only the GPU can confirm it. So for every (H, B) this runs the same step, from
the same random states, under each config and compares logits and new states bit for bit
with the default's, then times the config's CUDA-graph replay (L2 flushed, as kernel_bench).
Prints a table and, per (H, B), the fastest config that agrees; writes JSON as it goes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
if "--smoke" in sys.argv:  # before triton is imported: a kernel is built for the interpreter when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.kernel_bench import (  # noqa: E402
    copy_bandwidth,
    l2_flush,
    scattered_batch,
    step_bytes,
    summary,
    time_cuda,
    time_host,
    write_json,
)
from bench.kernel_compile import CANDIDATES, describe, parse_config  # noqa: E402
from server.kernels.cuda_graphs import bucket  # noqa: E402
from server.kernels.triton_step import KernelConfig, TritonStep  # noqa: E402
from server.model import ModelConfig, RecurrentLM  # noqa: E402


def run_config(cfg: ModelConfig, batch: int, config: KernelConfig, device: str, dtype: torch.dtype):
    """(the step's logits and the pool's tensors after it, a replay of the bucket's graph or a step).

    Every config builds the same model, pool states, slots and tokens from the same seeds."""
    pool, tokens, slots = scattered_batch(cfg, batch, device)
    model = RecurrentLM(cfg)
    pool.h.uniform_(-1, 1)
    pool.c.uniform_(-2, 2)
    tokens, slots = tokens.to(device), slots.to(device)
    backend = TritonStep(model, pool, dtype, config)
    logits = backend.step(tokens, slots).clone()
    after = (logits, pool.h.clone(), pool.c.clone(), pool.parity.clone())
    if backend.graphs is None:
        return after, lambda: backend.step(tokens, slots)
    graph, _ = backend.graphs.graphs[bucket(batch)]
    return after, graph.replay


def sweep(args: argparse.Namespace) -> dict:
    cuda = not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    flush = l2_flush() if cuda else None
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke, interpreted)", "rows": []}
    bandwidth = result["copy_gb_per_s"] = copy_bandwidth() if cuda else None
    for hidden in args.hidden:
        cfg = ModelConfig(cell="lstm", layers=2, hidden=hidden, embed=128 if cuda else 8)
        for batch in args.batch:
            reference = None
            for config in args.config:
                row = {"hidden": hidden, "batch": batch, "config": vars(config)}
                try:
                    after, replay = run_config(cfg, batch, config, device, dtype)
                    times = time_cuda(replay, args.iters, flush) if cuda else time_host(replay, 3)
                except Exception as e:  # a config that does not compile or launch here: record it, go on
                    row["error"] = f"{type(e).__name__}: {e}"
                else:
                    reference = reference or after
                    row |= {
                        "agrees": all(torch.equal(a, b) for a, b in zip(after, reference)),
                        **summary(times),
                    }
                    if bandwidth:
                        row["bw_frac"] = step_bytes(cfg, batch, 2) / row["median_us"] / 1e3 / bandwidth
                result["rows"].append(row)
                print_row(row)
                write_json(args.out, result)  # partial results survive a timeout
    result["best"] = best(result["rows"])
    write_json(args.out, result)
    return result


def tiles(row: dict) -> str:
    return describe(KernelConfig(**row["config"]))


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"H={r['hidden']:5d} B={r['batch']:5d} {tiles(r):18s} failed: {r['error']}")
        return
    bw = f"  {r['bw_frac']:4.0%} of copy bandwidth" if "bw_frac" in r else ""
    same = "same bits" if r["agrees"] else "DIFFERENT BITS"
    print(f"H={r['hidden']:5d} B={r['batch']:5d} {tiles(r):18s} {r['median_us']:9.1f} µs"
          f"  p90 {r['p90_us']:9.1f}{bw}  {same}")  # fmt: skip


def best(rows: list[dict]) -> list[dict]:
    """Per (H, B), the fastest config whose bits agree with the default's."""
    out = {}
    for r in rows:
        key = (r["hidden"], r["batch"])
        if r.get("agrees") and (key not in out or r["median_us"] < out[key]["median_us"]):
            out[key] = r
    for r in out.values():
        print(f"best H={r['hidden']:5d} B={r['batch']:5d}: {tiles(r)}  {r['median_us']:.1f} µs")
    return list(out.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, triton interpreted")
    tiles_help = "block_b,block_h,block_k[,block_v,num_warps,num_stages]; the first is the reference"
    p.add_argument("--config", type=parse_config, nargs="+", default=CANDIDATES, help=tiles_help)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    p.add_argument("--iters", type=int, default=300, help="timed graph replays per config")
    p.add_argument("--out", type=Path, default=Path("bench/results/kernel_sweep.json"))
    args = p.parse_args()
    if args.smoke:
        args.hidden, args.batch = [24], [1, 3]
    elif not torch.cuda.is_available():
        p.error("the sweep needs CUDA (or --smoke)")
    sweep(args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
