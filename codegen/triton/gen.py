"""Triton source generated from a ``KernelSpec``: one readable file per spec, cached by spec hash.

``generate(spec)`` is pure string work (no Triton needed), so artifacts can carry and verify the
sources on any machine; ``load(spec)`` writes the source to the cache directory (once) and imports
it with importlib, which is where Triton is first needed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from codegen.pattern import Bound
from codegen.registry import kernel_variant, kernel_variants
from codegen.spec import KernelSpec
from codegen.triton import templates as T

logger = logging.getLogger(__name__)


def triton_of(variant: str):
    """The variant's kernel record and its Triton record; a ValueError when it has no generated kernel."""
    rec = kernel_variant(variant)
    if rec is None or rec.triton is None:
        have = sorted(n for n, r in kernel_variants().items() if r.triton is not None)
        raise ValueError(f"no Triton kernel for variant {variant!r}; have {have}")
    return rec, rec.triton


def has_triton(variant: str) -> bool:
    """Whether ``variant`` has a generated Triton kernel."""
    rec = kernel_variant(variant)
    return rec is not None and rec.triton is not None


_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    """Where generated sources live: $REWRITER_TRITON_CACHE or ~/.cache/attention-rewriter/triton."""
    env = os.environ.get("REWRITER_TRITON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "attention-rewriter" / "triton"


def _pow2(n: int) -> int:
    """Next power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


def _bound(b: Bound, q: str, tensor: bool = True) -> str:
    """A span bound as a Triton expression of the query position ``q``; with ``tensor`` a constant is written
    as an expression of ``q`` too, so that every bound of a segment has one type."""
    if b.anchor == "query":
        base = q if b.stride == 1 else f"({q} // {b.stride}) * {b.stride}"
        return base if b.offset == 0 else f"{base} {'+' if b.offset > 0 else '-'} {abs(b.offset)}"
    if b.anchor == "first":
        return f"{b.offset} + 0 * {q}" if tensor else str(b.offset)
    if b.anchor == "last":
        return f"M - 1 + {b.offset} + 0 * {q}"
    raise ValueError(f"unknown bound anchor {b.anchor!r}")


def _spans(spec: KernelSpec) -> list:
    rec, _ = triton_of(spec.variant)
    if rec.spans is None:
        raise ValueError(f"variant {spec.variant!r} has no key spans")
    return list(rec.spans(**dict(spec.params)))


def _visible_body(spec: KernelSpec) -> str:
    """The variant's element test as Triton code (key j vs absolute query position i), from its spans."""
    _, tri = triton_of(spec.variant)
    if tri.visible is not None:
        lines = list(tri.visible(spec))
    else:
        terms = []
        for span in _spans(spec):
            if span.lo == Bound("first", 0) and span.hi == Bound("last", 0):
                terms = ["kpos >= 0"]  # every key
                break
            parts = [] if span.lo == Bound("first", 0) else [f"(kpos >= {_bound(span.lo, 'qpos', False)})"]
            if span.hi.anchor != "last":  # a real key is never past the last one
                parts.append(f"(kpos <= {_bound(span.hi, 'qpos', False)})")
            terms.append(" & ".join(parts) if len(parts) < 2 else f"({' & '.join(parts)})")
        names = ", ".join(sp.name for sp in _spans(spec))
        lines = [f"    vis = {' | '.join(terms)}  # {names}"]
    if spec.causal:
        lines.append("    vis = vis & (kpos <= qpos)  # causal")
    lines.append("    return vis")
    return "\n".join(lines)


def _segments(spec: KernelSpec) -> list[tuple[str, str, str, str, str]]:
    """(name, lo_any, hi_any, lo_all, hi_all) key intervals of a query block, from the variant's spans.

    q_first/q_last are the block's first and last real query positions; a query at i sees
    [lo(i), hi(i)]; the union over the block is [lo(q_first), hi(q_last)] and the intersection
    [lo(q_last), hi(q_first)] because every bound is non-decreasing in i (causal clamps hi to i).
    """
    out = []
    for span in _spans(spec):
        hi_any, hi_all = _bound(span.hi, "q_last"), _bound(span.hi, "q_first")
        if spec.causal:
            hi_any, hi_all = f"tl.minimum({hi_any}, q_last)", f"tl.minimum({hi_all}, q_first)"
        out.append((span.name, _bound(span.lo, "q_first"), hi_any, _bound(span.lo, "q_last"), hi_all))
    return out


def _configs(spec: KernelSpec, family: str) -> str:
    """The CUDA autotune list, sized to the head dim (big tiles only where registers allow)."""
    e = max(_pow2(spec.head_dim), _pow2(spec.value_dim))
    if family == "blockmap":  # tile sizes are fixed by the block map; tune warps and stages only
        rows = [(spec.block_q, spec.block_k, w, st) for w in (4, 8) for st in (2, 3)]
    else:
        cand = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4),
                (128, 128, 8, 2), (64, 128, 4, 2)]
        if triton_of(spec.variant)[1].narrow_key_tiles:  # narrow key tiles waste less of a band
            cand = [c for c in cand if c[1] <= 64]
        if e > 128:
            cand = [c for c in cand if c[0] * c[1] <= 64 * 64]
        rows = cand
    return "\n".join(f'    triton.Config({{"BLOCK_M": {m}, "BLOCK_N": {n}}}, num_warps={w}, num_stages={st}),'
                     for m, n, w, st in rows)


