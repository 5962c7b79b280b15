"""Fused LM-head log-probs, entropy and the OPD importance-sampling loss (Triton GEMM + epilogue, cuBLAS).

Nothing of shape [N, V] is ever in memory: tokens go through in chunks of C rows (a <= 832 MiB
buffer; 6 chunks of <= 2752 rows for 16384 tokens at V = 151936 in bf16). For one chunk, with hidden
h [C, H], head W [V, H], sampled tokens y [C] and temperature T (base 2: u = x log2(e) / T):

    x     = h @ W^T                          GEMM 1
    S     = sum_v 2^(u_v - c)                ┐ the row pass, for a shift c fixed before it: c = u_y,
    logp  = ln2 (u_y - c - log2 S)  (<= 0)   │ the target's own logit (A = sum_v 2^(u_v - c) (u_v - c))
    ent   = ln2 (log2 S - A / S)             ┘

Where the row pass runs:
  bf16 on sm_90 / sm_100 (the default, GEMM_EPILOGUE): in GEMM 1's epilogue. GEMM 1 is a Triton kernel
    (_gemm_epi_kernel, tiles by TMA) whose epilogue takes each [BM, BN] tile's row sums of 2^(u - c) and
    2^(u - c)(u - c) from the fp32 accumulator, so x is never read back and every logit is exact in fp32
    (bf16 products, fp32 sums); a per-row combine adds the tiles' sums (_combine_kernel). c = u_y comes
    from an fp32 dot of h_t and W[y_t] before GEMM 1 (_target_kernel). Forward-only (teacher scoring)
    stores nothing of x at all.
  otherwise (fp32 / fp16, GPUs without TMA or without the shared memory for its tiles, rows not 16-byte
    aligned or overlapping): GEMM 1 in cuBLAS, stored in the input dtype, then one Triton program per row
    reads x once (_fwd_kernel).
On an H100 (kernels/NOTES.md, runs 8-9), per 2752-row chunk at H = 2048 with e' stored: GEMM 1 + epilogue
2.46-2.84 ms, cuBLAS GEMM 1 + the row kernel 2.49-2.55 + 0.62 ms (the row kernel moves the logits twice, at
85 % of a copy's bandwidth); the same epilogue kernel fed by cp.async instead of TMA took 3.18 ms, so that path
is gone. The epilogue costs ~8 SASS instructions per logit against a mainloop of ~2H / 4096 SM clocks per
logit (`python -m kernels.sass` counts both).

Why a fixed shift works: 2^(u - c) is stored in the input dtype, and bf16 / fp32 hold 2^-126..2^127
at full relative precision. With c = u_y, S >= 1 (the target's own term) and every term that is
lost to underflow has p < 2^-126. Large terms are the risk, so a row whose S passes 2^96 is flagged:
S >= 2^(max_v u_v - c), so that is every row whose target sits > 96 bits = 66 nats below the row's
max, and no row closer than 96 - log2 V bits = 55 nats at V = 151936. Overflow to inf is flagged
too, and below 2^96 the entropy sum A <= 96 S stays finite. Flagged rows are redone after the loop
with c = their exact max (GEMMs of just those rows: on the epilogue path one for the max, one for the
sums). Testing S costs nothing in the loop, where a running max would cost an instruction and a
register per logit. log2 S = -logp / ln2 is
small for likely targets, so logp keeps fp32's relative precision (a shift far from the lse, e.g.
u_y + 64, would cost ~64 * 2^-24 absolute).

16-bit logits (the row-kernel path): x is rounded to 2^-9 of its size, so z_y (size ~|z|) is off by up
to ~|z| 2^-9, and logp with it. Every method that keeps 16-bit logits (naive torch, Liger) has this error in logp;
in the OPD loss it also enters the gradient through ratio = exp(logp - ls) (~6e-3 relative where a
loss linear in logp sees ~2.5e-3). The row program therefore takes u_y as an fp32 dot of h_t and
W[y_t] (2H extra reads per row, ~3 % of the row's bytes at H = 4096) and swaps it into the sum:
S_y = (S - 2^(u_y16 - c)) + 2^(u_y - c), logp = ln2 (u_y - c - log2 S_y) <= 0, so logp is that of
logits where only the target is exact (what is left is the other logits' rounding, p-weighted in
the sum: ~4x smaller). Entropy and p in dx keep the 16-bit logits.

opd_loss with grad. Per token t (mask weight m, sampler / teacher log-probs ls, lt):
    kl = ls - lt,  adv = -kl,  ratio = exp(logp - ls),  loss = -scale * sum_t m ratio adv,
    g  = dloss/dlogp = -scale * m * ratio * adv        (d ratio / d logp = ratio)
The logits gradient dx_v = (g / T)(1[v = y] - p_v) needs S, which is known only at the end of the
row; but with p_v = e_v / S_y (e_v = 2^(u_v - c)) it is a row scale of what the pass already has:

    dx = alpha * e',   alpha = -g / (T S_y),   e'_v = e_v (v != y),   e'_y = e_y - S

so the pass that sums e also stores it in place of x (GEMM 1's epilogue, or the row program over x),
column y last, once S is known (the combine, or the row program's end), and then

    dh = alpha * (e' @ W)        GEMM 2, fp32 out, scaled before its one rounding
    dW += e'^T @ (alpha * h)     GEMM 3, accumulated in fp32 across chunks

Bytes per logit after GEMM 1: none on the epilogue path (e' is what GEMM 1 writes instead of x); one
read and one write in the row program. Backward only multiplies the saved dh, dW by the incoming
scalar: 3 GEMMs in all, the floor. (That scalar is 1 under loss.backward(); any other that is not a power
of 2 rounds 16-bit dh a second time, ~2^-9 relative.) Masked tokens (m = 0) are dropped before any work. The
rounding of alpha * h to bf16 adds ~2^-9 relative error per element to dW's terms (measured by emulation at
T=512, V=16384: dW error 2.3e-3 -> 2.9e-3 vs fp64; naive torch 7.8e-3). Not for fp16: e' and alpha h sit far
below its range (alpha = -g / (T S_y), S_y up to V) until the upstream scalar, a GradScaler's 2^16, arrives in
backward; fp16 takes its gradient in backward through token_logprobs, as plain torch does (4 GEMMs).

token_logprobs cannot know its upstream gradients during forward, so it saves lse and ent, and
its backward recomputes x per chunk (4 GEMMs in all) and writes (bf16: from GEMM 1's epilogue, off the
same fp32 logits the forward summed; else a row program over x), with E = sum_v p_v z_v,

    dx_v = (1/T) * (g_logp (1[v = y] - p_v) - g_ent p_v (z_v - E))      (d ent / d z_v = -p_v (z_v - E))

The kernels work in base 2 (exp2/log2), which is what the hardware computes. Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors (tests); the interpreter's bf16 tl.dot is wrong,
so GEMM 1 upcasts its tiles there (the same products: bf16 x bf16 is exact in fp32). What they compile
to on a GPU (registers, spills, tensor-core instructions, instructions and bytes per load/store in the
hot loop and the epilogue) is read on any machine with `python -m kernels.sass` (a test checks it).
"""
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl
import triton.runtime.interpreter
from triton.tools.tensor_descriptor import TensorDescriptor

