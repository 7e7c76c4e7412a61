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

from codegen.spec import KernelSpec
from codegen.triton import templates as T

logger = logging.getLogger(__name__)

# The variants with a generated kernel and the family each uses.
FAMILIES: dict[str, str] = {
    "dense": "ranges",
    "gqa_merge": "ranges",   # after weight surgery it is dense attention over fewer K/V heads
    "sliding_window": "ranges",
    "sinks_window": "ranges",
    "block_sparse": "blockmap",
    "neighborhood_2d": "blockmap",
    "linear": "linear",      # elu1 feature map, no window (codegen.triton.linear_gen)
    "latent": "ranges",      # dense over rank-R K/V with both up-projections fused
}

_LOCK = threading.Lock()
_MODULES: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    """Where generated sources live: $REWRITER_TRITON_CACHE or ~/.cache/attention-rewriter/triton."""
    env = os.environ.get("REWRITER_TRITON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "attention-rewriter" / "triton"


def _pow2(n: int) -> int:
    """Next power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, 1 << (max(1, n) - 1).bit_length())


def _visible_body(spec: KernelSpec) -> str:
    """The variant's element test as Triton code (key j vs absolute query position i)."""
    v, causal = spec.variant, spec.causal
    lines: list[str] = []
    if v in ("dense", "gqa_merge", "latent", "block_sparse"):
        lines.append("    vis = kpos >= 0  # every key")
    elif v == "sliding_window":
        w = int(spec.param("window"))
        lines.append(f"    vis = (kpos > qpos - {w}) & (kpos < qpos + {w})  # |i - j| < window")
    elif v == "sinks_window":
        w, s = int(spec.param("window")), int(spec.param("sinks"))
        lines.append(f"    vis = (kpos < {s}) | ((kpos > qpos - {w}) & (kpos < qpos + {w}))  # sinks or |i - j| < window")
    elif v == "neighborhood_2d":
        rows, cols = (int(x) for x in spec.param("grid"))
        kh, kw = (int(x) for x in spec.param("kernel"))
        pre = int(spec.param("prefix", 0))
        nr, nc = min(kh, rows), min(kw, cols)
        lines += [
            f"    # grid {rows}x{cols} after {pre} global tokens; window {kh}x{kw} shifted inside the grid",
            f"    t = qpos - {pre}",
            f"    q_in = (t >= 0) & (t < {rows * cols})",
            "    t = tl.where(q_in, t, 0)",
            f"    r0 = tl.minimum(tl.maximum(t // {cols} - {kh // 2}, 0), {rows - nr})",
            f"    c0 = tl.minimum(tl.maximum(t % {cols} - {kw // 2}, 0), {cols - nc})",
            f"    u = kpos - {pre}",
            f"    k_in = (u >= 0) & (u < {rows * cols})",
            "    u = tl.where(k_in, u, 0)",
            f"    kr = u // {cols}",
            f"    kc = u % {cols}",
            f"    near = (kr >= r0) & (kr < r0 + {nr}) & (kc >= c0) & (kc < c0 + {nc})",
            "    vis = (~q_in) | (~k_in) | near  # global queries and keys see / are seen by all",
        ]
    else:
        raise ValueError(f"no Triton kernel for variant {v!r}")
    if causal:
        lines.append("    vis = vis & (kpos <= qpos)  # causal")
    lines.append("    return vis")
    return "\n".join(lines)


def _segments(spec: KernelSpec) -> list[tuple[str, str, str, str, str]]:
    """(name, lo_any, hi_any, lo_all, hi_all) key intervals of a query block, from the spec.

    q_first/q_last are the block's first and last real query positions; a query at i sees
    [lo(i), hi(i)]; the union over the block is [lo(q_first), hi(q_last)] and the intersection
    [lo(q_last), hi(q_first)] because every bound here is monotone in i.
    """
    v, causal = spec.variant, spec.causal
    if v in ("dense", "gqa_merge", "latent"):
        # literals are written as expressions of q_first so every bound is a tensor of one type
        hi_any, hi_all = ("q_last", "q_first") if causal else ("M - 1 + 0 * q_last", "M - 1 + 0 * q_first")
        return [("all keys", "0 * q_first", hi_any, "0 * q_first", hi_all)]
    w = int(spec.param("window"))
    win_hi_any = "q_last" if causal else f"q_last + {w - 1}"
    win_hi_all = "q_first" if causal else f"q_first + {w - 1}"
    window = ("window", f"q_first - {w - 1}", win_hi_any, f"q_last - {w - 1}", win_hi_all)
    if v == "sliding_window":
        return [window]
    if v == "sinks_window":
        s = int(spec.param("sinks"))
        if s <= 0:
            return [window]
        sink_any = f"tl.minimum({s - 1}, q_last)" if causal else f"{s - 1} + 0 * q_last"
        sink_all = f"tl.minimum({s - 1}, q_first)" if causal else f"{s - 1} + 0 * q_first"
        return [("sinks", "0 * q_first", sink_any, "0 * q_first", sink_all), window]
    raise ValueError(f"variant {v!r} has no ranges kernel")


def _configs(spec: KernelSpec, family: str) -> str:
    """The CUDA autotune list, sized to the head dim (big tiles only where registers allow)."""
    e = max(_pow2(spec.head_dim), _pow2(spec.value_dim))
    if family == "blockmap":  # tile sizes are fixed by the block map; tune warps and stages only
        rows = [(spec.block_q, spec.block_k, w, st) for w in (4, 8) for st in (2, 3)]
    else:
        cand = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4),
                (128, 128, 8, 2), (64, 128, 4, 2)]
        if spec.variant in ("sliding_window", "sinks_window"):  # narrow key tiles waste less of a band
            cand = [c for c in cand if c[1] <= 64]
        if e > 128:
            cand = [c for c in cand if c[0] * c[1] <= 64 * 64]
        rows = cand
    return "\n".join(f'    triton.Config({{"BLOCK_M": {m}, "BLOCK_N": {n}}}, num_warps={w}, num_stages={st}),'
                     for m, n, w, st in rows)


def generate(spec: KernelSpec) -> str:
    """The Triton source of ``spec``'s kernel (deterministic; the spec JSON is its header)."""
    family = FAMILIES.get(spec.variant)
    if family is None:
        raise ValueError(f"no Triton kernel for variant {spec.variant!r}; have {sorted(FAMILIES)}")
    latent = spec.variant == "latent"
    e, f = int(spec.head_dim), int(spec.value_dim)
    if latent:  # the loop contracts and accumulates over the rank; q's dim and the output's are X, Y
        x, y = e, f
        e = f = int(spec.param("rank"))
    be, bf = _pow2(e), _pow2(f)
    top_left = spec.variant in ("dense", "gqa_merge", "latent")
    dims = {
        "GQA": str(max(1, int(spec.gqa))), "E": str(e), "F": str(f), "BLOCK_E": str(be), "BLOCK_F": str(bf),
        "EMASK_Q": f" & (offs_e[None, :] < {e})" if be != e else "",
        "FMASK_AND": f" & (offs_f[None, :] < {f})" if bf != f else "",
        "FMASK_STORE": f" & (offs_f[None, :] < {f})" if bf != f else "",
    }
    if family == "linear":
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
