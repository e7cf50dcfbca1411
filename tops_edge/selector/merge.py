"""Token merging after selection: what the dropped visual tokens leave behind in the kept ones.

A selector keeps K of N visual tokens. With `merge = "mean"` every dropped token is assigned to the
kept token whose projected feature is most similar (cosine), each kept token becomes the mean of its
group (itself included) and carries the group's size n. The decoder adds log(n) to the attention
logits of that cached token in every layer and head (its `attention_bias` input), so the token
weighs in every softmax as n identical tokens would: proportional attention, as in ToMe (Bolya et
al., 2023) for ViTs. The KV cache still holds K tokens.

Every exported selector graph computes the merge after its selection (`add_merge_outputs`: standard
ONNX ops, so it runs after the TensorRT plugin too); `merge_dropped` is its numpy reference. The
runtime reads the graph's `merged_features` / `kept_sizes` when its merge setting is "mean".

Why: a pruned sequence changes the share of attention each kind of content gets, and a model that
counts by area (the ShapesVQA model does) then miscounts. First probe (test split, K = 64, dpp-merge (then named tops) with
spatial 1, 40-50 count questions a run): counting at 48% with selection alone, 72% with the log-size
bias alone, 55% with averaging alone, at the unpruned level with both. The full table is in the
docs/fidelity.md.
`merge = "none"` keeps the selected tokens as they are (the selection-only baselines' setting).
"""

from __future__ import annotations

import numpy as np

MERGES = ("mean", "none")


def merge_dropped(features: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, D] of one selection group, kept [K] ascending indices into it ->
    (merged [K, D]: the mean of each kept token's group, sizes [K] int64: the group sizes, >= 1,
    summing to N). A dropped token joins the kept token of highest cosine similarity (the first on
    ties); a kept token is always in its own group."""
    features = np.asarray(features, dtype=np.float32)
    kept = np.asarray(kept, dtype=np.int64)
    n, k = len(features), len(kept)
    owner = merge_groups(features, kept)
    sizes = np.bincount(owner, minlength=k)
    assign = np.zeros((k, n), dtype=np.float32)  # one-hot groups: the sums are one matmul
    assign[owner, np.arange(n)] = 1.0
    merged = (assign @ features) / sizes[:, None].astype(np.float32)
    return merged.astype(np.float32, copy=False), sizes.astype(np.int64)



def merge_groups(features: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """features [N, D], kept [K] ascending -> owner [N] int64: for each token, the slot (0..K-1) of
    the kept token whose group it joins (`merge_dropped`'s rule; a kept token owns itself)."""
    features = np.asarray(features, dtype=np.float32)
    kept = np.asarray(kept, dtype=np.int64)
    if len(kept) == 0:
        raise ValueError("merge_dropped needs at least one kept token")
    inv_norm = 1.0 / np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    # cos(i, kept j) = <f_i, f_kj> / (|f_i| |f_kj|); the argmax over j needs only the kept norms
    owner = np.argmax((features @ features[kept].T) * inv_norm[kept], axis=1)
    owner[kept] = np.arange(len(kept))
    return owner.astype(np.int64)


def add_merge_outputs(model):
    """Append `merged_features [B,K,D]`, `kept_sizes [B,K]` and `token_groups [B,N]` (both int64; the
    latter is `merge_groups`: each token's kept slot, for pictures of the groups) to a selector graph:
    the same rule as `merge_dropped`, in standard ONNX ops after whichever selection (TensorRT runs them too).
    Reads the graph's `image_features` input and its `kept_indices` / `selected_features` outputs;
    a kept token's group follows the first maximum of cos similarity, as numpy's argmax does."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    feats = next(i for i in graph.input if i.name == "image_features")
    hidden = feats.type.tensor_type.shape.dim[2]
    batch = feats.type.tensor_type.shape.dim[0]
    const = lambda name, value, dtype=TensorProto.INT64: graph.initializer.append(  # noqa: E731
        helper.make_tensor(name, dtype, [len(value)] if isinstance(value, list) else [], value))
    const("merge/axis_last", [-1])
    const("merge/axis_one", [1])
    const("merge/zero", 0)
    const("merge/one", 1)
    const("merge/onehot_values", [0.0, 1.0], TensorProto.FLOAT)
    const("merge/eps", 1e-12, TensorProto.FLOAT)
    n = lambda op, ins, outs, **kw: helper.make_node(op, ins, outs, name=f"merge/{outs[0]}", **kw)  # noqa: E731
    nodes = [
        # cos(i, kept j) up to the factor 1/|f_i|, which does not move the argmax over j
        n("ReduceL2", ["selected_features", "merge/axis_last"], ["merge/kept_norm"], keepdims=0),
        n("Max", ["merge/kept_norm", "merge/eps"], ["merge/kept_norm_safe"]),
        n("Unsqueeze", ["merge/kept_norm_safe", "merge/axis_one"], ["merge/kept_norm_row"]),
        n("Transpose", ["selected_features"], ["merge/kept_t"], perm=[0, 2, 1]),
        n("MatMul", ["image_features", "merge/kept_t"], ["merge/dots"]),
        n("Div", ["merge/dots", "merge/kept_norm_row"], ["merge/scores"]),
        n("ArgMax", ["merge/scores"], ["merge/nearest"], axis=2, keepdims=0, select_last_index=0),
        # a kept token is in its own group
        n("Shape", ["kept_indices"], ["merge/kept_shape"]),
        n("Gather", ["merge/kept_shape", "merge/one"], ["merge/k"], axis=0),
        n("Range", ["merge/zero", "merge/k", "merge/one"], ["merge/slots"]),
        n("Expand", ["merge/slots", "merge/kept_shape"], ["merge/slots_b"]),
        n("ScatterElements", ["merge/nearest", "kept_indices", "merge/slots_b"], ["merge/owner"], axis=1),
        n("OneHot", ["merge/owner", "merge/k", "merge/onehot_values"], ["merge/assign"], axis=-1),
        n("ReduceSum", ["merge/assign", "merge/axis_one"], ["merge/sizes_f"], keepdims=0),
        n("Transpose", ["merge/assign"], ["merge/assign_t"], perm=[0, 2, 1]),
        n("MatMul", ["merge/assign_t", "image_features"], ["merge/sums"]),
        n("Unsqueeze", ["merge/sizes_f", "merge/axis_last"], ["merge/sizes_col"]),
        n("Div", ["merge/sums", "merge/sizes_col"], ["merged_features"]),
        n("Cast", ["merge/sizes_f"], ["kept_sizes"], to=TensorProto.INT64),
        n("Identity", ["merge/owner"], ["token_groups"]),  # computed anyway: free to expose
    ]
    graph.node.extend(nodes)
    kept = graph.output[0].type.tensor_type.shape.dim[1]
    dims = lambda *ds: [d.dim_param or d.dim_value for d in ds]  # noqa: E731
    graph.output.append(helper.make_tensor_value_info("merged_features", TensorProto.FLOAT, dims(batch, kept, hidden)))
    graph.output.append(helper.make_tensor_value_info("kept_sizes", TensorProto.INT64, dims(batch, kept)))
    tokens = feats.type.tensor_type.shape.dim[1]
    graph.output.append(helper.make_tensor_value_info("token_groups", TensorProto.INT64, dims(batch, tokens)))
    onnx.checker.check_model(model)
    return model


__all__ = ["MERGES", "add_merge_outputs", "merge_dropped", "merge_groups"]
