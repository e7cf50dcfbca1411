"""The paper's TOPS greedy as a Triton kernel (plugins/tops_paper_kernel.py), run on the CPU by Triton's
interpreter: its pick order equals tops_paper.tops_order on random cases (duplicates, degenerate
tokens, both norms, the criteria ablations), by hand on three tokens, at K >= N, on near-duplicate
image-like tokens and at LLaVA-1.5's shape.

TRITON_INTERPRET must be set before the kernel is decorated, i.e. before tops_edge.plugins.tops_paper_kernel
is imported (as in test_plugin_kernel).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tops_edge.selector import tops_paper as T

triton = pytest.importorskip("triton")
from tops_edge.plugins.tops_paper_kernel import paper_order_triton, paper_select_triton  # noqa: E402

from feature_fixtures import image_like_tokens  # noqa: E402
from test_selector import make_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# the paper's criteria ablations (test_tops_paper.ABLATIONS), as (relevance weight, alpha, lam)
ABLATIONS = [(1.0, 0.5, 0.5), (0.0, 0.5, 0.5), (1.0, 0.0, 0.5), (1.0, 0.5, 0.0), (1.0, 0.0, 0.0),
             (0.0, 0.0, 0.5), (0.0, 0.5, 0.0), (1.0, 0.5, 1.0)]


def _params(weights, norm):
    relevance, alpha, lam = weights
    return {"alpha": alpha, "lam": lam, "norm": norm, "relevance_weight": relevance}


def _kernel_order(features, relevance, keep, block_j=None, **p):
    sim, r, valid = T.prepare(features, relevance)
    with warnings.catch_warnings():  # inf arithmetic on masked lanes, discarded by where()
        warnings.simplefilter("ignore", RuntimeWarning)
        return paper_order_triton(sim, r, valid, keep, block_j=block_j, **p)


def _check(features, relevance, keep, block_j=None, **p):
    """The kernel's order == tops_order (so its ascending set == tops_select); returns the order."""
    order = _kernel_order(features, relevance, keep, block_j=block_j, **p)
    ref = T.tops_order(features, relevance, keep, **p)
    assert order.dtype == torch.int32 and torch.equal(order.long(), ref), (order.tolist(), ref.tolist())
    return order


@pytest.mark.parametrize("norm", T.NORMS)
def test_kernel_order_equals_tops_order_on_random_cases(norm):
    """18 cases per norm: N 2..40, every budget kind, duplicates (exact ties), NaN / inf / zero rows and
    non-finite relevance, relevance as Stage I's [CLS] attention or Stage II's text raters', at
    times coarse (many exact ties), batches of one or two; the ablations cycle."""
    rng = np.random.default_rng(sum(map(ord, norm)))
    for case in range(18):
        n = int(rng.integers(2, 41))
        keep = int(rng.integers(1, n + 1))
        x = make_inputs(rng, int(rng.integers(1, 3)), n, duplicates=int(rng.integers(0, 4)),
                        degenerate=int(rng.integers(0, 3)))
        features = torch.from_numpy(x["image_features"])
        if case % 3 == 2:  # Stage II: the text raters' attention (NaN where no rater entry is finite)
            text = torch.from_numpy(rng.standard_normal((features.shape[0], 3, features.shape[2])).astype(np.float32))
            relevance = T.text_rater_relevance(features, text, torch.from_numpy(x["text_attention"]))
        else:
            relevance = torch.from_numpy(x["cls_attention"])
            if case % 3 == 1:
                relevance = torch.round(relevance * 4) / 4  # coarse: exact ties in r (NaN, inf stay)
        _check(features, relevance, keep, **_params(ABLATIONS[case % len(ABLATIONS)], norm))