def generate(spec: KernelSpec) -> str:
    """The Triton source of ``spec``'s kernel (deterministic; the spec JSON is its header)."""
    rec, tri = triton_of(spec.variant)
    family = tri.family
    latent = tri.low_rank
    e, f = int(spec.head_dim), int(spec.value_dim)
    if latent:  # the loop contracts and accumulates over the rank; q's dim and the output's are X, Y
        x, y = e, f
        e = f = int(spec.param("rank"))
    be, bf = _pow2(e), _pow2(f)
    top_left = rec.top_left
    dims = {
        "GQA": str(max(1, int(spec.gqa))), "E": str(e), "F": str(f), "BLOCK_E": str(be), "BLOCK_F": str(bf),
        "EMASK_Q": f" & (offs_e[None, :] < {e})" if be != e else "",
        "FMASK_AND": f" & (offs_f[None, :] < {f})" if bf != f else "",
        "FMASK_STORE": f" & (offs_f[None, :] < {f})" if bf != f else "",
    }
    if family == "recurrent":
        from codegen.triton.linear_gen import generate_linear
        return generate_linear(spec, dims)
    values = {
        "VARIANT": spec.variant, "FAMILY": family, "SPEC_HASH": spec.hash,
        "SPEC_JSON": json.dumps(spec.to_json(), sort_keys=True), "GQA": str(max(1, int(spec.gqa))),
        "ALIGN": ("queries top-left: query i is at position i" if top_left
                  else "queries bottom-right: query i is at key position M - P + i"),
        "QOFF": "" if top_left else " + (M - P)",
        "CONFIGS": _configs(spec, family),
        "INTERPRET_CONFIG": json.dumps({"BLOCK_M": spec.block_q, "BLOCK_N": spec.block_k}),
        "VISIBLE": _visible_body(spec),
        "E": str(e), "F": str(f), "BLOCK_E": str(be), "BLOCK_F": str(bf),
        "EMASK_AND": f" & (offs_e[:, None] < {e})" if be != e else "",
        "EMASK_ONLY": f", mask=offs_e[:, None] < {e}, other=0.0" if be != e else "",
        "EMASK_Q": f" & (offs_e[None, :] < {e})" if be != e else "",
        "FMASK_AND": f" & (offs_f[None, :] < {f})" if bf != f else "",
        "FMASK_ONLY": f", mask=offs_f[None, :] < {f}, other=0.0" if bf != f else "",
        "FMASK_STORE": f" & (offs_f[None, :] < {f})" if bf != f else "",
        # float32 must not silently drop to tf32 on tensor cores: the contract is exact attention
        "DOT_PREC": ', input_precision="ieee"' if spec.dtype == "float32" else "",
        "SOFTCAP": ("        s = softcap * _tanh(s / softcap)  # soft-capping" if spec.softcap
                    else "        # no soft-capping in this spec"),
        "EXTRA_ARGS": T.BLOCKMAP_ARGS if family == "blockmap" else (T.LATENT_ARGS if latent else ""),
        "Q_LOAD": T.LATENT_Q_LOAD if latent else T.Q_LOAD,
        "STORE": T.LATENT_STORE if latent else T.STORE,
    }
    if latent:
        values.update({"X": str(x), "Y": str(y), "BLOCK_X": str(_pow2(x)), "BLOCK_Y": str(_pow2(y))})
    parts = [T.HEADER]
    if family == "ranges":
        parts.append(T.BLOCKS_FN)
    parts.append(T.KERNEL_OPEN)
    if family == "ranges":
        for i, (name, lo_any, hi_any, lo_all, hi_all) in enumerate(_segments(spec)):
            seg = T.render(T.SEGMENT, {"NAME": name, "LO_ANY": lo_any, "HI_ANY": hi_any, "LO_ALL": lo_all,
                                       "HI_ALL": hi_all, "CLIP": T.CLIP_AFTER_PREVIOUS if i else "",
                                       "VISIT_ARGS": T.VISIT_ARGS, "VISIT_FLAGS": T.VISIT_FLAGS})
            parts.append(seg)
    else:
        parts.append(T.render(T.BLOCKMAP_BODY, {"VISIT_ARGS": T.VISIT_ARGS, "VISIT_FLAGS": T.VISIT_FLAGS}))
    parts.append(T.KERNEL_CLOSE)
    return T.render("".join(parts), values)


def filename(spec: KernelSpec) -> str:
    """Cache/artifact file name of ``spec``'s kernel: ``<variant>_<spec hash>.py``."""
    return f"{spec.variant}_{spec.hash}.py"


def sha256(text: str) -> str:
    """Hex sha256 of a source text."""
    return hashlib.sha256(text.encode()).hexdigest()


def load(spec: KernelSpec) -> ModuleType:
    """Generate (once), write to the cache directory keyed by the spec hash, and import the kernel module."""
    key = spec.hash
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        text = generate(spec)
        path = cache_dir() / filename(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            # write-then-rename so a concurrent process never imports a half-written file
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        name = f"rewriter_triton_{spec.variant}_{key}"
        ispec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(ispec)
        sys.modules[name] = mod  # triton's jit resolves globals through the module
        ispec.loader.exec_module(mod)
        _MODULES[key] = mod
        logger.debug("loaded Triton kernel %s from %s", spec.variant, path)
        return mod
