"""Every generated kernel family compiles for an H100 (sm_90) on a machine without a GPU.

The interpreter checks the math but not Triton's compiler front end (constexpr rules, types of
values carried across branches and loops, tile shapes); ``triton.compile`` with an explicit
``GPUTarget`` runs the whole pipeline down to a cubin with the ptxas bundled in the wheel.
Compilation runs in a child process (``python tests/test_triton_compile.py CASE...``): Triton
cannot compile in a process where ``tests/test_triton.py`` switched the interpreter on.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ATTN = dict(HAS_MASK=False, MASK_BOOL=False, HAS_FILL=False, BLOCK_M=128, BLOCK_N=64)
CASES = {  # id: (variant, params, spec fields, constexpr arguments)
    "dense-fp16-causal-boolfill-softcap": (
        "dense", {}, dict(causal=True, softcap=True, head_dim=80, value_dim=80, gqa=4),
        dict(ATTN, HAS_MASK=True, MASK_BOOL=True, HAS_FILL=True)),
    "block_sparse-fp16-causal": ("block_sparse", {"keep": 0.1, "block": 64}, dict(causal=True),
                                 dict(ATTN, BLOCK_M=64)),
    "linear-fp16-causal-padding": ("linear", {"feature_map": "elu1", "chunk": 64}, dict(causal=True),
                                   dict(HAS_KEEP=True)),
    "latent-fp16-causal": ("latent", {"rank": 32}, dict(causal=True, head_dim=128, value_dim=128), ATTN),
}
SLOW_CASES = {
    "dense-fp32-additive": ("dense", {}, dict(dtype="float32", head_dim=80, value_dim=80),
                            dict(ATTN, HAS_MASK=True, BLOCK_M=64)),
    "sliding_window-bf16-causal": ("sliding_window", {"window": 256}, dict(causal=True, dtype="bfloat16"),
                                   dict(ATTN, BLOCK_N=32)),
    "sinks_window-fp16-causal": ("sinks_window", {"window": 256, "sinks": 4}, dict(causal=True), ATTN),
    "neighborhood_2d-fp16-additive": ("neighborhood_2d", {"grid": [32, 32], "kernel": [7, 7], "prefix": 1},
                                      {}, dict(ATTN, HAS_MASK=True, BLOCK_M=64)),
    "linear-fp32-full": ("linear", {"feature_map": "elu1", "chunk": 64}, dict(dtype="float32"),
                         dict(HAS_KEEP=False)),
}
_PTR = {"Q", "K", "V", "Out", "UK", "UV"}


def _compile(tmp: Path, variant, params, fields, consts) -> None:
    """Generate, import and compile one kernel for sm_90 (runs in the child process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from codegen.triton.gen import filename, generate
    from codegen.triton.launch import spec_from_fields
    spec = spec_from_fields(variant, params, **{"dtype": "float16", "head_dim": 64, "value_dim": 64, **fields})
    path = tmp / filename(spec)
    path.write_text(generate(spec))
    name = f"compile_check_{spec.hash}"
    ispec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(ispec)
    sys.modules[name] = mod
    ispec.loader.exec_module(mod)
    fn = mod.attention_kernel
    names = list(inspect.signature(fn.fn).parameters)
    dt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[spec.dtype]
    sig = {}
    for n in names:
        if n in _PTR:
            sig[n] = "*" + dt
        elif n == "Mask":
            sig[n] = "*u8" if consts.get("MASK_BOOL") else "*" + dt
        elif n in ("BNum", "BIdx"):
            sig[n] = "*i32"
        elif n == "BFull":
            sig[n] = "*u8"
        elif n == "Keep":
            sig[n] = "*fp32"
        elif n in ("sm_scale", "softcap", "fill"):
            sig[n] = "fp32"
        else:
            sig[n] = "constexpr" if n in consts else "i32"
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    assert kernel.asm.get("cubin"), "no cubin produced"
    assert kernel.metadata.shared <= 228 * 1024, "shared memory beyond an H100 SM"


def _run_child(cases: list[str]) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, *cases], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip() or "no NVIDIA backend in this Triton build")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("compiled ") == len(cases), proc.stdout


def test_compiles_for_sm90():
    """One kernel of each family (ranges with every flag, blockmap, linear, latent)."""
    _run_child(list(CASES))


@pytest.mark.slow
def test_compiles_for_sm90_all_variants():
    _run_child(list(SLOW_CASES))


if __name__ == "__main__":
    import triton as _triton
    if "nvidia" not in getattr(_triton.backends, "backends", {}):
        print("this Triton build has no NVIDIA backend")
        sys.exit(77)
    table = {**CASES, **SLOW_CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for case in sys.argv[1:]:
            _compile(Path(tmp), *table[case])
            print("compiled", case, flush=True)
