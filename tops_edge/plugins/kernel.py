"""The Triton kernel of `tops::Select`: one program per image, N lanes, K greedy steps.

It computes exactly what reference.select_order computes (selector/dpp.py's greedy on
L = diag(w) S diag(w)), with the same scores, exhausted / degenerate handling and ties to the lowest
index within TIE_TOL. L is never stored: row j is w_j S_j w, read from S when needed. The Cholesky
columns C (one row of `chol` per step, [B,N,N] scratch) live in global memory; C^T C products run
over BLOCK_K rows at a time. alpha, beta and the sign are compile-time constants (TensorRT does not
serialize an AOT plugin's attributes, so they are baked into the compiled kernel instead).

Kernel arguments follow TensorRT's AOT plugin convention: input pointers, int32 scalars, output
pointers (see qdp.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..selector import dpp

_EXHAUSTED_REL = tl.constexpr(dpp.EXHAUSTED_REL)
_EXHAUSTED = tl.constexpr(dpp.EXHAUSTED)
_INVALID = tl.constexpr(dpp.INVALID)
_MINMAX_EPS = tl.constexpr(dpp.MINMAX_EPS)
_TIE_TOL = tl.constexpr(dpp.TIE_TOL)


@triton.jit
def _weights(cos_ptr, valid_ptr, idx, mask, lo, hi, ALPHA: tl.constexpr, SIGN: tl.constexpr):
    """w = exp(alpha * (sign cos - lo) / (hi - lo + eps)) at `idx`, 0 on invalid or masked tokens."""
    valid = (tl.load(valid_ptr + idx, mask=mask, other=0) != 0) & mask
    raw = SIGN * tl.load(cos_ptr + idx, mask=mask, other=0.0)
    r = tl.where(valid, (raw - lo) / (hi - lo + _MINMAX_EPS), 0.0)
    return tl.where(valid, tl.exp(ALPHA * r), 0.0), valid


@triton.jit
def tops_select_kernel(sim_ptr, cos_ptr, valid_ptr, keep_ptr, n, order_ptr, chol_ptr,
                       ALPHA: tl.constexpr, BETA: tl.constexpr, SIGN: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_N)
    live = lanes < n
    sim = sim_ptr + b * n * n
    chol = chol_ptr + b * n * n
    cos = cos_ptr + b * n
    vld = valid_ptr + b * n
    order = order_ptr + b * n
    steps = tl.minimum(tl.maximum(tl.load(keep_ptr), 0), n)
    tl.store(order + lanes, -1, mask=live & (lanes >= steps))

    # relevance: min-max of sign * cos over the valid tokens, then w
    valid0 = (tl.load(vld + lanes, mask=live, other=0) != 0) & live
    raw0 = SIGN * tl.load(cos + lanes, mask=live, other=0.0)
    lo = tl.min(tl.where(valid0, raw0, float("inf")), 0)
    hi = tl.max(tl.where(valid0, raw0, float("-inf")), 0)
    w, valid = _weights(cos, vld, lanes, live, lo, hi, ALPHA, SIGN)

    d = (w * tl.load(sim + lanes * n + lanes, mask=live, other=0.0)) * w  # diag(L)
    floor = _EXHAUSTED_REL * d
    penalty = tl.where(valid, 0.0, _INVALID)
    penalty = tl.where(live, penalty, float("-inf"))
    c = tl.zeros([BLOCK_N], dtype=tl.float32)
    if BETA != 0.0:  # column energies of L: c_i = sum_k L_ki^2
        for k0 in range(0, n, BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            rm = rows < n
            wk, _ = _weights(cos, vld, rows, rm, lo, hi, ALPHA, SIGN)
            s = tl.load(sim + rows[:, None] * n + lanes[None, :], mask=rm[:, None] & live[None, :], other=0.0)
            lk = (wk[:, None] * s) * w[None, :]
            c += tl.sum(lk * lk, 0)

    for t in range(0, steps):
        if BETA == 0.0:
            gain = tl.log(d)
        else:
            gain = (1.0 - BETA) * tl.log(d) + BETA * tl.log(tl.maximum(c, d * d))  # c_i >= d_i^2; rounding can break it
        score = tl.where(d > floor, gain, _EXHAUSTED) + penalty
        best = tl.max(score, 0)
        j = tl.min(tl.where(score >= best - _TIE_TOL, lanes, BLOCK_N), 0)  # lowest index within TIE_TOL
        at_j = lanes == j
        dj = tl.sum(tl.where(at_j, d, 0.0), 0)
        fj = tl.sum(tl.where(at_j, floor, 0.0), 0)
        wj = tl.sum(tl.where(at_j, w, 0.0), 0)

        # R[j, :] = L[j, :] - C[:, j]^T C over the t columns so far
        row = (wj * tl.load(sim + j * n + lanes, mask=live, other=0.0)) * w
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, t, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < t
            ck = tl.load(chol + ks[:, None] * n + lanes[None, :], mask=km[:, None] & live[None, :], other=0.0)
            cj = tl.load(chol + ks * n + j, mask=km, other=0.0)
            acc += tl.sum(cj[:, None] * ck, 0)
        ok = dj > fj
        e = tl.where(ok, tl.div_rn(row - acc, tl.sqrt_rn(tl.where(ok, dj, 1.0))), 0.0)
        e = tl.where(live, e, 0.0)
        tl.store(chol + t * n + lanes, e, mask=live)
        tl.debug_barrier()  # row t of C is read back below and in the next step, across threads

        if BETA != 0.0:  # c_i <- |R_i - e e_i|^2 with R e = L e - C^T (C e)
            le = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, n, BLOCK_K):
                rows = k0 + tl.arange(0, BLOCK_K)
                rm = rows < n
                wk, _ = _weights(cos, vld, rows, rm, lo, hi, ALPHA, SIGN)
                s = tl.load(sim + rows[:, None] * n + lanes[None, :], mask=rm[:, None] & live[None, :], other=0.0)
                ek = tl.load(chol + t * n + rows, mask=rm, other=0.0)
                le += tl.sum(ek[:, None] * ((wk[:, None] * s) * w[None, :]), 0)
            cte = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, t, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                km = ks < t
                ck = tl.load(chol + ks[:, None] * n + lanes[None, :], mask=km[:, None] & live[None, :], other=0.0)
                ce = tl.sum(ck * e[None, :], 1)
                cte += tl.sum(ce[:, None] * ck, 0)
            sq = tl.sum(e * e, 0)
            c = c - e * (2.0 * (le - cte) - sq * e)
        d = d - e * e
        penalty = tl.where(at_j, float("-inf"), penalty)
        tl.store(order + t, j)


def block_sizes(n: int, block_k: int | None = None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): N lanes rounded up to a power of two; BLOCK_K rows of C per tile."""
    block_n = triton.next_power_of_2(max(int(n), 16))
    return block_n, block_k or max(1, min(16, 8192 // block_n))


def default_num_warps(block_n: int) -> int:
    """About 128 lanes per warp (8 warps at N = 576, 16 at 2880); chosen, not tuned on a GPU."""
    return max(4, min(16, block_n // 128))


def launch_select(similarity, cosine, valid, keep, order, chol, *, alpha: float, beta: float, sign: float,
                  block_k: int | None = None, num_warps: int | None = None) -> None:
    """One launch on preallocated tensors (keep: int32 [1] on the device; order int32 [B,N]; chol
    float32 [B,N,N], needs no initialisation: the kernel reads only rows it wrote)."""
    b, n = cosine.shape
    block_n, bk = block_sizes(n, block_k)
    tops_select_kernel[(b,)](
        similarity, cosine, valid, keep, n, order, chol,
        ALPHA=float(alpha), BETA=float(beta), SIGN=float(sign), BLOCK_N=block_n, BLOCK_K=bk,
        num_warps=num_warps or default_num_warps(block_n), enable_fp_fusion=False,
    )


def select_order_triton(similarity, cosine, valid, keep: int, *, alpha: float, beta: float, sign: float,
                        block_k: int | None = None):
    """The kernel on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1): [B,N] int32 order."""
    import torch

    b, n = cosine.shape
    dev = cosine.device
    order = torch.empty((b, n), dtype=torch.int32, device=dev)
    chol = torch.empty((b, n, n), dtype=torch.float32, device=dev)
    keep_t = torch.tensor([int(keep)], dtype=torch.int32, device=dev)
    launch_select(similarity.float().contiguous(), cosine.float().contiguous(), valid.to(torch.int32).contiguous(),
                  keep_t, order, chol, alpha=alpha, beta=beta, sign=sign, block_k=block_k)
    return order
