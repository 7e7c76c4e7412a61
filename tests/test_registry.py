"""Conformance of every registered variant, and no variant named outside its own modules.

Parametrised over the registry: a variant that registers gets every check here, and a variant whose
kernel, reference, fake shape, Triton kernel or degenerate parameters are wrong (or missing) fails.
"""
from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

import codegen  # noqa: F401  (registers the op and discovers the kernels)
from codegen.registry import exact_variant, kernel_variants
from passes.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("rewriter", "passes", "codegen", "cost_model")
NAMES = sorted(kernel_variants())

# b, h, g, p, m, e, f: lengths that are no multiple of any block, GQA, fewer queries than keys, decode
SHAPES = [(2, 4, 2, 37, 37, 12, 10), (1, 3, 1, 1, 29, 8, 8), (1, 2, 2, 11, 23, 16, 16)]


def _inputs(shape, seed: int = 0):
    b, h, g, p, m, e, f = shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, p, e, generator=gen), torch.randn(b, g, m, e, generator=gen),
            torch.randn(b, g, m, f, generator=gen), gen)


def _operands(rec, k, v, params, gen):
    if rec.operands is None:
        return k, v, []
    return rec.operands(k, v, params, gen)


def _padding(b: int, m: int) -> torch.Tensor:
    """A key-padding mask hiding the last third of every other row's keys (never a whole row)."""
    keep = torch.ones(b, 1, 1, m, dtype=torch.bool)
    keep[::2, ..., m - m // 3:] = False
    return keep


def _examples(rec, m: int, h: int) -> list[dict]:
    """The record's example parameters at m keys (and h heads, for variants whose parameters are per head)."""
    takes_heads = len(inspect.signature(rec.examples).parameters) > 1
    return rec.examples(m, h) if takes_heads else rec.examples(m)


def _cases(rec, shape):
    """(params, mask, softcap) the kernel claims to take at this shape."""
    b, h, _, p, m, _, _ = shape
    out = [(params, None, 0.0) for params in _examples(rec, m, h)]
    first = out[0][0]
    if {"mask", "padding_mask"} & rec.supports:
        out.append((first, _padding(b, m), 0.0))
    if "softcap" in rec.supports:
        out.append((first, None, 5.0))
    return out


def _applies(name: str, shape) -> bool:
    b, h, g, p, m, e, f = shape
    # a 2-D grid needs the whole sequence as queries; the other variants take a KV cache's newest queries
    return not (VARIANTS[name].needs & {"grid"} and p != m)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_reference(name, shape, causal):
    rec = kernel_variants()[name]
    if not _applies(name, shape):
        pytest.skip("the variant needs queries and keys of one length")
    q, k, v, gen = _inputs(shape)
    for params, mask, softcap in _cases(rec, shape):
        kk, vv, extra = _operands(rec, k, v, params, gen)
        got = codegen.run(name, q, kk, vv, mask, 0.3, causal, extra=extra, softcap=softcap, **params)
        want = rec.reference(q.double(), kk.double(), vv.double(), mask, 0.3, causal,
                             extra=[x.double() for x in extra], softcap=softcap, **params)
        assert got.shape == want.shape, (params, got.shape, want.shape)
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, p=params: f"{name} {p}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_fake_shape_is_the_real_shape(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = kernel_variants()[name]
    shape = SHAPES[0]
    q, k, v, gen = _inputs(shape)
    params = _examples(rec, shape[4], shape[1])[0]
    kk, vv, extra = _operands(rec, k, v, params, gen)
    real = torch.ops.rewriter.attention(q, kk, vv, None, 0.3, False, name, json.dumps(params), extra)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, kk, vv))
        fx = [mode.from_tensor(x) for x in extra]
        fake = torch.ops.rewriter.attention(fq, fk, fv, None, 0.3, False, name, json.dumps(params), fx)
    assert tuple(fake.shape) == tuple(real.shape) and fake.dtype == real.dtype


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_parameters_are_dense(name, causal):
    rec = kernel_variants()[name]
    assert rec.degenerate is not None, f"{name} declares no parameters at which it is exact dense attention"
    shape = (2, 4, 2, 21, 21, 8, 8)  # P == M, E == F: every variant's degenerate form is the original
    q, k, v, gen = _inputs(shape, seed=1)
    params = rec.degenerate(shape[4], shape[5])
    kk, vv, extra = _operands(rec, k, v, params, gen)
    got = codegen.run(name, q, kk, vv, None, 0.3, causal, extra=extra, **params)
    want = exact_variant().reference(q.double(), k.double(), v.double(), None, 0.3, causal)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if kernel_variants()[n].triton is not None])
def test_triton_matches_reference(name, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from codegen.triton import launch

    rec = kernel_variants()[name]
    shape = (1, 2, 1, 19, 19, 16, 16)  # small: the interpreter runs one program at a time
    q, k, v, gen = _inputs(shape, seed=2)
    ran = 0
    for params in _examples(rec, shape[4], shape[1]):
        if not rec.triton.available(params):
            continue
        kk, vv, extra = _operands(rec, k, v, params, gen)
        for causal in (False, True):
            got = launch.run(name, q, kk, vv, None, 0.3, causal, extra=extra, **params)
            want = rec.reference(q.double(), kk.double(), vv.double(), None, 0.3, causal,
                                 extra=[x.double() for x in extra], **params)
            torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)
            ran += 1
    assert ran, f"{name} declares a Triton kernel but none of its examples has one"


def test_every_kernel_record_has_a_planner_record():
    assert set(VARIANTS) == set(kernel_variants())
    for name, rec in VARIANTS.items():
        assert rec.kernel is kernel_variants()[name]


def test_exactly_one_baseline():
    assert exact_variant().name in VARIANTS


def _own(path: Path, name: str) -> bool:
    return path.parent.name == "variants" and path.stem == name


def _stray(paths) -> list[str]:
    """Every string literal equal to a variant's name, in files that are not that variant's own modules."""
    out = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES
                    and not _own(path, node.value)):
                out.append(f"{path}:{node.lineno}: {node.value!r}")
    return out


def test_no_variant_is_named_outside_its_own_modules():
    """A library module never spells a variant's name as a string: it asks the registry."""
    stray = _stray(sorted(p for pkg in LIBRARY for p in (ROOT / pkg).rglob("*.py")))
    assert not stray, "variant names outside their own modules:\n" + "\n".join(stray)


def test_the_check_sees_a_stray_name(tmp_path):
    """The scan finds a name where one is written, and lets a variant's own module spell its own name."""
    name = NAMES[-1]
    (tmp_path / "mod.py").write_text(f"X = {name!r}\n")
    own = tmp_path / "variants" / f"{name}.py"
    own.parent.mkdir()
    own.write_text(f"NAME = {name!r}\n")
    assert _stray([tmp_path / "mod.py", own]) == [f"{tmp_path / 'mod.py'}:1: {name!r}"]
