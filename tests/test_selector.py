"""Selectors: registry, the uniform grid's invariants, and its ONNX form against the torch reference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tops_edge import selector
from tops_edge.errors import InputError
from tops_edge.selector.uniform import UniformGrid


def test_registry_lists_none_and_uniform():
    assert {"none", "uniform"} <= set(selector.available())
    with pytest.raises(InputError, match="unknown selector"):
        selector.get("nope")


@pytest.mark.parametrize("keep", [0, -1, 577, 2.5, True])
def test_check_keep_refuses_out_of_range_or_non_integer(keep):
    with pytest.raises(InputError):
        selector.check_keep(keep, 576)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), data=st.data())
def test_uniform_gives_k_distinct_ascending_in_range_indices(h, w, data):
    k = data.draw(st.integers(1, h * w))
    idx = UniformGrid(h, w).indices(torch.tensor(k)).tolist()
    assert len(idx) == k and idx == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < h * w


@pytest.mark.parametrize("h, w", [(24, 24), (14, 14), (1, 577), (3, 7)])
def test_uniform_keep_all_is_identity(h, w):
    assert UniformGrid(h, w).indices(torch.tensor(h * w)).tolist() == list(range(h * w))


def test_uniform_64_of_24x24_is_an_8x8_lattice():
    idx = UniformGrid(24, 24).indices(torch.tensor(64)).view(8, 8)
    rows, cols = idx // 24, idx % 24
    assert (rows == rows[:, :1]).all() and (cols == cols[:1, :]).all()
    assert rows[:, 0].tolist() == cols[0].tolist() == [1, 4, 7, 10, 13, 16, 19, 22]


def test_uniform_is_batched_and_gathers_the_indexed_tokens():
    feats = torch.randn(3, 576, 8)
    idx, sel = UniformGrid(24, 24)(feats, torch.tensor(50))
    assert idx.shape == (3, 50) and (idx == idx[0]).all()
    assert torch.equal(sel[2], feats[2, idx[2]])


def test_uniform_onnx_graph_equals_torch_for_every_budget(tiny_uniform_dir):
    sess = ort.InferenceSession(str(tiny_uniform_dir / "selector.onnx"), providers=["CPUExecutionProvider"])
    ref = UniformGrid(24, 24)
    feats = np.random.default_rng(0).standard_normal((2, 576, 64)).astype(np.float32)
    for k in range(1, 577):
        idx, sel = sess.run(None, {"image_features": feats, "keep": np.array(k, dtype=np.int64)})
        expected = ref.indices(torch.tensor(k)).numpy()
        assert (idx == expected).all(), k
        assert np.array_equal(sel, feats[:, expected])
