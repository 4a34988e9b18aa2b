"""Triton kernels for one recurrent step over the slot-indexed state pool.

layer_kernel (one launch per layer), for a tile of BLOCK_B batch rows x BLOCK_H hidden units:
    gates = table[token] + W_hhᵀ-tile · h_old[slot]                  (layer 0)
    gates = bias + [W_ih | W_hh]ᵀ-tile · [x; h_old[slot]]             (deeper layers)
    LSTM: c = σ(f)·c + σ(i)·tanh(g),  h = σ(o)·tanh(c);   Elman: h = tanh(gates)
It reads h_old from buffer parity[slot] of the pool and writes the new h to the other buffer
(other programs are still reading the old row), updates c in place (each program owns its
columns), and writes the new h, rounded to the weights' dtype, to `out`: the next layer's x.
head_kernel: logits = x · W_headᵀ + b, then flips parity[slot] for the batch's rows.

Packed weights: the K rows are [W_ih ; W_hh]ᵀ, each padded to KH rows, and the columns
interleave the gates per hidden unit (column 4n + g for unit n, gate g = i, f, g, o), so
that a BLOCK_H tile is one [BLOCK_K, 4·BLOCK_H] MMA operand whose result splits into the
four gates with a reshape. Padding holds zeros, so weight loads need no mask.

Numerics: activations are rounded to the weights' dtype and multiplied on the tensor cores
with fp32 accumulation (fp32 weights: exact fp32 FMA, input_precision="ieee"). Each output
element's sum runs over K in BLOCK_K chunks in a fixed order, whatever the batch and the other
tiles, so a row's result does not depend on the batch (see default_plan in triton_step.py).
EMULATE: under TRITON_INTERPRET=1, bf16 casts and bf16 dots are wrong (the interpreter
truncates, and multiplies bf16 bit patterns as integers), and its fp32 dot calls numpy's
BLAS, which sums some rows of a tile in another order. So the kernel rounds by hand (to
nearest even, as the GPU does) and sums the same products elementwise, in a fixed K order.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, W_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x rounded to the weights' dtype: in that dtype, or (EMULATE) as exact fp32 values."""
    if EMULATE:
        if W_DTYPE == tl.bfloat16:
            x = _round_bf16(x.to(tl.float32))
        elif W_DTYPE == tl.float16:
            x = x.to(tl.float32).to(tl.float16).to(tl.float32)
        else:
            x = x.to(tl.float32)
    else:
        x = x.to(W_DTYPE)
    return x


