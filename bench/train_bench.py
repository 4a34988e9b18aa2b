"""Training-step speed of `lstm-serve train`'s default model, variant by variant, on the real corpus.

    python bench/train_bench.py                          # every variant, 30 steps each
    python bench/train_bench.py --variants baseline bf16 --steps 40
    python bench/train_bench.py --profile baseline       # where one variant's step spends its time

Each variant runs in a subprocess of its own (thread counts and oneDNN flags are per
process): the default model (1-layer LSTM, hidden 512, embed 128), seeded as the job seeds
it, trained with the job's own step (server.training.train.train_step: AdamW, clipping,
warmup) on the default corpus (the standard library source) for --steps steps; the first
--warmup steps are not timed. The table gives tokens/s, the ratio to `baseline` (the job as
it was: fp32, torch's default threads, oneDNN on, batch 64, lr 3e-3), the mean train loss of
the last 5 steps, and the held-out bits/byte after the last step (fp32, first --eval-tokens
tokens of the held-out split). The baseline runs first and again last; ratios are to the mean
of its runs (a shared machine's speed drifts). Writes JSON (bench/results/train_bench.json by
default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.serve_bench import machine as serve_machine  # noqa: E402
from server.model import ModelConfig, RecurrentLM  # noqa: E402
from server.training.config import TrainConfig  # noqa: E402
from server.training.corpus import load_corpus  # noqa: E402
from server.training.precision import cpu_has_native_bf16  # noqa: E402
from server.training.train import (  # noqa: E402
    StreamBatches,
    evaluate,
    learning_rate,
    make_optimizer,
    train_step,
)

LN2 = math.log(2)
BASE_LR = 3e-3

# name -> (what it changes, settings); unset settings are the baseline's
VARIANTS: dict[str, tuple[str, dict]] = {
    "baseline": ("fp32, default threads, oneDNN on, batch 64, lr 3e-3", {}),
    "mkldnn-off": ("torch.backends.mkldnn.enabled = False (native ATen LSTM)", {"mkldnn": False}),
    "threads-1": ("torch.set_num_threads(1)", {"threads": 1}),
    "interop-1": ("torch.set_num_interop_threads(1)", {"interop": 1}),
    "onednn-bf32": (
        'mkldnn.rnn/matmul.fp32_precision = "bf16" (fp32 tensors, bf16 math inside oneDNN)',
        {"bf32": True},
    ),
    "bf16": ('torch.autocast("cpu", dtype=torch.bfloat16)', {"autocast": "bf16"}),
    "compile": ("torch.compile(model), fp32", {"compile": True}),
    "fused-adamw": ("AdamW(fused=True), fp32", {"fused": True}),
    "b128": ("batch 128, lr 3e-3 * sqrt(2)", {"batch": 128, "lr": BASE_LR * math.sqrt(2)}),
    "b128-bf16": (
        "batch 128, lr 3e-3 * sqrt(2), bf16 autocast",
        {"batch": 128, "lr": BASE_LR * math.sqrt(2), "autocast": "bf16"},
    ),
}


def machine() -> dict:
    """serve_bench's description of the machine, and what decides the training step's kernels."""
    return serve_machine() | {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average": os.getloadavg(),
    }


def apply_process_settings(s: dict) -> None:
    """Settings that must come before any torch work in the process."""
    if "interop" in s:
        torch.set_num_interop_threads(s["interop"])
    if "threads" in s:
        torch.set_num_threads(s["threads"])
    if "mkldnn" in s:
        torch.backends.mkldnn.enabled = s["mkldnn"]
    if s.get("bf32"):
        torch.backends.mkldnn.rnn.fp32_precision = "bf16"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"


def run_variant(name: str, steps: int, warmup: int, eval_tokens: int, profile: bool = False) -> dict:
    """Train the default model for `steps` steps under variant `name`, in this process."""
    s = VARIANTS[name][1]
    apply_process_settings(s)
    cfg = TrainConfig(
        max_steps=10_000,
        batch_size=s.get("batch", 64),
        lr=s.get("lr", BASE_LR),
        autocast=s.get("autocast", "off"),
        eval_tokens=eval_tokens,
        progress=False,
    )
    device = torch.device("cpu")
    corpus = load_corpus([])
    batches = StreamBatches(corpus.train, cfg.batch_size, cfg.seq_len, "training")
    torch.manual_seed(cfg.seed)
    model = RecurrentLM(ModelConfig(hidden=cfg.hidden, embed=cfg.embed)).train()
    optimizer = make_optimizer(model, cfg)
    if s.get("fused"):
        groups = [
            {k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in optimizer.param_groups
        ]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), fused=True)
    stepped = torch.compile(model) if s.get("compile") else model
    carry = model.initial_state(cfg.batch_size, device)
    losses, started = [], None
    first_step_s = None
    for step in range(steps):
        if step == warmup:
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, None)
        x, y = batches.batch(step)
        t0 = time.perf_counter()
        if profile and step == steps - 3:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    loss, carry = train_step(stepped, optimizer, x, y, carry, cfg, device)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            return {}
        loss, carry = train_step(stepped, optimizer, x, y, carry, cfg, device)
        if step == 0:
            first_step_s = time.perf_counter() - t0
        losses.append(loss)
    seconds = time.perf_counter() - started
    timed = steps - warmup
    heldout = evaluate(model, corpus.heldout, cfg.model_copy(update={"autocast": "off"}), device)
    return {
        "variant": name,
        "what": VARIANTS[name][0],
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "steps": steps,
        "timed_steps": timed,
        "seconds": seconds,
        "ms_per_step": seconds / timed * 1e3,
        "tokens_per_second": timed * cfg.batch_size * cfg.seq_len / seconds,
        "first_step_seconds": first_step_s,
        "tokens_seen": steps * cfg.batch_size * cfg.seq_len,
        "train_bits_per_byte_last5": sum(losses[-5:]) / len(losses[-5:]) / LN2,
        "heldout_bits_per_byte": heldout,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[*VARIANTS, "baseline"],
        choices=list(VARIANTS),
        help="in order; a repeated name runs again (default: all, and baseline again at the end, "
        "as this machine's speed drifts while it is shared)",
    )
    parser.add_argument("--steps", type=int, default=30, help="steps per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default: %(default)s)")
    parser.add_argument(
        "--eval-tokens", type=int, default=65_536, help="held-out tokens evaluated at the end"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/train_bench.json")
    parser.add_argument("--profile", choices=list(VARIANTS), help="print one variant's op profile instead")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.profile:
        name = args.worker or args.profile
        result = run_variant(name, args.steps, args.warmup, args.eval_tokens, profile=bool(args.profile))
        if args.worker:
            print("RESULT " + json.dumps(result))
        return

    report = {"machine": machine(), "steps": args.steps, "warmup": args.warmup, "results": []}
    print("machine:", json.dumps(report["machine"]), file=sys.stderr)
    for name in args.variants:
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
        cmd += ["--warmup", str(args.warmup), "--eval-tokens", str(args.eval_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            print(f"{name}: failed ({tail[0]})", file=sys.stderr)
            report["results"].append({"variant": name, "what": VARIANTS[name][0], "error": tail[0]})
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        runs = sum(r["variant"].split("#")[0] == name for r in report["results"])
        result["variant"] = f"{name}#{runs + 1}" if runs else name
        report["results"].append(result)
        print(
            f"{name}: {result['tokens_per_second']:,.0f} tokens/s, held-out {result['heldout_bits_per_byte']:.3f}",
            file=sys.stderr,
        )
    bases = [r.get("tokens_per_second") for r in report["results"] if r["variant"].startswith("baseline")]
    bases = [b for b in bases if b]
    base = {"tokens_per_second": sum(bases) / len(bases)} if bases else None
    report["baseline_tokens_per_second"] = base and base["tokens_per_second"]
    print(f"\n{args.steps} steps per variant ({args.warmup} untimed), default model, stdlib corpus")
    print("ratio: to the mean of the baseline runs")
    print(
        f"{'variant':<13} {'tokens/s':>9} {'ratio':>6} {'ms/step':>8} {'train bpb':>10} {'held-out bpb':>13}  what"
    )
    for r in report["results"]:
        if "error" in r:
            print(f"{r['variant']:<13} {'failed':>9}  {r['error']}")
            continue
        r["ratio_to_baseline"] = r["tokens_per_second"] / base["tokens_per_second"] if base else None
        ratio = f"{r['ratio_to_baseline']:.2f}x" if base else "-"
        print(
            f"{r['variant']:<13} {r['tokens_per_second']:>9,.0f} {ratio:>6} {r['ms_per_step']:>8.0f} "
            f"{r['train_bits_per_byte_last5']:>10.3f} {r['heldout_bits_per_byte']:>13.3f}  {r['what']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
