"""Compile the step kernels for a GPU that is not here, and report what each one costs it.

    python bench/kernel_compile.py                       # H100 (sm_90a), the served sizes
    python bench/kernel_compile.py --arch 80 --hidden 512 --config 64,16,64,64,4,3
    python bench/kernel_compile.py --cell rnn --plan     # the configs TritonStep serves by default

Triton compiles ahead of time without a GPU or a driver: to PTX, then with the ptxas that
ships in its wheel to a cubin. That catches what the interpreter cannot (a layout that will
not lower, a dot shape the tensor cores refuse) and shows, per kernel and tile config, the
registers and spills ptxas reports, the shared memory the pipeline needs, and which matrix
instruction carries the dot: `wgmma` (Hopper's warpgroup MMA), `mma.sync` (Ampere's), or
`fma` (no tensor cores: fp32 weights, input_precision="ieee"). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from server.kernels import triton_lstm  # noqa: E402
from server.kernels.triton_step import KernelConfig, _round_up, default_plan  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use
# The configs bench/kernel_sweep.py times on a GPU: the default first (the reference for its
# bit-for-bit check), then many narrow programs for small batches (block_h 4 or 8, deeper K
# chunks and pipelines, narrow head tiles), then big tiles for large batches; last, one with
# programmatic dependent launch (sm_90 and later only).
CANDIDATES = [
    KernelConfig(),
    KernelConfig(block_h=4, block_k=128, block_v=16, num_stages=4),
    KernelConfig(block_h=8, block_k=128, block_v=32, num_stages=4),
    KernelConfig(block_h=4, block_k=64, block_v=16, num_stages=6),
    KernelConfig(block_b=128, block_h=16, num_warps=8),
    KernelConfig(block_b=128, block_h=32, num_warps=8),
    KernelConfig(block_h=32, num_stages=4),
    KernelConfig(block_h=4, block_v=16, num_stages=6, pdl=True),  # the plan's small config, with PDL
]


@dataclass(frozen=True)
class Compiled:
    kernel: str  # "layer 0", "layer 1", "head"
    cell: str
    hidden: int
    dtype: str
    arch: int
    config: KernelConfig
    registers: int  # per thread, from ptxas
    spill_bytes: int  # spill stores + loads, from ptxas
    shared_bytes: int
    mma: str  # wgmma, mma.sync or fma
    grid_dependency: bool  # griddepcontrol instructions in the PTX (programmatic dependent launch)
    seconds: float


def layer_source(
    cell: str, layer: int, layers: int, hidden: int, dtype: torch.dtype, cfg: KernelConfig
) -> ASTSource:
    w = "*" + TYPES[dtype]
    sig = {"tok_ptr": "*i64", "slot_ptr": "*i64", "table_ptr": "*fp32", "x_ptr": w, "w_ptr": w,
           "bias_ptr": "*fp32", "h_ptr": "*fp32", "c_ptr": "*fp32", "parity_ptr": "*i32", "out_ptr": w,
           "B": "i32", "R": "i32"}  # fmt: skip
    consts = dict(LAYER=layer, LAYERS=layers, H=hidden, HP=_round_up(hidden, cfg.block_h),
                  KH=_round_up(hidden, cfg.block_k), GATES=4 if cell == "lstm" else 1, BLOCK_B=cfg.block_b,
                  BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, EMULATE=False, PDL=cfg.pdl)  # fmt: skip
    return _source(triton_lstm.layer_kernel, sig, consts)


def head_source(hidden: int, vocab: int, dtype: torch.dtype, cfg: KernelConfig) -> ASTSource:
    w = "*" + TYPES[dtype]
    sig = {"x_ptr": w, "w_ptr": w, "b_ptr": "*fp32", "out_ptr": "*fp32", "slot_ptr": "*i64",
           "parity_ptr": "*i32", "B": "i32"}  # fmt: skip
    consts = dict(V=vocab, VP=_round_up(vocab, cfg.block_v), H=hidden, KH=_round_up(hidden, cfg.block_k),
                  BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                  EMULATE=False, PDL=cfg.pdl)  # fmt: skip
    return _source(triton_lstm.head_kernel, sig, consts)


def _source(fn: triton.JITFunction, sig: dict[str, str], consts: dict[str, object]) -> ASTSource:
    """The source the JIT would compile: every pointer 16-byte aligned (torch's allocations are),
    the integer arguments unspecialized (the kernels mark them do_not_specialize)."""
    names = list(sig) + list(consts)
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    sig = sig | {name: "constexpr" for name in consts}
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)


def compile_one(src: ASTSource, arch: int, cfg: KernelConfig) -> dict:
    """Compile for sm_<arch> and read the cost off ptxas; needs no GPU."""
    start = time.perf_counter()
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "launch_pdl": cfg.pdl}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    registers, spills = ptxas_usage(ptx, arch)
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    return {"registers": registers, "spill_bytes": spills, "shared_bytes": kernel.metadata.shared, "mma": mma,
            "grid_dependency": "griddepcontrol" in ptx, "seconds": time.perf_counter() - start}  # fmt: skip


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) from `ptxas -v`, with the ptxas in Triton's wheel."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([ptxas, "--gpu-name", gpu, "-v", f.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    registers = spills = 0
    for line in done.stderr.splitlines():
        words = line.replace(",", " ").split()
        if "registers" in words:
            registers = int(words[words.index("registers") - 1])
        for kind in ("stores", "loads"):
            if f"spill {kind}" in line:
                spills += int(line.split(f"bytes spill {kind}")[0].split()[-1])
    return registers, spills


def compile_step(cell: str, hidden: int, dtype: torch.dtype, cfg: KernelConfig, arch: int,
                 layers: int = 2, vocab: int = 258) -> list[Compiled]:  # fmt: skip
    """Every kernel one step launches (layer 0, a deeper layer, the head)."""
    sources = {"layer 0": layer_source(cell, 0, layers, hidden, dtype, cfg)}
    if layers > 1:
        sources["layer 1"] = layer_source(cell, 1, layers, hidden, dtype, cfg)
    sources["head"] = head_source(hidden, vocab, dtype, cfg)
    return [
        Compiled(name, cell, hidden, TYPES[dtype], arch, cfg, **compile_one(src, arch, cfg))
        for name, src in sources.items()
    ]


FIELDS = ("block_b", "block_h", "block_k", "block_v", "num_warps", "num_stages")  # in config strings


def parse_config(text: str) -> KernelConfig:
    """A config from "block_b,block_h,block_k[,block_v,num_warps,num_stages,pdl]" (the rest default)."""
    values = dict(zip((*FIELDS, "pdl"), map(int, text.split(","))))
    return KernelConfig(**values | ({"pdl": bool(values["pdl"])} if "pdl" in values else {}))


def describe(config: KernelConfig) -> str:
    """The config as "block_b,block_h,block_k,block_v,num_warps,num_stages[,pdl]"."""
    return ",".join(str(getattr(config, k)) for k in FIELDS) + ",pdl" * config.pdl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--arch",
        type=int,
        choices=sorted(SHARED_LIMIT),
        default=90,
        help="compute capability x10: 90 H100, 80 A100",
    )
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--cell", choices=["lstm", "rnn"], default="lstm")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--config", type=parse_config, nargs="+", default=CANDIDATES,
                   help="tile configs as block_b,block_h,block_k[,block_v,num_warps,num_stages]")  # fmt: skip
    p.add_argument(
        "--plan", action="store_true", help="the configs of the default tile plan for the cell and dtype"
    )
    p.add_argument("--out", type=Path, default=Path("bench/results/kernel_compile.json"))
    args = p.parse_args()
    dtype = {v: k for k, v in TYPES.items()}[args.dtype]
    if args.plan:
        args.config = [config for _, config in default_plan(args.cell, dtype)]
    rows: list[Compiled] = []
    print(f"{'kernel':8s} {'H':>5s} {'config (b,h,k,v,warps,stages)':30s} {'regs':>5s} {'spill':>6s}"
          f" {'smem KiB':>9s} {'mma':>9s}")  # fmt: skip
    for cfg in args.config:
        for hidden in args.hidden:
            for r in compile_step(args.cell, hidden, dtype, cfg, args.arch):
                rows.append(r)
                print(f"{r.kernel:8s} {r.hidden:5d} {describe(r.config):30s} {r.registers:5d} {r.spill_bytes:6d}"
                      f" {r.shared_bytes / 1024:9.1f} {r.mma:>9s}")  # fmt: skip
    result = {"arch": args.arch, "shared_limit": SHARED_LIMIT[args.arch], "cell": args.cell,
              "dtype": args.dtype, "triton": triton.__version__, "rows": [asdict(r) for r in rows]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
