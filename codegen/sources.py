"""Generated kernel sources with their hashes, for artifacts: export writes them, load re-checks them.

Two kinds: the compiled C++ CPU kernel of the block-sparse variants, and the generated Triton
kernel (``codegen.triton.gen``) of every variant that has one.  Generating a Triton source is
pure string work, so artifacts carry and verify them on machines without Triton or a GPU.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from codegen.registry import kernel_variant
from codegen.spec import KernelSpec


def _cpu_sources(variant: str, params: Mapping[str, Any], **fields: Any) -> dict[str, tuple[str, str]]:
    # only variants whose CPU lowering is the compiled block-sparse kernel carry a CPU source; the
    # others lower to PyTorch ops (SDPA, matmuls)
    rec = kernel_variant(variant)
    if rec is None or not rec.compiled_cpu:
        return {}
    from codegen import cpu_kernel
    block = int(params.get("block", cpu_kernel.BK))  # the map's key block picks the kernel's instantiation
    spec = KernelSpec.make(variant, params, block_k=block if block in cpu_kernel.BLOCKS else cpu_kernel.BK, **fields)
    header = f"// kernel: {variant} (CPU block-sparse flash)\n// spec: {json.dumps(spec.to_json(), sort_keys=True)}\n"
    text = header + cpu_kernel.SOURCE
    return {f"{variant}_cpu_{spec.hash}.cpp": (text, hashlib.sha256(text.encode()).hexdigest())}


def _triton_sources(variant: str, params: Mapping[str, Any], **fields: Any) -> dict[str, tuple[str, str]]:
    from codegen.triton.gen import generate, sha256
    rec = kernel_variant(variant)
    if rec is None or rec.triton is None or not rec.triton.available(params):
        return {}  # no generated kernel for these parameters: they run the PyTorch path
    from codegen.triton.launch import spec_from_fields
    spec = spec_from_fields(variant, dict(params), **fields)
    text = generate(spec)
    return {f"{variant}_triton_{spec.hash}.py": (text, sha256(text))}


def kernel_sources(variant: str, params: Mapping[str, Any], **fields: Any) -> dict[str, tuple[str, str]]:
    """{filename: (source, sha256)} of the kernels that run ``variant`` with ``params`` (spec in the header).

    ``fields`` are ``KernelSpec`` fields (dtype, head_dim, value_dim, gqa, causal, mask, softcap). A correction
    (``delta``) is applied by the op on top of the kernel's output in PyTorch, so it is no part of a kernel.
    """
    from codegen.corrections import split_corrections
    params, _ = split_corrections(params)
    return {**_cpu_sources(variant, params, **fields), **_triton_sources(variant, params, **fields)}


def verify_sources(variant: str, params: Mapping[str, Any], stored: Mapping[str, tuple[str, str]],
                   **fields: Any) -> list[str]:
    """Regenerate and compare with ``stored``; returns the filenames whose hash differs or is missing."""
    fresh = kernel_sources(variant, params, **fields)
    bad = [name for name, (_, h) in fresh.items() if name not in stored or stored[name][1] != h]
    return bad + [name for name in stored if name not in fresh]
