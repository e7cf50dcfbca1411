"""Ahead-of-time compilation of the plugin kernels (tops::Select, tops::PaperSelect) to PTX for
TensorRT's AOT plugin path (`aot_impl`).

TensorRT launches an AOT kernel with exactly (input pointers, int32 scalars, output pointers).
Triton >= 3.3 appends two pointer parameters of its own (global and profile scratch); this kernel
uses neither (both sizes are 0, checked), so they are removed from the PTX entry's parameter list.
Runs without a GPU when the target is given (Triton bundles ptxas): tests compile for sm_87 here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KERNEL_ARGS = ("sim_ptr", "cos_ptr", "valid_ptr", "keep_ptr", "n", "order_ptr", "chol_ptr")
ARG_TYPES = ("*fp32", "*fp32", "*i32", "*i32", "i32", "*i32", "*fp32")
# tops::PaperSelect (tops_paper_kernel.py): similarity, relevance, valid, keep, N, order, scratch
PAPER_KERNEL_ARGS = ("sim_ptr", "r_ptr", "valid_ptr", "keep_ptr", "n", "order_ptr", "mc_ptr")
PAPER_ARG_TYPES = ("*fp32", "*fp32", "*i32", "*i32", "i32", "*i32", "*fp32")


@dataclass(frozen=True)
class CompiledSelect:
    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    block_n: int
    block_k: int


def compile_select(n: int, *, alpha: float, beta: float, sign: float, arch: int | None = None,
                   block_k: int | None = None, num_warps: int | None = None) -> CompiledSelect:
    """PTX of the kernel for N tokens with the attributes baked in; `arch` e.g. 87 (Orin), 90 (H100);
    None compiles for the GPU of this process."""
    from .kernel import block_sizes, default_num_warps, tops_select_kernel

    block_n, bk = block_sizes(n, block_k)
    constexprs = {"ALPHA": float(alpha), "BETA": float(beta), "SIGN": float(sign), "BLOCK_N": block_n, "BLOCK_K": bk}
    return _compile(tops_select_kernel, KERNEL_ARGS, ARG_TYPES, constexprs, num_warps or default_num_warps(block_n),
                    arch, block_n, bk)


def compile_paper_select(n: int, *, alpha: float, lam: float, relevance_weight: float, norm: str,
                         arch: int | None = None, block_j: int | None = None,
                         num_warps: int | None = None) -> CompiledSelect:
    """PTX of the paper's TOPS kernel (tops_paper_kernel.py, `tops::PaperSelect`) for N tokens with the
    attributes baked in; `block_k` of the result is its BLOCK_J. `arch` as in compile_select."""
    from .kernel import default_num_warps
    from .tops_paper_kernel import block_sizes, paper_constexprs, tops_paper_kernel

    block_n, bj = block_sizes(n, block_j)
    constexprs = paper_constexprs(alpha, lam, relevance_weight, norm) | {"BLOCK_N": block_n, "BLOCK_J": bj}
    return _compile(tops_paper_kernel, PAPER_KERNEL_ARGS, PAPER_ARG_TYPES, constexprs,
                    num_warps or default_num_warps(block_n), arch, block_n, bj)


def _compile(fn, kernel_args, arg_types, constexprs: dict, num_warps: int, arch: int | None, block_n: int,
             block: int) -> CompiledSelect:
    import triton
    from triton.backends.compiler import GPUTarget

    signature = dict(zip(kernel_args, arg_types)) | {name: "constexpr" for name in constexprs}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", int(arch), 32) if arch is not None else None
    # fp fusion off: no FMA contraction, so the arithmetic rounds as the torch reference's does
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    compiled = triton.compile(src, target=target, options=options)
    meta = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, scratch, 0):
            raise RuntimeError(f"the compiled kernel needs {scratch}={getattr(meta, scratch)}; TensorRT cannot pass it")
    ptx = trim_params(compiled.asm["ptx"], meta.name, len(kernel_args))
    return CompiledSelect(meta.name, ptx, meta.num_warps, meta.shared, block_n, block)


def entry_params(ptx: str, name: str) -> list[str]:
    """The parameter names of the PTX entry `name`, in order."""
    head = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if head is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return re.findall(rf"({re.escape(name)}_param_\d+)", head.group(1))


def assemble(ptx: str, arch: int) -> None:
    """Run NVIDIA's assembler (the ptxas Triton bundles) on `ptx` for sm_`arch`; raises if it refuses
    the PTX. Needs no GPU: the check that a compiled kernel is valid device code."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}", path, "-o", os.path.join(d, "k.cubin")], check=True)


def trim_params(ptx: str, name: str, keep: int) -> str:
    """Drop the entry's parameters after the first `keep`; refuses if the body reads one of them."""
    params = entry_params(ptx, name)
    for extra in params[keep:]:
        if re.search(rf"\[{extra}\]", ptx):
            raise ValueError(f"the kernel reads {extra}; it cannot be dropped")
        ptx = re.sub(rf",\s*\n?\s*\.param[^,)]*\b{extra}\b", "", ptx)
    return ptx