@triton.jit
def _mma(a, w, acc, EMULATE: tl.constexpr):
    """acc + a @ w, a already rounded by _operand."""
    if EMULATE:  # not tl.dot: numpy's BLAS may sum a tile's last rows in another order
        acc += tl.sum(a[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    elif w.dtype == tl.float32:
        acc = tl.dot(a, w, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch (Hopper+), this kernel's programs may start while the
    previous kernel finishes: let the next kernel start early too, then wait until the previous
    one's writes are visible, before any load."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit(do_not_specialize=["B", "R"])
def layer_kernel(
    tok_ptr,  # [B] int64 token ids (layer 0)
    slot_ptr,  # [B] int64 pool rows
    table_ptr,  # [V, G*HP] fp32, packed like the weights' columns (layer 0)
    x_ptr,  # [B, H] the previous layer's new h, operand dtype (deeper layers)
    w_ptr,  # [2*KH, G*HP] packed [W_ih; W_hh]ᵀ (layer 0: [KH, G*HP], W_hhᵀ), operand dtype
    bias_ptr,  # [G*HP] fp32 (deeper layers)
    h_ptr,  # [2, LAYERS, R, H] fp32 pool h
    c_ptr,  # [LAYERS, R, H] fp32 pool c (LSTM)
    parity_ptr,  # [R] int32: the h buffer holding each row's state
    out_ptr,  # [B, H] new h, operand dtype
    B,
    R,
    LAYER: tl.constexpr,
    LAYERS: tl.constexpr,
    H: tl.constexpr,  # hidden size (= the input width of deeper layers)
    HP: tl.constexpr,  # H padded to BLOCK_H: the packed gate columns are G*HP
    KH: tl.constexpr,  # H padded to BLOCK_K: rows of W_hh in the packed weights
    GATES: tl.constexpr,  # 4: LSTM, 1: Elman
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    _after_previous_kernel(PDL)
    pid_b, pid_h = tl.program_id(0), tl.program_id(1)
    N: tl.constexpr = GATES * BLOCK_H  # packed columns of this tile
    NP: tl.constexpr = GATES * HP
    # int64 offsets: pools can outgrow int32 offsets (and the interpreter checks int32 math for overflow)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
    par = tl.load(parity_ptr + slot, mask=rmask, other=0).to(tl.int64)
    h_old = h_ptr + ((par * LAYERS + LAYER) * R + slot) * H  # [BLOCK_B] row starts
    h_new = h_ptr + (((1 - par) * LAYERS + LAYER) * R + slot) * H
    cols = pid_h * N + tl.arange(0, N).to(tl.int64)
    kk = tl.arange(0, BLOCK_K).to(tl.int64)

    acc = tl.zeros((BLOCK_B, N), dtype=tl.float32)
    if LAYER > 0:  # x · W_ihᵀ; x is already in the operand dtype
        for k0 in range(0, KH, BLOCK_K):
            k = k0 + kk
            a = tl.load(
                x_ptr + rows[:, None] * H + k[None, :], mask=rmask[:, None] & (k[None, :] < H), other=0.0
            )
            w = tl.load(w_ptr + k[:, None] * NP + cols[None, :])
            acc = _mma(a, w, acc, EMULATE)
    W_HH: tl.constexpr = KH if LAYER > 0 else 0  # first row of W_hhᵀ in the packed weights
    for k0 in range(0, KH, BLOCK_K):  # h_old · W_hhᵀ
        k = k0 + kk
        a = tl.load(h_old[:, None] + k[None, :], mask=rmask[:, None] & (k[None, :] < H), other=0.0)
        w = tl.load(w_ptr + (W_HH + k)[:, None] * NP + cols[None, :])
        acc = _mma(_operand(a, w_ptr.dtype.element_ty, EMULATE), w, acc, EMULATE)
    if LAYER == 0:
        tok = tl.load(tok_ptr + rows, mask=rmask, other=0)
        acc += tl.load(table_ptr + tok[:, None] * NP + cols[None, :], mask=rmask[:, None], other=0.0)
    else:
        acc += tl.load(bias_ptr + cols)[None, :]

    n = pid_h * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    mask = rmask[:, None] & (n[None, :] < H)
    if GATES == 4:
        # [BLOCK_B, 4*BLOCK_H] -> [BLOCK_B, BLOCK_H, 2, 2]: gate 2a + b sits at [..., a, b]
        ig, fo = tl.split(tl.reshape(acc, (BLOCK_B, BLOCK_H, 2, 2)))
        i, g = tl.split(ig)
        f, o = tl.split(fo)
        c_rows = c_ptr + (LAYER * R + slot[:, None]) * H + n[None, :]
        c = tl.load(c_rows, mask=mask, other=0.0)
        c = tl.sigmoid(f) * c + tl.sigmoid(i) * _tanh(g)
        h = tl.sigmoid(o) * _tanh(c)
        tl.store(c_rows, c, mask=mask)
    else:
        h = _tanh(acc)
    tl.store(h_new[:, None] + n[None, :], h, mask=mask)
    tl.store(
        out_ptr + rows[:, None] * H + n[None, :], _operand(h, w_ptr.dtype.element_ty, EMULATE), mask=mask
    )


@triton.jit(do_not_specialize=["B"])
def head_kernel(
    x_ptr,  # [B, H] the last layer's new h, operand dtype
    w_ptr,  # [KH, VP] W_headᵀ, zero-padded
    b_ptr,  # [VP] fp32
    out_ptr,  # [B, V] fp32 logits
    slot_ptr,  # [B] int64
    parity_ptr,  # [R] int32
    B,
    V: tl.constexpr,
    VP: tl.constexpr,
    H: tl.constexpr,
    KH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    _after_previous_kernel(PDL)
    pid_b, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    kk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, KH, BLOCK_K):
        k = k0 + kk
        a = tl.load(x_ptr + rows[:, None] * H + k[None, :], mask=rmask[:, None] & (k[None, :] < H), other=0.0)
        w = tl.load(w_ptr + k[:, None] * VP + cols[None, :])
        acc = _mma(a, w, acc, EMULATE)
    acc += tl.load(b_ptr + cols)[None, :]
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], acc, mask=rmask[:, None] & (cols[None, :] < V))
    if pid_v == 0:  # every layer has written its new h: these rows now live in the other buffer
        slot = tl.load(slot_ptr + rows, mask=rmask, other=0)
        par = tl.load(parity_ptr + slot, mask=rmask, other=0)
        tl.store(parity_ptr + slot, 1 - par, mask=rmask)