from .ref import _check, _check_loss_args, opd_loss_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels below are built for the interpreter
if INTERPRET and not isinstance(tl.standard.sum, triton.runtime.interpreter.InterpretedFunction):
    # triton.language's own jit functions were built for the GPU; interpreted kernels cannot call them
    raise ImportError("TRITON_INTERPRET=1 was set after triton had been imported; set it before Python starts")
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2
# Logits buffer per chunk (<= 2870 rows at V = 151936 bf16: 16384 tokens in 6 chunks). Every chunk costs one
# read-modify-write of the fp32 dW accumulator in GEMM 3 (8 V H bytes: ~1 ms at H = 4096 on an H200), so
# chunks are as large as the memory target allows: peak extra <= 1 GiB + fp32 W.grad at T = 16384, H = 4096.
CHUNK_BYTES = 832 * 2**20
# bf16: GEMM 1 in Triton with the row pass in its epilogue where the GPU allows it (_epilogue); False: cuBLAS + the
# row kernel everywhere (the bench flips it to time both paths in one run)
GEMM_EPILOGUE = True


@triton.jit
def _dlogits(u, col, y, lse2, c_lp, c_ent, e2, HAS_ENT: tl.constexpr):
    """token_logprobs' logits gradient dx = c_lp (1[v = y] - p) - c_ent p (z - E) at the logits u (base 2) of
    columns col, p = 2^(u - lse2); c_lp, c_ent carry the 1/T of dz/dx; z - E = ln2 (u - e2), e2 = E[u]."""
    p = tl.exp2(u - lse2)
    dx = c_lp * (tl.where(col == y, 1.0, 0.0) - p)
    if HAS_ENT:
        dx -= c_ent * p * (u - e2) * 0.6931471805599453
    return dx