# three unit vectors (lengths 1, 2, 1) with rational cosines: a = (1, 0), b = (.8, .6), c = (0, 1);
# cos(a, b) = .8, cos(a, c) = 0, cos(b, c) = .6; r = (1, .5, 0). The seed is a: m = (1, .8, 0).
#   b: r .5, d = 1 - .8 = .2, c_b = (1 - .8) + (.6 - 0) = .8;   c: r 0, d = 1, c_c = 0 + (1 - 0) = 1
#   min-max: r~ = (1, 0), c~ = (0, 1), d~ = (0, 1);   mean: r~ = (2, 0), c~ = (.89, 1.11), d~ = (.33, 1.67)
# (the SIM_TOL hinge moves c and d by 1e-5; min-max of two values is exactly (0, 1) regardless)
THREE = torch.tensor([[[1.0, 0.0], [1.6, 1.2], [0.0, 1.0]]])
THREE_R = torch.tensor([[1.0, 0.5, 0.0]])


@pytest.mark.parametrize("norm, weights, order", [
    ("minmax", (1.0, 0.5, 0.5), [0, 1, 2]),  # b 1, c .5 + .5 = 1: an exact tie, to the lower index
    ("minmax", (1.0, 0.5, 1.0), [0, 2, 1]),  # b 1, c .5 + 1 = 1.5
    ("minmax", (0.0, 0.5, 0.5), [0, 2, 1]),  # relevance off: b 0, c 1
    ("minmax", (1.0, 0.0, 0.0), [0, 1, 2]),  # relevance only
    ("mean", (1.0, 0.5, 0.5), [0, 1, 2]),    # b 2 + .44 + .17 = 2.61, c .56 + .83 = 1.39
    ("mean", (0.0, 0.5, 0.5), [0, 2, 1]),    # b .61, c 1.39
    ("mean", (1.0, 2.0, 1.0), [0, 2, 1]),    # b 2 + .89 + .67 = 3.56, c 1.11 + 3.33 = 4.44
])
def test_three_tokens_by_hand(norm, weights, order):
    assert _check(THREE, THREE_R, 3, **_params(weights, norm)).tolist() == [order]
    assert _kernel_order(THREE, THREE_R, 2, **_params(weights, norm)).tolist() == [order[:2]]
    sim, r, valid = T.prepare(THREE, THREE_R)
    kept = paper_select_triton(sim, r, valid, 2, **_params(weights, norm))
    assert kept.dtype == torch.int64 and torch.equal(kept, T.tops_select(THREE, THREE_R, 2, **_params(weights, norm)))


@pytest.mark.parametrize("norm, relevance, order", [
    ("minmax", [5.0, -1.0, 1.0, 3e-6], [0, 2, 3, 1]),
    ("mean", [5.0, -1.0, 1.0, 3e-6], [0, 1, 2, 3]),          # mean ~1e-6 of a largest |r| 1: flat
    ("minmax", [5.0, 1.0, 1.0 + 1e-6, 1.0], [0, 1, 2, 3]),  # spread ~1e-6 of its scale: flat
    ("mean", [5.0, 1.0, 1.0 + 1e-6, 1.0], [0, 1, 2, 3]),     # not flat, but r~ differs by ~1e-6 < TIE_TOL
])
def test_near_flat_terms_count_zero(norm, relevance, order):
    """Orthogonal tokens (d and c the same for every candidate), a relevance the kernel takes as given
    (any finite r): after the seed 0 a term whose mean (or spread) is at most NORM_TOL of its largest
    |value| is flat: every score ties and the lowest index wins."""
    f = torch.eye(4).unsqueeze(0)
    assert _check(f, torch.tensor([relevance]), 4, **_params(ABLATIONS[0], norm)).tolist() == [order]


@pytest.mark.parametrize("norm", T.NORMS)
@pytest.mark.parametrize("weights", [ABLATIONS[0], ABLATIONS[1]])
def test_the_seed_is_argmax_r_whatever_the_norm_and_the_relevance_weight(norm, weights):
    g = torch.Generator().manual_seed(5)
    f = torch.randn(1, 6, 8, generator=g)
    r = torch.tensor([[-3.0, -1.0, -2.0, -1.0, -5.0, -4.0]])  # negative: r / mean would rank it backwards
    assert _check(f, r, 3, **_params(weights, norm))[0, 0] == 1  # tied with 3: the lower index


