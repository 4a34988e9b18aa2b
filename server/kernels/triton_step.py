"""The triton step backend: packs the weights once, then launches one fused kernel per layer
and a head kernel per step (captured in CUDA graphs per batch bucket on CUDA).

On CPU it runs under Triton's interpreter (TRITON_INTERPRET=1), for tests only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from server.kernels import triton_lstm
from server.kernels.cuda_graphs import CudaGraphs, bucket
from server.kernels.state_pool import StatePool
from server.kernels.torch_step import check_batch
from server.kernels.weights import served_weights
from server.model import RecurrentLM


@dataclass(frozen=True)
class KernelConfig:
    """Tiles and launch options for one batch bucket; only the grid changes with the batch size.

    block_h counts hidden units; an LSTM tile is 4*block_h packed columns (>= 16 for tl.dot).
    pdl: programmatic dependent launch (CUDA, Hopper and later), so that each kernel's programs
    start while the previous kernel finishes; ignored under the interpreter.
    """

    block_b: int = 64
    block_h: int = 16
    block_k: int = 64
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False

    def __post_init__(self) -> None:
        for name in ("block_b", "block_h", "block_k", "block_v"):
            n = getattr(self, name)
            if n < 1 or n & (n - 1):
                raise ValueError(f"{name} must be a power of two, got {n}")


# (smallest batch, config) pairs, ascending from 1: a batch runs the config of the last pair
# whose size it reaches (by its graph bucket).
TilePlan = tuple[tuple[int, KernelConfig], ...]


def default_plan(cell: str, dtype: torch.dtype) -> TilePlan:
    """Small batches read every weight once: many narrow programs and deep pipelines keep the
    SMs pulling from memory. Large batches are GEMMs: wider tiles reuse each weight tile more,
    and from 512 rows 128-row tiles over 8 warps. Set from bench/kernel_sweep.py on an H200
    (docs/kernel-benchmarks.md): at B = 64 the narrow config beats the 16-unit one by 5-20%,
    at B = 256 the 16-unit one beats both others by 5-60%, at B = 1024 the 128-row one beats it
    by 20-60%; the bucket thresholds sit between the measured sizes.
    Batch invariance across the plan's configs: every config keeps block_k (the K order of each
    sum) and, on Hopper, the same MMA instruction (wgmma, 64 rows per warpgroup, k 16), so each
    output element goes through the same operations; the GPU test of invariance across graph
    buckets checks that the bits agree.
    fp32 weights multiply on FMA units (exact, no TF32), whose register tiles spill beyond
    32 x 16: they get one small config."""
    unit = 4 if cell == "lstm" else 16  # hidden units per 16 MMA columns
    if dtype == torch.float32:
        return ((1, KernelConfig(block_b=32, block_h=unit, block_v=16, num_stages=2)),)
    return (
        (1, KernelConfig(block_h=unit, block_v=16, num_stages=6)),
        (128, KernelConfig(block_h=4 * unit)),
        (512, KernelConfig(block_b=128, block_h=8 * unit, num_warps=8)),
    )


def as_plan(config: KernelConfig | TilePlan) -> TilePlan:
    """One config for every batch, or a checked plan."""
    if isinstance(config, KernelConfig):
        return ((1, config),)
    sizes = [size for size, _ in config]
    if not sizes or sizes[0] != 1 or sizes != sorted(set(sizes)):
        raise ValueError(f"a tile plan needs distinct batch sizes ascending from 1, got {sizes}")
    if len({c.block_k for _, c in config}) > 1:
        raise ValueError("a tile plan's configs must share block_k: it fixes the order of every sum")
    return tuple(config)


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, m: int) -> int:
    return _cdiv(n, m) * m


def interleave_gates(t: Tensor, gates: int, hp: int) -> Tensor:
    """[..., G*H] with gate-major columns -> [..., HP*G] with column G*n + g (units zero-padded to HP)."""
    h = t.shape[-1] // gates
    out = t.new_zeros(*t.shape[:-1], hp, gates)
    out[..., :h, :] = t.unflatten(-1, (gates, h)).transpose(-1, -2)
    return out.flatten(-2)


def pad_rows(t: Tensor, rows: int) -> Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class TritonStep:
    """`step(tokens [B], slots [B]) -> logits [B, V]` fp32 on the pool's device.

    On CUDA the logits are a view of the bucket's static output: valid until the next step.
    """

    name = "triton"

    def __init__(
        self,
        model: RecurrentLM,
        pool: StatePool,
        dtype: torch.dtype,
        config: KernelConfig | TilePlan | None = None,
        use_graphs: bool = True,
    ) -> None:
        mc, dev = model.config, pool.device
        self.emulate = dev.type != "cuda"
        if self.emulate and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
        self.pool, self.dtype, self.vocab = pool, dtype, mc.vocab_size
        self.plan = plan = as_plan(config or default_plan(mc.cell, dtype))
        configs = [c for _, c in plan]
        self.gates, self.layers, self.hidden = mc.gates, mc.layers, mc.hidden
        self.hp = _round_up(mc.hidden, max(c.block_h for c in configs))  # hidden units, padded to whole tiles
        # The K extent of h (and x), padded to whole chunks, and to two at least: on sm_90, Triton
        # 3.6 miscompiles a K loop of one chunk with 16-column MMA tiles (compute-sanitizer: an
        # out-of-bounds shared-memory read in the epilogue; wrong Elman outputs). A zero chunk
        # only costs models with H <= block_k.
        self.kh = max(_round_up(mc.hidden, configs[0].block_k), 2 * configs[0].block_k)
        self.vp = _round_up(mc.vocab_size, max(c.block_v for c in configs))
        sw = served_weights(model, dtype)

        def pack(w: Tensor) -> Tensor:  # [G*H, K] -> [KH, G*HP]: K rows padded, gate columns interleaved
            return pad_rows(interleave_gates(w.T, self.gates, self.hp), self.kh)

        self.table = interleave_gates(sw.table, self.gates, self.hp).float().to(dev)
        self.w, self.bias = [], []
        for w_ih, w_hh, b in zip(sw.w_ih, sw.w_hh, sw.bias):
            w = pack(w_hh) if w_ih is None else torch.cat([pack(w_ih), pack(w_hh)])
            self.w.append(w.to(dev, dtype).contiguous())
            bias = self.table if b is None else interleave_gates(b, self.gates, self.hp)  # layer 0: unused
            self.bias.append(bias.float().to(dev))
        head_w = torch.cat(
            [sw.head_w.T, sw.head_w.new_zeros(sw.head_w.shape[1], self.vp - self.vocab)], dim=1
        )
        self.head_w = pad_rows(head_w, self.kh).to(dev, dtype).contiguous()  # [KH, VP]
        self.head_b = torch.cat([sw.head_b, sw.head_b.new_zeros(self.vp - self.vocab)]).float().to(dev)
        # the layers' outputs: in the weights' dtype on GPU; under the interpreter, fp32 holding those values
        self.x_dtype = torch.float32 if self.emulate else dtype
        self.poison = (
            self.emulate
        )  # NaN-fill outputs and scratch first, so tests prove every element is written
        self.graphs = CudaGraphs(self.launch, pool) if use_graphs and dev.type == "cuda" else None

    @torch.no_grad()
    def step(self, tokens: Tensor, slots: Tensor) -> Tensor:
        check_batch(tokens, slots, self.pool, self.vocab)
        if self.graphs is not None:
            return self.graphs.run(tokens, slots)
        dev = self.pool.device
        return self.launch(tokens.to(dev), slots.to(dev))

    def launch(self, tokens: Tensor, slots: Tensor) -> Tensor:
        """Enqueue the whole step for device tensors tokens, slots [B]; returns the logits [B, V]."""
        pool, B = self.pool, tokens.shape[0]
        cfg = self.config_for(B)
        rows = pool.parity.shape[0]
        x = [self._alloc((B, self.hidden), self.x_dtype) for _ in range(2)]  # ping-pong layer outputs
        c = pool.c if pool.c is not None else pool.h  # the Elman kernel never touches c
        pdl = cfg.pdl and not self.emulate
        common = {
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
            "EMULATE": self.emulate,
            "PDL": pdl,
        }
        if pdl:
            common["launch_pdl"] = True
        grid = (_cdiv(B, cfg.block_b), self.hp // cfg.block_h)
        for layer in range(self.layers):
            triton_lstm.layer_kernel[grid](
                tokens, slots, self.table, x[(layer - 1) % 2], self.w[layer], self.bias[layer],
                pool.h, c, pool.parity, x[layer % 2], B, rows,
                LAYER=layer, LAYERS=self.layers, H=self.hidden, HP=self.hp, KH=self.kh, GATES=self.gates,
                BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, **common,
            )  # fmt: skip
        logits = self._alloc((B, self.vocab), torch.float32)
        triton_lstm.head_kernel[(_cdiv(B, cfg.block_b), self.vp // cfg.block_v)](
            x[(self.layers - 1) % 2], self.head_w, self.head_b, logits, slots, pool.parity, B,
            V=self.vocab, VP=self.vp, H=self.hidden, KH=self.kh,
            BLOCK_B=cfg.block_b, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, **common,
        )  # fmt: skip
        return logits

    def config_for(self, batch: int) -> KernelConfig:
        """The plan's config for a batch: chosen by its graph bucket, graphed or not."""
        return next(c for size, c in reversed(self.plan) if bucket(batch) >= size)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.poison:
            return torch.full(shape, float("nan"), dtype=dtype, device=self.pool.device)
        return torch.empty(shape, dtype=dtype, device=self.pool.device)