@triton.jit
def _write_dx(x_row, V, y, k2, lse2, c_lp, c_ent, e2, HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
    """Overwrite x[0:V] with _dlogits of its logits.

    Blocks go last-first: the end of the row was read most recently, so it may still be in L2.
    """
    cols = tl.arange(0, BLOCK)
    nblk = tl.cdiv(V, BLOCK)
    x_next = tl.load(x_row + (nblk - 1) * BLOCK + cols, mask=(nblk - 1) * BLOCK + cols < V, other=0.0)
    for i in range(0, nblk):
        c = (nblk - 1 - i) * BLOCK + cols
        inb = c < V
        u = x_next.to(tl.float32) * k2
        x_next = tl.load(x_row + c - BLOCK, mask=(c >= BLOCK) & (c - BLOCK < V), other=0.0)  # prefetch the next
        dx = _dlogits(u, c, y, lse2, c_lp, c_ent, e2, HAS_ENT)
        tl.store(x_row + c, dx.to(x_row.dtype.element_ty), mask=inb)


@triton.jit
def _target_logit(h_ptr, stride_h, stride_hk, w_ptr, stride_w, stride_wk, row, y, H, BLOCK_H: tl.constexpr):
    """h[row] . W[y] in fp32 (bf16 products are exact in fp32)."""
    kk = tl.arange(0, BLOCK_H)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    h_row = h_ptr + row.to(tl.int64) * stride_h
    w_row = w_ptr + y.to(tl.int64) * stride_w
    for k0 in range(0, H, BLOCK_H):
        k = k0 + kk
        hv = tl.load(h_row + k * stride_hk, mask=k < H, other=0.0).to(tl.float32)
        wv = tl.load(w_row + k * stride_wk, mask=k < H, other=0.0).to(tl.float32)
        dot += hv * wv
    return tl.sum(dot, 0)


@triton.jit
def _row_outputs(row, x_row, V, y, c, u_y, S, S_y, A, e_y, logp_ptr, ent_ptr, lse2_ptr, alpha_ptr, bad_ptr, ls_ptr,
                 lt_ptr, m_ptr, inv_t, scale, FUSED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """A row's outputs from its sums (base 2, shift c): S = sum_v 2^(u_v - c), A = sum_v 2^(u_v - c) (u_v - c),
    S_y = S with the target's term exact; with FUSED_GRAD, x[y] := e_y - S and the row scale alpha (or, for
    a row to redo, x := 0 and alpha := 0)."""
    bad = tl.log2(S) > LIMIT  # inf too
    # clamps that keep a NaN (a NaN hidden row): min / max on the GPU would return the other operand
    logp = tl.minimum(((u_y - c) - tl.log2(S_y)) * 0.6931471805599453, 0.0, propagate_nan=tl.PropagateNan.ALL)
    ent = tl.maximum(0.6931471805599453 * (tl.log2(S) - A / S), 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(lse2_ptr + row, c + tl.log2(S))
    tl.store(bad_ptr + row, bad.to(tl.float32))
    if FUSED_GRAD:
        ls = tl.load(ls_ptr + row)
        lt = tl.load(lt_ptr + row)
        w = tl.load(m_ptr + row)
        g = -scale * w * tl.exp(logp - ls) * (lt - ls)  # dloss/dlogp = -scale m ratio adv
        if bad:  # e may hold inf: zero the row so that GEMMs 2 and 3 add nothing for it until it is redone
            cols = tl.arange(0, BLOCK)
            for off in range(0, V, BLOCK):
                tl.store(x_row + off + cols, tl.zeros([BLOCK], dtype=x_row.dtype.element_ty), mask=off + cols < V)
            tl.store(alpha_ptr + row, 0.0)
        else:
            # alpha (e_y - S) = (g / T)(1 - p_y); <= 0 as -(the other terms' sum), which the epilogue path's two
            # fp32 values of the target logit (its own, the dot's) could otherwise flip when p_y ~ 1
            tl.store(x_row + y, tl.minimum(e_y - S, 0.0).to(x_row.dtype.element_ty))
            tl.store(alpha_ptr + row, -g * inv_t / S_y)


def _configs():
    """Row-kernel launch configs to autotune over (per V). The interpreter gets one small block so
    that tests cover several column steps (and autotune cannot run several configs there)."""
    if INTERPRET:
        return [triton.Config({"BLOCK": 256}, num_warps=1)]
    # two fp32 accumulators per lane (sum, entropy sum) + a prefetched block: wider blocks want more warps
    return [triton.Config({"BLOCK": b}, num_warps=w)
            for b, w in ((2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 16))]


LIMIT = tl.constexpr(96.0)  # bits: a row whose S = sum 2^(u - c) passes 2^LIMIT is redone with c = its max


# restore_value: autotuning reruns the kernel, and it overwrites x in place.
@triton.autotune(configs=_configs(), key=["V", "FUSED_GRAD", "EXACT_Y", "GIVEN_C"], restore_value=["x_ptr"])
@triton.jit
def _fwd_kernel(
    x_ptr,  # [C, V] logits of this chunk (bf16/fp16/fp32); overwritten with e = 2^(u - c) when FUSED_GRAD
    stride_x,  # row stride of x, in elements
    y_ptr,  # [C] int target token ids
    c_ptr,  # [C] fp32 shift c per row            (read only when GIVEN_C)
    logp_ptr,  # [C] fp32 out: log p(y)
    ent_ptr,  # [C] fp32 out: entropy (nats)
    lse2_ptr,  # [C] fp32 out: log2 sum_v 2^u (saved for token_logprobs' backward)
    alpha_ptr,  # [C] fp32 out: dx = alpha * x_new, row by row (written only when FUSED_GRAD)
    bad_ptr,  # [C] fp32 out: 1 where S passed 2^LIMIT (its outputs are void; redo it)
    ls_ptr,  # [C] fp32 sampler log-probs          (read only when FUSED_GRAD)
    lt_ptr,  # [C] fp32 teacher log-probs          (read only when FUSED_GRAD)
    m_ptr,  # [C] fp32 mask weights, all nonzero  (read only when FUSED_GRAD)
    h_ptr,  # [C, H] hidden states of this chunk   (read only when EXACT_Y)
    stride_h, stride_hk,  # strides of h
    w_ptr,  # [V, H] LM head                       (read only when EXACT_Y)
    stride_w, stride_wk,  # strides of W
    H,  # hidden size
    V,  # vocabulary size
    k2,  # log2(e) / T
    inv_t,  # 1 / T
    scale,  # loss scale (e.g. 1 / number of rollouts)
    FUSED_GRAD: tl.constexpr,  # also turn x into the OPD loss's logits gradient (up to the row scale alpha)
    EXACT_Y: tl.constexpr,  # x is 16-bit: take the target logit from an fp32 dot of h and W[y]
    GIVEN_C: tl.constexpr,  # c comes from c_ptr (the row max), not from the target logit
    BLOCK_H: tl.constexpr,  # hidden elements per step of that dot
    BLOCK: tl.constexpr,  # columns per step
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    y = tl.load(y_ptr + row)
    u_y16 = tl.load(x_row + y).to(tl.float32) * k2  # the very element the pass below sums
    if EXACT_Y:  # x is bf16/fp16: redo the target logit in fp32 (see the module docstring)
        u_y = _target_logit(h_ptr, stride_h, stride_hk, w_ptr, stride_w, stride_wk, row, y, H, BLOCK_H) * k2
    else:
        u_y = u_y16
    if GIVEN_C:
        c = tl.load(c_ptr + row)
    else:
        c = u_y
    # One pass: per lane s = sum 2^(u - c), a = sum 2^(u - c) (u - c); with FUSED_GRAD each
    # block's e = 2^(u - c) replaces x (column y gets its own value after the loop).
    cols = tl.arange(0, BLOCK)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    a = tl.zeros([BLOCK], dtype=tl.float32)
    x_next = tl.load(x_row + cols, mask=cols < V, other=-float("inf"))
    for off in range(0, V, BLOCK):
        col = off + cols
        inb = col < V
        u = x_next.to(tl.float32) * k2
        x_next = tl.load(x_row + col + BLOCK, mask=col + BLOCK < V, other=-float("inf"))  # prefetch: 2 in flight
        d = u - c
        e = tl.exp2(d)  # 0 on padded lanes
        s += e
        a += e * tl.where(inb, d, 0.0)
        if FUSED_GRAD:  # column y too (fixed below): a `col != y` mask would make every store 2 bytes wide
            tl.store(x_row + col, e.to(x_row.dtype.element_ty), mask=inb)
    S = tl.sum(s, 0)
    e16 = tl.exp2(u_y16 - c)
    S_y = (S - e16) + tl.exp2(u_y - c)  # the sum with the target's exact logit swapped in
    if FUSED_GRAD:
        tl.debug_barrier()  # the loop's store to x[y] (another thread's) lands before _row_outputs' store
    _row_outputs(row, x_row, V, y, c, u_y, S, S_y, tl.sum(a, 0), e16, logp_ptr, ent_ptr, lse2_ptr, alpha_ptr, bad_ptr,
                 ls_ptr, lt_ptr, m_ptr, inv_t, scale, FUSED_GRAD, BLOCK)


@triton.autotune(configs=_configs(), key=["V", "HAS_ENT"], restore_value=["x_ptr"])
@triton.jit
def _bwd_kernel(
    x_ptr,  # [C, V] recomputed logits of this chunk; overwritten with dx
    stride_x,  # row stride of x, in elements
    y_ptr,  # [C] int target token ids
    lse2_ptr,  # [C] fp32 log2 sum_v 2^u from the forward
    ent_ptr,  # [C] fp32 entropy (nats) from the forward   (read only when HAS_ENT)
    glp_ptr,  # [C] fp32 upstream gradient of logp
    gent_ptr,  # [C] fp32 upstream gradient of entropy     (read only when HAS_ENT)
    V,  # vocabulary size
    k2,  # log2(e) / T
    inv_t,  # 1 / T
    HAS_ENT: tl.constexpr,  # entropy was used downstream
    BLOCK: tl.constexpr,  # columns per step
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    y = tl.load(y_ptr + row)
    lse2 = tl.load(lse2_ptr + row)
    c_lp = tl.load(glp_ptr + row) * inv_t
    if HAS_ENT:
        c_ent = tl.load(gent_ptr + row) * inv_t
        e2 = lse2 - tl.load(ent_ptr + row) * 1.4426950408889634  # E[u] = lse2 - ent / ln2
    else:
        c_ent = 0.0
        e2 = 0.0
    _write_dx(x_row, V, y, k2, lse2, c_lp, c_ent, e2, HAS_ENT, BLOCK)


def _tma_blocks(nargs):
    """h and W come as TMA tensor descriptors, made before autotuning picks a tile: give them its block shapes."""
    nargs["h_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["w_desc"].block_shape = [nargs["BN"], nargs["BK"]]


def _gemm_configs():
    """GEMM-1 tiles to autotune over (bf16 on sm_90: HGMMA 64xBNx16 from 8 warps, TMA pipelined; they need ~100-200
    KB of shared memory, see _epilogue; `python -m kernels.sass` lists what each compiles to). The interpreter gets
    one small tile."""
    if INTERPRET:
        return [triton.Config({"BM": 32, "BN": 64, "BK": 32}, num_warps=4, pre_hook=_tma_blocks)]
    return [triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_warps=8, num_stages=st, pre_hook=_tma_blocks)
            for bm, bn, st in ((128, 256, 3), (128, 256, 4), (256, 128, 3), (128, 128, 3), (128, 128, 4))]


EPI_BN_MIN = min(c.kwargs["BN"] for c in _gemm_configs())  # partial sums per row: one per BN columns


@triton.jit
def _target_kernel(h_ptr, stride_h, stride_hk, w_ptr, stride_w, stride_wk, y_ptr, c_ptr, H, k2,
                   BLOCK_H: tl.constexpr):
    """c[row] = u_y = k2 * (h[row] . W[y[row]]) in fp32: the shift of the epilogue path (the target's own logit)."""
    row = tl.program_id(0)
    y = tl.load(y_ptr + row)
    u_y = _target_logit(h_ptr, stride_h, stride_hk, w_ptr, stride_w, stride_wk, row, y, H, BLOCK_H) * k2
    tl.store(c_ptr + row, u_y)


@triton.jit
def _mma(a, b, acc, F32_DOT: tl.constexpr):
    """acc + a @ b^T (a [BM, BK], b [BN, BK])."""
    if F32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, tl.trans(b), acc)


# what _gemm_epi_kernel's epilogue makes of a tile of logits
SUMS, MAX, DX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


# Several tiles: x and the partial results are pure outputs, so autotuning's reruns need no restore.
@triton.autotune(configs=_gemm_configs(), key=["V", "H", "EPI", "STORE_E", "HAS_ENT"])
@triton.heuristics({"EVEN_N": lambda a: a["V"] % a["BN"] == 0})
@triton.jit
def _gemm_epi_kernel(
    h_desc,  # [M, H] hidden states of this chunk (bf16), a TMA tensor descriptor: zeros past its edges
    w_desc,  # [V, H] LM head (bf16), a TMA tensor descriptor
    x_ptr, stride_x,  # [M, V] out (bf16): e = 2^(u - c) (SUMS with STORE_E), or dx (DX)
    c_ptr,  # [M] fp32 per row: the shift c (SUMS: u_y from _target_kernel, or the row max), lse2 (DX)
    part_ptr,  # [2, M, >= V / BN] fp32 out per row and tile: SUMS: sum e, sum e (u - c); MAX: max u (plane 0)
    stride_p, plane,  # row stride of a plane of part, and the stride between its two planes
    y_ptr, glp_ptr, gent_ptr, ent_ptr,  # [M] targets, upstream grads of logp / entropy, entropy (read only for DX)
    M, V, H,  # rows, vocabulary, hidden size
    k2,  # log2(e) / T
    inv_t,  # 1 / T
    EPI: tl.constexpr,  # SUMS, MAX or DX
    STORE_E: tl.constexpr,  # SUMS: also keep e (the OPD logits gradient up to its row scale) in x
    HAS_ENT: tl.constexpr,  # DX: the entropy's gradient too
    F32_DOT: tl.constexpr,  # the interpreter's bf16 tl.dot is wrong: upcast there (same products, exact in fp32)
    EVEN_N: tl.constexpr,  # V % BN == 0: no column mask in the epilogue (2 of its ~8 instructions per logit)
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """One [BM, BN] tile of x = h @ W^T; its epilogue works on the fp32 accumulator (u = x k2), where the
    row kernel would have read x back from memory:
      SUMS: the tile's row sums of e = 2^(u - c) and e (u - c), and (STORE_E) e itself in place of x;
      MAX:  the tile's row max of u (for a row whose S overflowed, redone with c = its max);
      DX:   token_logprobs' logits gradient, dx = (g_lp (1[v = y] - p) - g_ent p (z - E)) / T, p = 2^(u - lse2).
    The row tiles of one column tile run back to back: W is read from HBM once per chunk, h stays in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BK)):
        acc = _mma(h_desc.load([pid_m * BM, k * BK]), w_desc.load([pid_n * BN, k * BK]), acc, F32_DOT)
    rowok = rm < M
    colok = tl.full((1, BN), 1, tl.int1) if EVEN_N else (rn < V)[None, :]
    c = tl.load(c_ptr + rm, mask=rowok, other=0.0)[:, None]
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_x + rn[None, :]
    if EPI == MAX:
        tl.store(part_ptr + rm * stride_p + pid_n, tl.max(tl.where(colok, acc * k2, -float("inf")), 1), mask=rowok)
    elif EPI == SUMS:
        d = acc * k2 - c
        e = tl.where(colok, tl.exp2(d), 0.0)
        tl.store(part_ptr + rm * stride_p + pid_n, tl.sum(e, 1), mask=rowok)
        tl.store(part_ptr + plane + rm * stride_p + pid_n, tl.sum(e * tl.where(colok, d, 0.0), 1), mask=rowok)
        if STORE_E:
            tl.store(x_ptrs, e.to(x_ptr.dtype.element_ty), mask=rowok[:, None] & colok)
    else:  # c holds lse2; as _bwd_kernel, per row
        y = tl.load(y_ptr + rm, mask=rowok, other=-1)[:, None]
        c_lp = tl.load(glp_ptr + rm, mask=rowok, other=0.0)[:, None] * inv_t
        c_ent, e2 = 0.0, 0.0
        if HAS_ENT:  # e2 = E[u] = lse2 - ent / ln2
            c_ent = tl.load(gent_ptr + rm, mask=rowok, other=0.0)[:, None] * inv_t
            e2 = c - tl.load(ent_ptr + rm, mask=rowok, other=0.0)[:, None] * 1.4426950408889634
        dx = _dlogits(acc * k2, rn[None, :], y, c, c_lp, c_ent, e2, HAS_ENT)
        tl.store(x_ptrs, dx.to(x_ptr.dtype.element_ty), mask=rowok[:, None] & colok)


@triton.jit
def _combine_kernel(
    part_ptr, stride_p, plane, NT,  # [2, M, >= NT] fp32 partial sums from _gemm_epi_kernel; NT = V / its BN
    x_ptr, stride_x,  # [M, V] e from _gemm_epi_kernel  (read and written only when FUSED_GRAD)
    y_ptr, c_ptr, uy_ptr,  # [M] target ids, fp32 shifts c, fp32 target logits u_y (c = u_y but for rows redone)
    logp_ptr, ent_ptr, lse2_ptr, alpha_ptr, bad_ptr,  # [M] fp32 outputs, as in _fwd_kernel
    ls_ptr, lt_ptr, m_ptr,  # [M] fp32 sampler / teacher log-probs, mask weights (read only when FUSED_GRAD)
    V, inv_t, scale,
    FUSED_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: the sums over the epilogue's tiles, then _row_outputs. The sums took the target's term from
    the same fp32 logits, so S_y = S."""
    row = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    a = tl.zeros([BLOCK_T], dtype=tl.float32)
    p_row = part_ptr + row * stride_p
    for t0 in range(0, NT, BLOCK_T):
        s += tl.load(p_row + t0 + t, mask=t0 + t < NT, other=0.0)
        a += tl.load(p_row + plane + t0 + t, mask=t0 + t < NT, other=0.0)
    S = tl.sum(s, 0)
    c = tl.load(c_ptr + row)
    u_y = tl.load(uy_ptr + row)
    _row_outputs(row, x_ptr + row.to(tl.int64) * stride_x, V, tl.load(y_ptr + row), c, u_y, S, S, tl.sum(a, 0),
                 tl.exp2(u_y - c),
                 logp_ptr, ent_ptr, lse2_ptr, alpha_ptr, bad_ptr, ls_ptr, lt_ptr, m_ptr, inv_t, scale, FUSED_GRAD,
                 BLOCK)


@triton.jit
def _scale_cast_kernel(in_ptr, s_in, sc_in, out_ptr, s_out, sc_out, s_ptr, n_rows, n_cols, PER_ROW: tl.constexpr,
                       NARROW: tl.constexpr, R: tl.constexpr, BC: tl.constexpr):
    """out[r, c] = in[r, c] * s (s = s_ptr[r] if PER_ROW else s_ptr[0]) in out's dtype, one R x BC tile per
    program: one pass, one rounding. torch.mul into a narrower `out` takes PyTorch's generic casting kernel
    at ~half the bandwidth (profiled on an H100: the dW conversion and the row scalings cost 3.6 ms of a
    102 ms call at H = 4096)."""
    r = (tl.program_id(0) * R + tl.arange(0, R)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BC + tl.arange(0, BC))[None, :]
    inb = (r < n_rows) & (c < n_cols)
    s = tl.load(s_ptr + r, mask=r < n_rows) if PER_ROW else tl.load(s_ptr)
    x = tl.load(in_ptr + r * s_in + c * sc_in, mask=inb).to(tl.float32)
    if NARROW:  # 16-bit out: round to nearest even, as torch does (the option only exists for narrowing casts)
        y = (x * s).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    else:  # fp32 / fp64 out (fp64 inputs: computed in fp32, as everything here)
        y = (x * s).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r * s_out + c * sc_out, y, mask=inb)


SCALE_TILE = (64, 256) if INTERPRET else (8, 512)  # rows x columns per program: the interpreter pays per program


def _scale_cast(inp, s, out):
    """out = inp * s for 2-D inp / out (s: [rows], one per row, or a 0-dim tensor); returns out."""
    rows, cols = inp.shape
    R, BC = SCALE_TILE
    if rows:
        _scale_cast_kernel[(triton.cdiv(rows, R), triton.cdiv(cols, BC))](
            inp, inp.stride(0), inp.stride(1), out, out.stride(0), out.stride(1), s, rows, cols,
            PER_ROW=s.dim() == 1, NARROW=out.element_size() < 4, R=R, BC=BC)
    return out


# ----------------------------------------------------------------------------- host side


def _chunk_rows(V, dtype, n, chunk_rows=None):
    """Rows per chunk: as many as CHUNK_BYTES holds, then evened out so that the last chunk is not a
    ragged remainder (16384 tokens at V = 151936 bf16: 6 chunks of 2752 / 2624, not 5 x 2870 + 2034)."""
    if chunk_rows:
        return max(1, min(chunk_rows, n))
    cap = max(1, CHUNK_BYTES // (V * torch.finfo(dtype).bits // 8))
    rows = -(-n // -(-n // cap))  # ceil(n / number of chunks)
    return min(cap, -(-rows // 64) * 64) if rows >= 512 else rows  # GEMM-friendly


def _acc_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)  # dW accumulates in fp32 (fp64 stays fp64)


_F32_OUT_OK = {}


def _f32_out_ok(device):
    """Whether torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=fp32, out=acc) works and is right here
    (CUDA, torch >= 2.8 with fp32 `self`). Checked once per device on a small case."""
    if device not in _F32_OUT_OK:
        ok = False
        if device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                a = torch.randn(40, 24, device=device, generator=g).bfloat16()[:, 3:19]  # strided like dx
                b = torch.randn(40, 8, device=device, generator=g).bfloat16()
                acc = torch.randn(16, 8, device=device, generator=g)
                prod = a.t().float() @ b.float()
                want = acc + prod
                torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
                ok = torch.allclose(acc, want, rtol=1e-3, atol=1e-3)
                acc.fill_(float("nan"))  # beta=0 must ignore what is there
                torch.addmm(acc, a.t(), b, beta=0, out_dtype=torch.float32, out=acc)
                ok = ok and torch.allclose(acc, prod, rtol=1e-3, atol=1e-3)
            except (RuntimeError, TypeError):
                ok = False
            if not ok:
                warnings.warn("torch.addmm(..., out_dtype=float32) is unavailable here (torch < 2.8?): dW accumulates "
                              "through bf16 GEMMs + fp32 adds, which is slower", stacklevel=2)
        _F32_OUT_OK[device] = ok
    return _F32_OUT_OK[device]


def _acc_dw(acc, dx, h, first):
    """acc [V, H] fp32 (+)= dx^T @ h: one cuBLAS GEMM with fp32 output when available; else bf16
    GEMMs over slabs of V, each rounded once before its fp32 add (bounded temporary memory)."""
    beta = 0 if first else 1
    if dx.dtype == acc.dtype:
        torch.addmm(acc, dx.t(), h, beta=beta, out=acc)
    elif _f32_out_ok(acc.device):
        torch.addmm(acc, dx.t(), h, beta=beta, out_dtype=torch.float32, out=acc)
    else:
        for v0 in range(0, acc.shape[0], 16384):
            part = dx[:, v0:v0 + 16384].t() @ h
            if first:
                acc[v0:v0 + 16384].copy_(part)
            else:
                acc[v0:v0 + 16384].add_(part)


def _mm32(a, b, out):
    """out (fp32, or a's dtype when that is wider) = a @ b with one rounding at the end."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    elif _f32_out_ok(a.device):
        torch.addmm(out, a, b, beta=0, out_dtype=torch.float32, out=out)
    else:  # CPU (tests) or torch < 2.8: upcast the operands
        torch.mm(a.float(), b.float(), out=out)


def _gemm_epi(h, weight, x, c, part, k2, epi, store_e=False, dx=None, inv_t=1.0):
    """Launch _gemm_epi_kernel on the rows of h (x: [n, V] output or None; part: [2, >= n, NT] or None;
    dx: None or (targets, g_logp, g_ent or None, ent) for the DX epilogue). Returns how many slots of part per
    row the launch wrote: V / BN of the tile it ran with. Only those are valid: on a key's first launch the
    autotuner runs every tile on these very arguments, so narrower tiles leave sums in further slots."""
    n, H = h.shape
    V = weight.shape[0]
    xo = h if x is None else x  # unwritten when None
    y, glp, gent, ent = dx if dx is not None else (c, c, None, c)  # unread unless DX
    po = part if part is not None else c.view(1, 1, -1)  # unread for DX
    # descriptors get their block shapes from the tile autotuning picks (_tma_blocks)
    hd, wd = (TensorDescriptor.from_tensor(t, [16, 16]) for t in (h, weight))
    _gemm_epi_kernel[lambda cfg: (triton.cdiv(n, cfg["BM"]) * triton.cdiv(V, cfg["BN"]),)](
        hd, wd, xo, xo.stride(0), c, po, po.stride(1), po.stride(0), y, glp, glp if gent is None else gent, ent,
        n, V, H, k2, inv_t, EPI=epi, STORE_E=store_e, HAS_ENT=gent is not None, F32_DOT=INTERPRET)
    return triton.cdiv(V, _gemm_epi_kernel.best_config.kwargs["BN"])  # the config the launch ran (set before it)


def _tma_ok(t):
    """Whether rows of t [rows, H] can be read through TMA descriptors: unit inner stride, rows that do not overlap
    (a descriptor's row stride spans at least its row), 16-byte aligned base and rows, in its gathered copies too
    (rows to redo)."""
    return (t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0
            and all(s * t.element_size() % 16 == 0 for s in (t.stride(0), t.shape[1])))


def _epilogue(hidden, weight):
    """Whether GEMM 1 does the row pass in its epilogue (module docstring): bf16, GEMM_EPILOGUE, TMA-readable h and W,
    and a GPU with TMA and room for the tiles (~100-200 KB of shared memory: sm_90 / sm_100, not sm_80 / 86 / 89 /
    120), or the interpreter. Timed on H100s only; for sm_100 it compiles to tcgen05 MMAs fed by TMA, without spills
    (`python -m kernels.sass --arch 100`, a test), but has never run on one. The tile is autotuned per process, so
    two runs may sum a row's tiles in another order (last-bit differences); GEMM_EPILOGUE = False avoids that."""
    gpu_ok = INTERPRET or (hidden.is_cuda and torch.cuda.get_device_capability(hidden.device)[0] in (9, 10))
    return (hidden.dtype == weight.dtype == torch.bfloat16 and GEMM_EPILOGUE and gpu_ok
            and _tma_ok(hidden) and _tma_ok(weight))


def _head_pass(hs, weight, ys, temperature, chunk_rows, epi, fused=None, need_dh=False, need_dw=False):
    """Loop over token chunks: GEMM 1 and the row pass (in GEMM 1's epilogue when epi, else the row kernel),
    and (fused OPD grad) GEMMs 2 and 3.

    fused: None, or (ls, lt, m, scale) to form the OPD logits gradient in the same pass.
    Returns logp, ent, lse2 (fp32 [M]), dh ([M, H] in the input dtype or None), acc (fp32 [V, H] or None).
    """
    M, H = hs.shape
    V = weight.shape[0]
    dev, dt = hs.device, hs.dtype
    out = torch.empty(5, M, device=dev, dtype=torch.float32)  # logp, ent, lse2, alpha, bad
    dh = torch.empty(M, H, device=dev, dtype=dt) if need_dh else None
    acc = torch.empty(V, H, device=dev, dtype=_acc_dtype(dt)) if need_dw and M else None
    if M == 0:
        return out[0], out[1], out[2], dh, acc
    C = _chunk_rows(V, dt, M, chunk_rows)
    # the logits chunk: forward-only on the epilogue path keeps none (a row to redo gets its own)
    buf = torch.empty(C, V, device=dev, dtype=dt) if fused is not None or not epi else None
    if epi:
        NT = triton.cdiv(V, EPI_BN_MIN)
        part = torch.empty(2, C, NT, device=dev, dtype=torch.float32)
        uy, shift = torch.empty(2, C, device=dev, dtype=torch.float32)
    # one [C, H] scratch for GEMM 2's fp32 output, then (once that is scaled into dh) for alpha * h
    dh32 = torch.empty(C, H, device=dev, dtype=_acc_dtype(dt)) if need_dh or need_dw else None
    h_alpha = dh32.view(dt)[:, :H] if need_dw else None
    k2 = LOG2E / temperature
    ls, lt, m, scale = fused if fused is not None else (out[0], out[0], out[0], 0.0)  # unread when not fused
    block_h = min(1024, triton.next_power_of_2(H))

    def row_pass(rows, o, row_max=False):
        """GEMM 1 and the row pass of chunk `rows` (a slice or an index tensor of tokens) into outputs o [5, n].
        Returns its hidden rows and logits buffer (e' when fused) for grads."""
        h = hs[rows]
        n = h.shape[0]
        x = buf[:n] if buf is not None else None
        hw = (h, h.stride(0), h.stride(1), weight, weight.stride(0), weight.stride(1))
        if epi:  # GEMM 1 with the row pass in its epilogue, then the per-row combine
            u_y = uy[:n]
            _target_kernel[(n,)](*hw, ys[rows], u_y, H, k2, BLOCK_H=block_h)
            c = u_y
            if row_max:  # a row redone: c = its max, from the same fp32 logits
                c = shift[:n]
                nt = _gemm_epi(h, weight, None, c, part, k2, MAX)
                torch.amax(part[0, :n, :nt], 1, out=c)
            nt = _gemm_epi(h, weight, x, c, part, k2, SUMS, store_e=fused is not None)
            xo = h if x is None else x  # unwritten without FUSED_GRAD
            _combine_kernel[(n,)](part, part.stride(1), part.stride(0), nt, xo, xo.stride(0), ys[rows], c, u_y, *o,
                                  ls[rows], lt[rows], m[rows], V, 1.0 / temperature, float(scale),
                                  FUSED_GRAD=fused is not None, BLOCK_T=min(1024, triton.next_power_of_2(nt)),
                                  BLOCK=1024)
        else:
            torch.mm(h, weight.t(), out=x)
            c = x.amax(1).float() * k2 if row_max else o[0]  # c: the shift (module docstring); o[0]: unread
            _fwd_kernel[(n,)](
                x, x.stride(0), ys[rows], c, *o, ls[rows], lt[rows], m[rows], *hw, H, V, k2, 1.0 / temperature,
                float(scale), FUSED_GRAD=fused is not None, EXACT_Y=torch.finfo(dt).bits == 16, GIVEN_C=row_max,
                BLOCK_H=block_h)
        return h, x

    def grads(h, x, alpha, dh_rows, first=False):
        """GEMMs 2 and 3 of a chunk: its dh rows [n, H], and its term of dW."""
        n = h.shape[0]
        if need_dh:  # dx = alpha x: scale GEMM 2's output rows, in fp32 before the one rounding
            _mm32(x, weight, dh32[:n])
            _scale_cast(dh32[:n], alpha, dh_rows)
        if need_dw:  # ... and GEMM 3's h rows (dx^T h = x^T (alpha h))
            _acc_dw(acc, x, _scale_cast(h, alpha, h_alpha[:n]), first)

    for r0 in range(0, M, C):
        rows = slice(r0, min(r0 + C, M))
        h, x = row_pass(rows, out[:, rows])
        if r0 + C >= M:  # how many rows to redo (almost never any): counted behind the last row pass, read below
            redo_count = _count_later(out[4])
        grads(h, x, out[3, rows], dh[rows] if need_dh else None, first=r0 == 0)
    # The second host sync. The count was queued before the last chunk's GEMMs 2 and 3, so the host has it while
    # they run and goes on into backward: a sync after them left the GPU idle for 3 ms between the forward's last
    # kernel and backward's first (H100 profile, v5), a blocking one before them 0.7 ms (run 10).
    redo = torch.nonzero(out[4]).squeeze(1) if redo_count() else out.new_empty(0, dtype=torch.long)
    for i in range(0, redo.numel(), C):
        rows = redo[i:i + C]
        o = torch.empty(5, rows.numel(), device=dev, dtype=torch.float32)
        dh_rows = torch.empty(rows.numel(), H, device=dev, dtype=dt) if need_dh else None
        grads(*row_pass(rows, o, row_max=True), o[3], dh_rows)
        out.index_copy_(1, rows, o)
        if need_dh:
            dh.index_copy_(0, rows, dh_rows)
    return out[0], out[1], out[2], dh, acc


def _count_later(flags):
    """How many flags are nonzero, as a function that waits for the count: on CUDA it is copied to pinned host memory
    behind the kernels queued so far, so the host can queue more work before it waits and the GPU has that to run."""
    n = flags.count_nonzero()
    if not flags.is_cuda:
        return n.item
    host = torch.empty((), dtype=n.dtype, pin_memory=True)
    host.copy_(n, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(flags.device))  # the copy's stream, whichever device is current

    def wait():
        done.synchronize()
        return host.item()
    return wait


def _grad_weight(acc, g, dtype):
    """acc * g (g None: 1) in the weight's dtype, in one pass; acc is ours to consume.

    fp32 acc -> 16-bit: converted in place, into the first half of acc's own storage, so no second
    [V, H] buffer exists at the end (at H = 4096 that was 1.16 GiB on top of the 2.32 GiB acc). The
    returned grad keeps the whole storage alive until it is freed (the usual zero_grad(set_to_none)).
    Rows [i, i + s) of the output overlap no row >= i of the input once s <= i; the first slab goes
    through a small temporary, then slabs double (9 launches at V = 151936).
    """
    if acc.dtype == dtype:
        return acc if g is None else acc.mul_(g)
    V, H = acc.shape
    if acc.element_size() != 2 * torch.empty(0, dtype=dtype).element_size() or not acc.is_contiguous():
        return acc.to(dtype) if g is None else (acc * g).to(dtype)
    out = torch.empty(0, device=acc.device, dtype=dtype).set_(acc.untyped_storage(), 0, (V, H), (H, 1))
    g = torch.ones((), device=acc.device) if g is None else g.float()
    s = min(V, 1024)
    _scale_cast(acc[:s].clone(), g, out[:s])  # a temporary: these rows overlap
    i = s
    while i < V:  # slabs double: each launch runs after the forward's last host sync, so launches are few
        j = min(V, 2 * i)
        _scale_cast(acc[i:j], g, out[i:j])
        i = j
    return out


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_rows):
        epi = _epilogue(hidden, weight)
        logp, ent, lse2, _, _ = _head_pass(hidden, weight, targets, temperature, chunk_rows, epi)
        ctx.save_for_backward(hidden, weight, targets, lse2, ent)
        ctx.temperature, ctx.chunk_rows, ctx.epi = temperature, chunk_rows, epi  # backward: the same logits
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse2, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, H = hidden.shape
        V = weight.shape[0]
        if N == 0 or (g_logp is None and g_ent is None):  # zeros, not None: FSDP2 wants a grad on every rank
            return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                    None, None, None)
        g_logp = torch.zeros_like(lse2) if g_logp is None else g_logp.float().contiguous()
        has_ent = g_ent is not None
        g_ent = g_logp if g_ent is None else g_ent.float().contiguous()  # unread when not has_ent
        dh = torch.empty_like(hidden) if need_dh else None
        acc = torch.empty(V, H, device=hidden.device, dtype=_acc_dtype(hidden.dtype)) if need_dw else None
        C = _chunk_rows(V, hidden.dtype, N, ctx.chunk_rows)
        buf = torch.empty(C, V, device=hidden.device, dtype=hidden.dtype)
        k2, inv_t = LOG2E / ctx.temperature, 1.0 / ctx.temperature
        for r0 in range(0, N, C):
            r1 = min(r0 + C, N)
            x = buf[: r1 - r0]
            if ctx.epi:  # recompute GEMM 1, writing dx from its fp32 accumulator
                _gemm_epi(hidden[r0:r1], weight, x, lse2[r0:r1], None, k2, DX, inv_t=inv_t,
                          dx=(targets[r0:r1], g_logp[r0:r1], g_ent[r0:r1] if has_ent else None, ent[r0:r1]))
            else:  # recompute GEMM 1, then dx in place
                torch.mm(hidden[r0:r1], weight.t(), out=x)
                _bwd_kernel[(r1 - r0,)](x, x.stride(0), targets[r0:r1], lse2[r0:r1], ent[r0:r1], g_logp[r0:r1],
                                        g_ent[r0:r1], V, k2, inv_t, HAS_ENT=has_ent)
            if need_dh:
                torch.mm(x, weight, out=dh[r0:r1])
            if need_dw:
                _acc_dw(acc, x, hidden[r0:r1], first=r0 == 0)
        dw = _grad_weight(acc, None, weight.dtype) if need_dw else None
        return dh, dw, None, None, None


class _OPDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ls, lt, mask, scale, temperature, chunk_rows, need_dh, need_dw):
        N = hidden.shape[0]
        w = mask.float()
        idx = torch.nonzero(w).squeeze(1)  # a host sync: how many tokens are trained
        full = idx.numel() == N
        sel = (lambda t: t) if full else (lambda t: t.index_select(0, idx))
        ls_c, lt_c, w_c = sel(ls), sel(lt), sel(w)
        fused = (ls_c, lt_c, w_c, scale) if (need_dh or need_dw) else None
        logp_c, ent_c, _, dh, acc = _head_pass(sel(hidden), weight, sel(targets), temperature, chunk_rows,
                                               _epilogue(hidden, weight), fused, need_dh, need_dw)
        ratio_c = torch.exp(logp_c - ls_c)
        kl = ls - lt
        loss = scale * (w_c * ratio_c * (ls_c - lt_c)).sum()  # = -scale * sum m ratio adv, adv = -kl
        if full:
            logp, ent, ratio = logp_c, ent_c, ratio_c
        else:  # masked tokens were never computed: they hold 0
            logp, ent, ratio = (torch.zeros(N, device=hidden.device).index_copy_(0, idx, t)
                                for t in (logp_c, ent_c, ratio_c))
        ctx.dh, ctx.acc, ctx.idx, ctx.full = dh, acc, idx, full
        ctx.hidden_shape, ctx.weight_meta, ctx.need_dw = hidden.shape, (weight.shape, weight.dtype), need_dw
        ctx.mark_non_differentiable(logp, ent, ratio, kl)
        ctx.set_materialize_grads(False)  # no zero tensors for the 4 stats' (unused) gradients
        return loss, logp, ent, ratio, kl

    @staticmethod
    def backward(ctx, g, *_):
        if not hasattr(ctx, "dh"):
            raise RuntimeError("opd_loss backward ran twice; its saved gradients are used up by the first "
                               "(do not pass retain_graph=True through opd_loss)")
        dh, acc, idx = ctx.dh, ctx.acc, ctx.idx
        del ctx.dh, ctx.acc
        if g is None:  # the loss was not used (grads are not materialised): nothing flows back
            g = torch.zeros((), device=ctx.idx.device)
        if dh is not None:
            _scale_cast(dh, g.float(), dh)
            if not ctx.full:
                dh = torch.zeros(ctx.hidden_shape, device=dh.device, dtype=dh.dtype).index_copy_(0, idx, dh)
        dw = _grad_weight(acc, g, ctx.weight_meta[1]) if acc is not None else None
        if dw is None and ctx.need_dw:  # every token masked: zeros, not None (FSDP2 wants a grad on every rank)
            dw = torch.zeros(ctx.weight_meta[0], device=g.device, dtype=ctx.weight_meta[1])
        return dh, dw, None, None, None, None, None, None, None, None, None


def token_logprobs_triton(hidden, weight, targets, temperature=1.0, *, chunk_rows=None):
    """Per-token log p(target) and entropy (both fp32 [N]) of softmax(hidden @ weight^T / temperature).

    Differentiable in hidden and weight (through logp and entropy). Forward: one GEMM and one read of
    each logits chunk; backward recomputes the chunk (4 GEMMs in all). logp <= 0 always.
    """
    _check(hidden, weight, targets, temperature)
    return _TokenLogprobs.apply(hidden, weight, targets.contiguous(), float(temperature), chunk_rows)


def opd_loss_triton(hidden, weight, targets, logp_sampler, logp_teacher, mask, scale, temperature=1.0, *,
                    chunk_rows=None):
    """The importance-sampled reverse-KL OPD loss, logits gradient formed in the forward pass.

    loss = -scale * sum_t mask_t * exp(logp_t - logp_sampler_t) * (logp_teacher_t - logp_sampler_t)
    Returns (loss fp32 scalar, stats) with stats = {logp, entropy, ratio, kl}: detached fp32 [N];
    logp / entropy / ratio are 0 where mask == 0 (never computed), kl = logp_sampler - logp_teacher
    everywhere; targets where mask == 0 are never read (any value, e.g. -100). Backward must run once (the saved
    gradients are consumed). fp16 forms the gradient in backward instead (module docstring).
    """
    if hidden.dtype == torch.float16:
        return opd_loss_ref(hidden, weight, targets, logp_sampler, logp_teacher, mask, scale, temperature,
                            logprobs=functools.partial(token_logprobs_triton, chunk_rows=chunk_rows))
    _check_loss_args(targets, logp_sampler, logp_teacher, mask)
    _check(hidden, weight, targets, temperature, used=mask != 0)
    grad = torch.is_grad_enabled()  # needs_input_grad alone does not see torch.no_grad()
    loss, logp, ent, ratio, kl = _OPDLoss.apply(
        hidden, weight, targets.contiguous(), logp_sampler.detach().float().contiguous(),
        logp_teacher.detach().float().contiguous(), mask.detach(), float(scale), float(temperature), chunk_rows,
        grad and hidden.requires_grad, grad and weight.requires_grad)
    return loss, {"logp": logp, "entropy": ent, "ratio": ratio, "kl": kl}
