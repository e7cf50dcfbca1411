"""`tops::Select` through TensorRT's Python plugin API (`tensorrt.plugin`, QDP; TensorRT >= 10.8 for AOT).

Imported only by `tops_edge.plugins.load()`, on a TensorRT host. Inputs, outputs and their meaning:
see reference.py. Attributes alpha, beta, relevance_sign: dpp-merge's / cdpruner's parameters as exported.

- `register`: order [B,N] int32 and the Cholesky scratch [B,N,N] float32 (the kernel's C rows);
- `impl` (JIT): the torch reference on TensorRT's stream; it reads K on the host, so it syncs:
  use it to check, not to deploy;
- `aot_impl`: the Triton kernel compiled to PTX for the build GPU, one program per image, with the
  attributes baked in as constants (an AOT plugin's attributes are not serialized). An engine built
  with it runs from trtexec or C++ without Python.
"""

from __future__ import annotations

from typing import Tuple

import tensorrt as trt
import tensorrt.plugin as trtp

PLUGIN_ID = "tops::Select"


@trtp.register(PLUGIN_ID)
def select_desc(similarity: trtp.TensorDesc, cosine: trtp.TensorDesc, valid: trtp.TensorDesc, keep: trtp.TensorDesc,
                alpha: float, beta: float, relevance_sign: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    batch, n = cosine.shape_expr[0], cosine.shape_expr[1]
    order = trtp.from_shape_expr((batch, n), dtype=trt.int32)
    return order, similarity.like()


@trtp.autotune(PLUGIN_ID)
def select_autotune(similarity, cosine, valid, keep, outputs):
    # similarity, cosine, valid, keep -> order, scratch; fp32 throughout (TOPS.md: the selector is fp32)
    return [trtp.AutoTuneCombination("FP32, FP32, INT32, INT32, INT32, FP32", "LINEAR")]


@trtp.impl(PLUGIN_ID)
def select_impl(similarity: trtp.Tensor, cosine: trtp.Tensor, valid: trtp.Tensor, keep: trtp.Tensor, alpha: float,
                beta: float, relevance_sign: float, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    from .reference import select_order

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        sim, cos, ok = (torch.as_tensor(x, device="cuda") for x in (similarity, cosine, valid))
        k = int(torch.as_tensor(keep, device="cuda").reshape(-1)[0].item())
        order = select_order(sim, cos, ok, k, alpha=alpha, beta=beta, sign=relevance_sign)
        torch.as_tensor(outputs[0], device="cuda").copy_(order)


@trtp.aot_impl(PLUGIN_ID)
def select_aot_impl(similarity: trtp.TensorDesc, cosine: trtp.TensorDesc, valid: trtp.TensorDesc, keep: trtp.TensorDesc,
                    alpha: float, beta: float, relevance_sign: float, outputs: Tuple[trtp.TensorDesc],
                    tactic: int) -> Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
    from .aot import compile_select

    n_expr = cosine.shape_expr[1]
    if not n_expr.is_constant:
        raise ValueError("tops::Select needs a static number of visual tokens N (the kernel's lanes)")
    compiled = compile_select(n_expr.constant_value(), alpha=alpha, beta=beta, sign=relevance_sign)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = cosine.shape_expr[0]  # one program per image
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared_mem
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_expr)])
    return compiled.name.encode(), compiled.ptx.encode(), launch, scalars