@pytest.mark.parametrize("norm", T.NORMS)
def test_keep_at_least_n_is_the_identity(norm):
    x = make_inputs(np.random.default_rng(3), 2, 9, duplicates=1, degenerate=1)
    f, r = torch.from_numpy(x["image_features"]), torch.from_numpy(x["cls_attention"])
    for keep in (9, 20):
        order = _check(f, r, keep, **_params(ABLATIONS[0], norm))
        assert order.shape == (2, 9) and torch.equal(order.long().sort(1).values, torch.arange(9).expand(2, 9))
    assert _check(f, r, 0, **_params(ABLATIONS[0], norm)).shape == (2, 1)  # as tops_order: the seed alone


def test_degenerate_tokens_come_after_every_valid_one_lowest_index_first():
    g = torch.Generator().manual_seed(4)
    f, r = torch.randn(1, 12, 8, generator=g), torch.randn(1, 12, generator=g)  # signed: mean-normalised scores < -1
    f[0, 2], f[0, 7, 3], r[0, 5] = 0.0, float("inf"), float("nan")  # zero row, non-finite row, relevance
    r[0, 9] = 10.0  # the most relevant, and degenerate: still not the seed
    f[0, 9, 0] = float("nan")
    for norm in T.NORMS:
        order = _check(f, r, 12, **_params(ABLATIONS[0], norm))[0].tolist()
        assert order[-4:] == [2, 5, 7, 9]
    f[:] = 0.0  # every token degenerate: the lowest indices
    assert _check(f, r, 5, **_params(ABLATIONS[0], "minmax"))[0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("norm", T.NORMS)
def test_near_duplicate_image_like_tokens(norm):
    """Median cosine ~0.9996 (feature_fixtures): the regime where flat terms and the hinges decide."""
    image, _ = image_like_tokens(12, seed=1, hidden=16)
    relevance = torch.from_numpy(np.random.default_rng(1).random((1, 144)).astype(np.float32)) / 144
    order = _check(torch.from_numpy(image), relevance, 40, **_params(ABLATIONS[0], norm))
    assert len(set(order[0].tolist())) == 40


def test_llava_shaped_case():
    """LLaVA-1.5: N = 576 tokens, K = 128 (Stage I's 2T at T = 64), [CLS]-attention-sized relevance."""
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.standard_normal((1, 576, 64)).astype(np.float32))
    r = torch.from_numpy(rng.random((1, 576)).astype(np.float32)) / 576
    _check(f, r, 128, block_j=256, **_params(ABLATIONS[0], "minmax"))


AOT_CHECK = r"""
from tops_edge.plugins.aot import assemble, compile_paper_select, entry_params, PAPER_KERNEL_ARGS
for norm in ("minmax", "mean"):
    c = compile_paper_select(576, alpha=0.5, lam=0.5, relevance_weight=1.0, norm=norm, arch=87)
    assert len(entry_params(c.ptx, c.name)) == len(PAPER_KERNEL_ARGS), entry_params(c.ptx, c.name)
    assert "fma." not in c.ptx and "div.full" not in c.ptx  # no contraction, IEEE divisions: torch's rounding
    assemble(c.ptx, 87)
print("OK", c.name, c.num_warps, c.shared_mem, c.block_n, c.block_k)
"""


def test_aot_kernel_compiles_to_ptx_with_tensorrts_argument_list_for_orin():
    """What tops::PaperSelect's aot_impl hands TensorRT: PTX whose entry takes exactly the plugin's
    arguments, accepted by NVIDIA's assembler for sm_87 (Jetson Orin). Compiled here, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OK tops_paper_kernel")
