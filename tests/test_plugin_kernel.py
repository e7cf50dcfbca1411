"""dpp-merge::Select: the plugin's torch semantics equal the selector reference, and the Triton kernel
(run on the CPU by Triton's interpreter) equals them, greedy order included, for every kind of budget.

TRITON_INTERPRET must be set before the kernel is decorated, i.e. before tops_edge.plugins.kernel
is imported; nothing else in the suite uses Triton. The AOT test compiles in a subprocess without it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
import warnings

import pytest
import torch

from tops_edge.plugins.reference import kept_from_order, plugin_inputs, select_order
from tops_edge.selector.dpp import dpp_select

triton = pytest.importorskip("triton")
from tops_edge.plugins.kernel import select_order_triton  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
METHODS = {"dpp-merge": dict(alpha=0.5, beta=0.5, sign=1.0), "cdpruner": dict(alpha=0.5, beta=0.0, sign=-1.0)}


def _inputs(n: int, seed: int, batch: int = 2, vision: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 24, generator=g)
    q = torch.randn(batch, 5, 24, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.int64)
    mask[:, -1] = 0  # a padded instruction slot
    vf = torch.randn(batch, n, 16, generator=g) if vision else None
    return x, q, mask, vf


def _kernel(s, c, v, keep, block_k=None, **p):
    with warnings.catch_warnings():  # log(0) and friends on masked lanes, discarded by where()
        warnings.simplefilter("ignore", RuntimeWarning)
        return select_order_triton(s, c, v, keep, block_k=block_k, **p)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("vision", [True, False])
def test_plugin_semantics_equal_the_selector_reference_for_every_budget(method, vision):
    x, q, mask, vf = _inputs(33, seed=1, vision=vision)
    s, c, v = plugin_inputs(x, q, mask, vf)
    p = METHODS[method]
    for keep in range(1, 34):
        order = select_order(s, c, v, keep, **p)
        assert torch.equal(kept_from_order(order, keep), dpp_select(x, q, mask, keep, vision_features=vf, **p))
        assert (order[:, keep:] == -1).all()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("keep", [1, 2, 7, 20, 40])
def test_kernel_equals_the_reference_order(method, keep):
    x, q, mask, vf = _inputs(40, seed=2)
    s, c, v = plugin_inputs(x, q, mask, vf)
    p = METHODS[method]
    assert torch.equal(_kernel(s, c, v, keep, **p), select_order(s, c, v, keep, **p))


@pytest.mark.parametrize("method", list(METHODS))
def test_kernel_with_duplicate_tokens_and_degenerate_rows(method):
    x, q, mask, vf = _inputs(24, seed=3)
    x[:, 5], vf[:, 5] = x[:, 2], vf[:, 2]  # exact duplicates: ties go to the lower index
    x[:, 9], vf[:, 9] = x[:, 2], vf[:, 2]
    x[0, 3] = float("nan")  # degenerate rows: never chosen over a finite one
    vf[1, 7] = 0.0
    x[1, 11] = float("inf")
    s, c, v = plugin_inputs(x, q, mask, vf)
    p = METHODS[method]
    for keep in (1, 6, 21, 24):  # 24 = N: past the valid tokens, exhausted and degenerate ones come last
        order = _kernel(s, c, v, keep, **p)
        assert torch.equal(order, select_order(s, c, v, keep, **p))
        assert torch.equal(kept_from_order(order, keep), dpp_select(x, q, mask, keep, vision_features=vf, **p))
    assert 3 not in order[0, :21].tolist() and 7 not in order[1, :21].tolist()


def test_kernel_with_every_row_degenerate_keeps_the_lowest_indices():
    x, q, mask, vf = _inputs(16, seed=4, batch=1)
    x[:] = 0.0
    s, c, v = plugin_inputs(x, q, mask, vf)
    order = _kernel(s, c, v, 5, **METHODS["dpp-merge"])
    assert order[0, :5].tolist() == [0, 1, 2, 3, 4] and torch.equal(order, select_order(s, c, v, 5, **METHODS["dpp-merge"]))


@pytest.mark.parametrize("method, n, keep, block_k", [("cdpruner", 576, 128, 64), ("dpp-merge", 576, 64, 256), ("cdpruner", 2880, 64, 64)])
def test_kernel_at_llava_sizes(method, n, keep, block_k):
    """LLaVA-1.5's 576 tokens, and LLaVA-NeXT's 2880 in one global budget."""
    x, q, mask, vf = _inputs(n, seed=5, batch=1)
    s, c, v = plugin_inputs(x, q, mask, vf)
    p = METHODS[method]
    order = _kernel(s, c, v, keep, block_k=block_k, **p)
    assert torch.equal(order, select_order(s, c, v, keep, **p))
    assert torch.equal(kept_from_order(order, keep), dpp_select(x, q, mask, keep, vision_features=vf, **p))


AOT_CHECK = r"""
from tops_edge.plugins.aot import assemble, compile_select, entry_params, KERNEL_ARGS
c = compile_select(576, alpha=0.5, beta=0.5, sign=1.0, arch=87)
assert len(entry_params(c.ptx, c.name)) == len(KERNEL_ARGS), entry_params(c.ptx, c.name)
assemble(c.ptx, 87)
print("OK", c.name, c.num_warps, c.shared_mem, c.block_n, c.block_k)
"""


def test_aot_kernel_compiles_to_ptx_with_tensorrts_argument_list_for_orin():
    """What aot_impl hands TensorRT: PTX whose entry takes exactly the plugin's arguments, and
    which NVIDIA's assembler accepts for sm_87 (Jetson Orin). Compiled here, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run([sys.executable, "-c", AOT_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OK tops_select_kernel")


def test_kernel_on_image_like_tokens_keeps_k_distinct_and_agrees_with_the_spatial_factor():
    """Image-like tokens (near low rank, see feature_fixtures), where the torch and ONNX forms' coverage
    term once rounded c_i below 0 and picked token 0 again (test_selector reproduces it); the kernel has
    the same c_i >= d_i^2 guard. With the spatial factor the kernel, the plugin semantics and
    dpp_select agree on the order; without it only K distinct tokens is asserted (past the kernel's
    rank the exhaustion floor is decided by rounding)."""
    from feature_fixtures import image_like_tokens

    image, vision = (torch.from_numpy(a) for a in image_like_tokens(12, seed=0, width=16, hidden=24))
    q = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(1, 5, dtype=torch.int64)
    p = METHODS["dpp-merge"]
    for spatial in (0.0, 1.0):
        for keep in (8, 40):
            s, c, v = plugin_inputs(image, q, mask, vision, spatial=spatial, grid=(12, 12), keep=keep)
            order = _kernel(s, c, v, keep, **p)
            kept = kept_from_order(order, keep)
            assert len(set(kept[0].tolist())) == keep
            if spatial:
                assert torch.equal(order, select_order(s, c, v, keep, **p))
                assert torch.equal(kept, dpp_select(image, q, mask, keep, vision_features=vision, spatial=spatial,
                                                    grid=(12, 12), **p))
