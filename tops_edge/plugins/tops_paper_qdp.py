"""`tops::PaperSelect` (the paper's TOPS greedy) through TensorRT's Python plugin API, as qdp.py
registers `tops::Select`.

Imported only by `tops_edge.plugins.load_paper()`, on a TensorRT host. Inputs, outputs and their
meaning: see tops_paper_reference.py. Attributes: alpha, lam, relevance_weight (floats) and norm
("minmax" | "mean"), the stage's parameters as tops_paper.check_params gives them.

- `register`: order [B,N] int32 and the kernel's scratch [B,N] float32;
- `impl` (JIT): the torch reference on TensorRT's stream; it reads K on the host, so it syncs:
  use it to check, not to deploy;
- `aot_impl`: the Triton kernel (tops_paper_kernel.py) compiled to PTX for the build GPU, one
  program per image, the attributes baked in as constants (an AOT plugin's are not serialized).
"""

from __future__ import annotations

from typing import Tuple

import tensorrt as trt
import tensorrt.plugin as trtp

PLUGIN_ID = "tops::PaperSelect"


@trtp.register(PLUGIN_ID)
def paper_select_desc(similarity: trtp.TensorDesc, relevance: trtp.TensorDesc, valid: trtp.TensorDesc,
                      keep: trtp.TensorDesc, alpha: float, lam: float, relevance_weight: float,
                      norm: str) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    batch, n = relevance.shape_expr[0], relevance.shape_expr[1]
    order = trtp.from_shape_expr((batch, n), dtype=trt.int32)
    return order, relevance.like()


@trtp.autotune(PLUGIN_ID)
def paper_select_autotune(similarity, relevance, valid, keep, outputs):
    # similarity, relevance, valid, keep -> order, scratch; fp32 throughout (the selector is fp32)
    return [trtp.AutoTuneCombination("FP32, FP32, INT32, INT32, INT32, FP32", "LINEAR")]


@trtp.impl(PLUGIN_ID)
def paper_select_impl(similarity: trtp.Tensor, relevance: trtp.Tensor, valid: trtp.Tensor, keep: trtp.Tensor,
                      alpha: float, lam: float, relevance_weight: float, norm: str, outputs: Tuple[trtp.Tensor],
                      stream: int) -> None:
    import torch

    from .tops_paper_reference import paper_select_order

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        sim, r, ok = (torch.as_tensor(x, device="cuda") for x in (similarity, relevance, valid))
        k = int(torch.as_tensor(keep, device="cuda").reshape(-1)[0].item())
        order = paper_select_order(sim, r, ok, k, alpha=alpha, lam=lam, relevance_weight=relevance_weight, norm=norm)
        torch.as_tensor(outputs[0], device="cuda").copy_(order)


@trtp.aot_impl(PLUGIN_ID)
def paper_select_aot_impl(similarity: trtp.TensorDesc, relevance: trtp.TensorDesc, valid: trtp.TensorDesc,
                          keep: trtp.TensorDesc, alpha: float, lam: float, relevance_weight: float, norm: str,
                          outputs: Tuple[trtp.TensorDesc],
                          tactic: int) -> Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
    from .aot import compile_paper_select

    n_expr = relevance.shape_expr[1]
    if not n_expr.is_constant:
        raise ValueError("tops::PaperSelect needs a static number of visual tokens N (the kernel's lanes)")
    compiled = compile_paper_select(n_expr.constant_value(), alpha=alpha, lam=lam, relevance_weight=relevance_weight,
                                    norm=norm)
    launch = trtp.KernelLaunchParams()
    launch.grid_x = relevance.shape_expr[0]  # one program per image
    launch.block_x = compiled.num_warps * 32
    launch.shared_mem = compiled.shared_mem
    scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_expr)])
    return compiled.name.encode(), compiled.ptx.encode(), launch, scalars
