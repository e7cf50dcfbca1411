"""The Triton kernel of the paper's TOPS greedy (selector/tops_paper.py): one program per image, N lanes.

It computes exactly what tops_paper.tops_order computes from tops_paper.prepare's outputs (the cosine
similarity S [B,N,N], the sanitised relevance r [B,N], the validity [B,N]), step for step in fp32:
  seed      argmax over the valid tokens of r min-max normalised over them (whatever the norm and w_r)
  each step cand = valid and not kept;  m_j = max over kept k of S[k, j]  (a register vector)
            d_i = max(0, (1 - m_i) - SIM_TOL)
            c_i = sum over j in cand of max(0, (S[i, j] - m_j) - SIM_TOL)
            score = (w_r r~ + lam c~) + alpha d~, ~ = tops_paper.normalise over cand (min-max or mean,
                    a flat term is 0 by the NORM_TOL rule)
            j = the lowest index within TIE_TOL of the best of where(cand, score, penalty)
where penalty is 0 for a candidate, dpp.INVALID for a degenerate token not kept and -inf once kept
(and on padding lanes), so degenerate tokens come only after every valid one, lowest index first.

Cost per step: one pass over S for c (N^2 loads, ~4 N^2 flops), O(N) for the rest; O(K N^2) in all.
Lane i owns row i of S: the coverage pass reads S in [N, BLOCK_J] column tiles and sums along the
tile inside each lane, with no cross-lane reduction; the column values mc_j (m_j for a candidate,
+inf for any other token, whose hinged gain is then exactly 0) go through a [B,N] fp32 scratch
output, written once per step. A weight that is 0 skips its term (lam = 0 skips the coverage pass;
the reference adds 0 * x there, the same score). Divisions are IEEE (`div_rn`) and FMA contraction
is off (`enable_fp_fusion=False`), so only the coverage and mean sums round differently from torch's
(another summation order), in their last bits, far below the tolerances.

alpha, lam, w_r and the norm are compile-time constants, as in kernel.py (an AOT plugin's
attributes are not serialized). Kernel arguments follow TensorRT's AOT plugin convention: input
pointers, int32 scalars, output pointers. The order output is [B,N] int32 (a static shape for
TensorRT): the first min(max(K, 1), N) entries are the picks in order, the rest -1 (tops_order always
takes the seed, so K <= 0 picks one token, as there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..selector import dpp, tops_paper
from .kernel import default_num_warps

_INVALID = tl.constexpr(dpp.INVALID)
_TIE_TOL = tl.constexpr(dpp.TIE_TOL)
_SIM_TOL = tl.constexpr(tops_paper.SIM_TOL)
_NORM_TOL = tl.constexpr(tops_paper.NORM_TOL)


@triton.jit
def _normalise(x, cand, MEAN: tl.constexpr):
    """tops_paper.normalise: `x` over the candidates, 0 for a flat term (meaningless off `cand`)."""
    if MEAN:
        count = tl.sum(cand.to(tl.float32), 0)
        mean = tl.div_rn(tl.sum(tl.where(cand, x, 0.0), 0), tl.maximum(count, 1.0))
        big = tl.max(tl.where(cand, tl.abs(x), 0.0), 0)
        out = tl.where(tl.abs(mean) > _NORM_TOL * big, tl.div_rn(x, tl.where(mean != 0.0, mean, 1.0)), 0.0)
    else:
        lo = tl.min(tl.where(cand, x, float("inf")), 0)
        hi = tl.max(tl.where(cand, x, float("-inf")), 0)
        spread = hi - lo
        scale = tl.maximum(tl.abs(lo), tl.abs(hi))
        flat = spread > _NORM_TOL * scale
        out = tl.where(flat, tl.div_rn(x - tl.where(flat, lo, 0.0), tl.where(flat, spread, 1.0)), 0.0)
    return out


@triton.jit
def _argmax_first(score, lanes, BLOCK_N: tl.constexpr):
    """dpp.argmax_first: the lowest lane within TIE_TOL of the maximum."""
    best = tl.max(score, 0)
    return tl.min(tl.where(score >= best - _TIE_TOL, lanes, BLOCK_N), 0)


@triton.jit
def tops_paper_kernel(sim_ptr, r_ptr, valid_ptr, keep_ptr, n, order_ptr, mc_ptr,
                      ALPHA: tl.constexpr, LAM: tl.constexpr, W_R: tl.constexpr, MEAN: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_N)
    live = lanes < n
    sim = sim_ptr + b * n * n
    order = order_ptr + b * n
    mc = mc_ptr + b * n
    steps = tl.minimum(tl.maximum(tl.load(keep_ptr), 1), n)
    tl.store(order + lanes, -1, mask=live & (lanes >= steps))

    valid = (tl.load(valid_ptr + b * n + lanes, mask=live, other=0) != 0) & live
    r = tl.load(r_ptr + b * n + lanes, mask=live, other=0.0)
    penalty = tl.where(valid, 0.0, _INVALID)
    penalty = tl.where(live, penalty, float("-inf"))

    # the seed: argmax of r min-max normalised over the valid tokens, whatever the norm and w_r
    j = _argmax_first(tl.where(valid, _normalise(r, valid, False), penalty), lanes, BLOCK_N)
    penalty = tl.where(lanes == j, float("-inf"), penalty)
    m = tl.load(sim + j * n + lanes, mask=live, other=0.0)
    tl.store(order, j)

    for t in range(1, steps):
        cand = penalty == 0.0
        score = tl.zeros([BLOCK_N], dtype=tl.float32)
        if W_R != 0.0:
            score = W_R * _normalise(r, cand, MEAN)
        if LAM != 0.0:  # coverage: c_i = sum_j gain(S[i, j], mc_j) over column tiles, no cross-lane reduction
            tl.debug_barrier()  # the previous step's reads of mc are done
            tl.store(mc + lanes, tl.where(cand, m, float("inf")), mask=live)  # +inf: j adds exactly 0
            tl.debug_barrier()  # mc is read back below across threads
            c = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j0 in range(0, n, BLOCK_J):
                cols = j0 + tl.arange(0, BLOCK_J)
                cm = cols < n
                mj = tl.load(mc + cols, mask=cm, other=float("inf"))
                s = tl.load(sim + lanes[:, None] * n + cols[None, :], mask=live[:, None] & cm[None, :], other=0.0)
                c += tl.sum(tl.maximum((s - mj[None, :]) - _SIM_TOL, 0.0), 1)
            score = score + LAM * _normalise(c, cand, MEAN)
        if ALPHA != 0.0:
            d = tl.maximum((1.0 - m) - _SIM_TOL, 0.0)
            score = score + ALPHA * _normalise(d, cand, MEAN)
        j = _argmax_first(tl.where(cand, score, penalty), lanes, BLOCK_N)
        penalty = tl.where(lanes == j, float("-inf"), penalty)
        m = tl.maximum(m, tl.load(sim + j * n + lanes, mask=live, other=0.0))
        tl.store(order + t, j)


def block_sizes(n: int, block_j: int | None = None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_J): N lanes rounded up to a power of two; BLOCK_J columns of S per coverage tile."""
    block_n = triton.next_power_of_2(max(int(n), 16))
    return block_n, block_j or max(1, min(16, 8192 // block_n))


def paper_constexprs(alpha: float, lam: float, relevance_weight: float, norm: str) -> dict:
    """The kernel's compile-time parameters (checked as tops_paper.check_params checks them)."""
    if norm not in tops_paper.NORMS:
        raise ValueError(f"norm must be one of {', '.join(tops_paper.NORMS)}, got {norm!r}")
    weights = {"ALPHA": float(alpha), "LAM": float(lam), "W_R": float(relevance_weight)}
    for name, value in weights.items():
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"{name.lower()} must be a finite number >= 0, got {value}")
    return weights | {"MEAN": int(norm == "mean")}


def launch_paper_select(similarity, relevance, valid, keep, order, scratch, *, alpha: float, lam: float,
                        relevance_weight: float = 1.0, norm: str = "minmax", block_j: int | None = None,
                        num_warps: int | None = None) -> None:
    """One launch on preallocated tensors: similarity float32 [B,N,N], relevance float32 [B,N],
    valid int32 [B,N], keep int32 [1] on the device; order int32 [B,N] (written in full), scratch
    float32 [B,N] (needs no initialisation: the kernel reads only what it wrote)."""
    b, n = relevance.shape
    block_n, bj = block_sizes(n, block_j)
    tops_paper_kernel[(b,)](
        similarity, relevance, valid, keep, n, order, scratch,
        **paper_constexprs(alpha, lam, relevance_weight, norm), BLOCK_N=block_n, BLOCK_J=bj,
        num_warps=num_warps or default_num_warps(block_n), enable_fp_fusion=False,
    )


def paper_order_triton(similarity, relevance, valid, keep: int, *, alpha: float, lam: float,
                       relevance_weight: float = 1.0, norm: str = "minmax", block_j: int | None = None):
    """The kernel on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1), inputs as
    tops_paper.prepare returns them: [B, min(max(K, 1), N)] int32, the picks in order (= tops_order)."""
    import torch

    b, n = relevance.shape
    dev = relevance.device
    order = torch.empty((b, n), dtype=torch.int32, device=dev)
    scratch = torch.empty((b, n), dtype=torch.float32, device=dev)
    keep_t = torch.tensor([int(keep)], dtype=torch.int32, device=dev)
    launch_paper_select(similarity.float().contiguous(), relevance.float().contiguous(),
                        valid.to(torch.int32).contiguous(), keep_t, order, scratch, alpha=alpha, lam=lam,
                        relevance_weight=relevance_weight, norm=norm, block_j=block_j)
    return order[:, : max(1, min(int(keep), n))]


def paper_select_triton(similarity, relevance, valid, keep: int, **params):
    """[B, K'] int64 kept indices, ascending (= tops_paper.tops_select); `params` as paper_order_triton."""
    return paper_order_triton(similarity, relevance, valid, keep, **params).long().sort(1).values
