"""Save an optimized model as an artifact directory and load it in a fresh process.

Layout: ``model.pt2`` (the rewritten program), ``plan.json`` (schema ``FORMAT``: plan, call spec,
provenance, kernel hashes), ``kernels/`` (the generated kernel sources, one per planned spec),
and, when the caller asks, ``report.md`` with its plot. Export writes everything into a temporary
directory beside the target and renames it into place, so an interrupted export leaves nothing at
the target path. Load regenerates every kernel from the specs in plan.json and refuses a kernel
file whose hash differs; the kernels that run are always our codegen's, never the files' text.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import codegen  # noqa: F401  (the custom op must exist before torch.export.load)
from codegen.sources import kernel_sources
from passes.capture import CallSpec
from passes.dynamic import LengthRange
from passes.plan import Plan
from rewriter.api import OptimizedModel

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: provenance and kernels/ with hashes; 1 (still loaded): model.pt2 + plan.json only
READABLE = (1, 2)
KERNELS = "kernels"


class ArtifactError(ValueError):
    """An artifact directory is corrupted, partial or tampered with; the message names the file."""


class NotAnArtifact(ArtifactError, FileNotFoundError):
    """The path is not an artifact directory, or lacks model.pt2 / plan.json."""


def _pytree_modules(spec) -> list[str]:
    """Python modules defining the container types in an input/output spec (e.g. HF ModelOutput)."""
    found: set[str] = set()
    stack = [spec]
    while stack:
        s = stack.pop()
        if s is None:
            continue
        t = getattr(s, "type", None)
        mod = getattr(t, "__module__", "builtins")
        if t is not None and mod not in ("builtins", "collections") and not mod.startswith("torch"):
            found.add(mod)
        stack.extend(s.children() if hasattr(s, "children") else [])
    return sorted(found)


def _kernel_fields(site, variant: str = "", params: Optional[dict] = None) -> dict[str, Any]:
    """The spec fields a site fixes (what the kernel is specialised on besides the variant's params).

    A variant whose surgery changes the K/V heads (``kv_heads`` on its record) has its kernel
    specialised on the heads it reads after the surgery."""
    from passes.variants import VARIANTS
    kv = int(site.num_kv_heads)
    rec = VARIANTS.get(variant)
    hook = rec.kv_heads if rec is not None else None
    if hook is not None:
        kv = hook(site, params or {})
    return {"head_dim": int(site.head_dim), "value_dim": int(site.v_head_dim),
            "gqa": max(1, int(site.num_heads) // max(1, kv)), "causal": bool(site.causal)}


def planned_kernels(plan: Plan, failures: Optional[dict] = None) -> dict[str, dict[str, Any]]:
    """{filename: {source, sha256, site, variant, params, fields}} for every site the plan rewrote.

    A site whose kernel source cannot be generated is left out (it runs the variant's PyTorch path, as
    the op does when a kernel fails to generate); with ``failures`` given, {site index: reason} is
    filled in for those, so export records them instead of losing the plan.
    """
    out: dict[str, dict[str, Any]] = {}
    for d in plan.decisions:
        if d.variant == "original":
            continue
        fields = _kernel_fields(d.site, d.variant, d.params)
        try:
            sources = kernel_sources(d.variant, d.params, **fields)
        except Exception as e:  # a spec codegen cannot make: the site keeps its PyTorch path
            logger.warning("site %d: no kernel source for %s %s (%s: %s); it runs the PyTorch path",
                           d.site.index, d.variant, d.params, type(e).__name__, e)
            if failures is not None:
                failures[d.site.index] = f"{type(e).__name__}: {e}"
            continue
        for name, (src, digest) in sources.items():
            entry = out.setdefault(name, {"source": src, "sha256": digest, "variant": d.variant,
                                          "params": dict(d.params), "fields": fields, "sites": []})
            entry["sites"].append(d.site.index)
    return out


def _corrections(plan: Plan) -> dict[str, dict]:
    """{site index: corrections} for sites whose plan adds a correction the op applies after the kernel."""
    from codegen.corrections import split_corrections
    out = {}
    for d in plan.decisions:
        fixes = split_corrections(d.params)[1] if d.variant != "original" else {}
        if fixes:
            out[str(d.site.index)] = {**fixes, "runs": "PyTorch, on top of the kernel's output"}
    return out


def provenance(opt: OptimizedModel) -> dict[str, Any]:
    """Who made the artifact, with what, when, and for which inputs."""
    try:
        version = importlib.metadata.version("attention-rewriter")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown (not installed)"
    return {
        "package": "attention-rewriter", "version": version, "torch": torch.__version__,
        "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.machine(),
        "input_signature": opt.captured_for, "example_shapes": opt.example_shapes,
        "lengths": None if opt.lengths is None else opt.lengths.to_json(),
    }


def _prepare_target(out: Path) -> None:
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"{out} exists and is a file; choose a directory path for the artifact")
    if out.is_dir() and any(out.iterdir()) and not (out / "plan.json").exists():
        raise FileExistsError(f"{out} exists, is not empty and is not an artifact; refusing to replace it "
                              "(choose another --out or remove it)")


class ExportError(ArtifactError, RuntimeError):
    """A part of the artifact could not be written; the message names it and where the plan was kept."""


def export(opt: OptimizedModel, path: str | Path, extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write ``opt`` to directory ``path`` atomically (an existing artifact there is replaced); returns it.

    ``extra(tmpdir)`` may add files (the report) before the directory is moved into place. When a part
    cannot be written (the program, the report) the artifact at ``path`` is left as it was, everything
    else is kept in ``<path>.incomplete`` and ExportError says which part failed and why.
    """
    from rewriter.distributed import StageModel, export_stages  # imported on use, like load_pipeline below

    if isinstance(opt, StageModel):  # a rank's share of a distributed plan: one artifact per stage
        return export_stages(opt, path)
    if not isinstance(opt, OptimizedModel):
        raise TypeError(f"export expects the module rewriter.optimize returned, not {type(opt).__name__}")
    out = Path(path)
    _prepare_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    failed: list[tuple[str, Exception]] = []
    try:
        try:
            torch.export.save(opt.program, tmp / "model.pt2")
        except Exception as e:  # the plan below is still written: a finished plan is never lost
            failed.append(("model.pt2", e))
        kernel_failures: dict = {}
        kernels = planned_kernels(opt.plan, kernel_failures)
        (tmp / KERNELS).mkdir()
        for name, k in kernels.items():
            (tmp / KERNELS / name).write_text(k["source"])
        meta = {"format": FORMAT, "plan": opt.plan.to_json(), "call": opt.spec.to_json(),
                "signature": opt.captured_for, "report": str(opt.plan),
                "lengths": None if opt.lengths is None else opt.lengths.to_json(),
                "example_shapes": opt.example_shapes, "provenance": provenance(opt),
                "kernels": {n: {k: v for k, v in e.items() if k != "source"} for n, e in kernels.items()},
                "kernel_failures": {str(i): f"no kernel source ({why}); the site runs its PyTorch path"
                                    for i, why in kernel_failures.items()},
                "corrections": _corrections(opt.plan),
                "model_sha256": _sha256(tmp / "model.pt2") if not failed else None,
                "pytree_modules": _pytree_modules(opt.program.call_spec.in_spec)
                + _pytree_modules(opt.program.call_spec.out_spec)}
        (tmp / "plan.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        if extra is not None:
            try:
                extra(tmp)
            except Exception as e:
                failed.append(("the report", e))
        if failed:
            raise _incomplete(tmp, out, failed)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported to %s", out)
    return out


def _incomplete(tmp: Path, out: Path, failed: list[tuple[str, Exception]]) -> ExportError:
    """Keep what was written in ``<out>.incomplete`` and say what failed (the artifact at ``out`` stays)."""
    keep = out.with_name(out.name + ".incomplete")
    shutil.rmtree(keep, ignore_errors=True)
    try:
        shutil.copytree(tmp, keep)
        where = f"the finished plan was kept in {keep / 'plan.json'}"
    except OSError as e:
        where = f"the plan could not be kept either ({e})"
    parts = "; ".join(f"{part}: {type(e).__name__}: {first}" for part, e in failed
                      for first in [next((x for x in str(e).splitlines() if x.strip()), "")])
    state = "the artifact there is unchanged" if (out / "plan.json").exists() else "nothing was written there"
    err = ExportError(f"could not export to {out}: writing {parts}; {where}; {state}")
    err.__cause__ = failed[0][1]
    return err


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an artifact already there is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is corrupted (not readable JSON: {e}); re-export the artifact") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is corrupted (expected a JSON object); re-export the artifact")
    missing = [k for k in ("format", "plan", "call", "signature") if k not in meta]
    if missing:
        raise ArtifactError(f"{path} is partial: missing {', '.join(missing)}; re-export the artifact")
    if meta.get("format") not in READABLE:
        raise ArtifactError(f"{path}: artifact format {meta.get('format')!r} is not one this version reads "
                            f"({', '.join(map(str, READABLE))}); re-export it")
    return meta


def read(path: str | Path) -> dict:
    """The metadata of an artifact directory (plan.json), checked; raises ArtifactError for anything else."""
    src = Path(path)
    if not src.is_dir():
        raise NotAnArtifact(f"{src} is not a rewriter artifact (not a directory)")
    missing = [f for f in ("model.pt2", "plan.json") if not (src / f).exists()]
    if missing:
        raise NotAnArtifact(
            f"{src} is not a rewriter artifact or is partial (needs model.pt2 and plan.json; "
            f"missing {', '.join(missing)})")
    return _read_meta(src / "plan.json")


def verify_kernels(src: Path, meta: dict) -> list[str]:
    """Regenerate every planned kernel from its spec and compare with ``kernels/``; returns the files checked.

    Raises ArtifactError naming the first file that is missing, unlisted or whose hash differs.
    """
    if meta["format"] < 2:
        return []
    plan = Plan.from_json(meta["plan"])
    fresh = planned_kernels(plan)
    listed = meta.get("kernels", {})
    for name, entry in fresh.items():
        f = src / KERNELS / name
        if name not in listed:
            raise ArtifactError(f"{src / 'plan.json'} does not list kernel {name} that its plan needs; re-export")
        if not f.exists():
            raise ArtifactError(f"{f} is missing (the artifact is partial); re-export the artifact")
        got = hashlib.sha256(f.read_bytes()).hexdigest()
        if got != entry["sha256"] or listed[name].get("sha256") != entry["sha256"]:
            raise ArtifactError(f"{f} does not match the kernel our codegen generates for its spec "
                                f"(sha256 {got[:12]}..., expected {entry['sha256'][:12]}...); refusing to load it")
    on_disk = sorted(p.name for p in (src / KERNELS).glob("*")) if (src / KERNELS).is_dir() else []
    stray = [n for n in on_disk if n not in fresh]
    if stray:
        raise ArtifactError(f"{src / KERNELS / stray[0]} is not a kernel of this plan; refusing to load the artifact")
    return sorted(fresh)


def load(path: str | Path) -> OptimizedModel:
    """Load a directory written by ``export``; the result has the original call signature and plan."""
    src = Path(path)
    if (src / "pipeline.json").is_file():  # written by a distributed run: its stages, run in turn
        from rewriter.distributed import load_pipeline
        return load_pipeline(src)
    meta = read(src)
    want = meta.get("model_sha256")
    if want is not None and _sha256(src / "model.pt2") != want:
        raise ArtifactError(f"{src / 'model.pt2'} does not match the hash in plan.json (modified or partial); "
                            "re-export the artifact")
    verify_kernels(src, meta)
    for mod in meta.get("pytree_modules", []):
        # Output containers (Hugging Face ModelOutput, say) register with pytree when their module loads.
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise ImportError(f"{src}: the model's inputs/outputs use types from {mod!r}; install it ({e})") from e
    try:
        program = torch.export.load(src / "model.pt2")
    except Exception as e:  # zip, pickle and schema errors all mean the same thing to the user
        raise ArtifactError(f"{src / 'model.pt2'} is corrupted or partial ({type(e).__name__}: {e}); "
                            "re-export the artifact") from e
    try:
        call = meta["call"]
        spec = CallSpec(call["names"], call["captured"], call.get("injected", {}), call.get("var_positional", False))
        plan = Plan.from_json(meta["plan"])
        rng = meta.get("lengths")
        lengths = None if rng is None else LengthRange(tuple(rng["names"]), int(rng["low"]), int(rng["high"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{src / 'plan.json'} is corrupted ({type(e).__name__}: {e}); "
                            "re-export the artifact") from e
    return OptimizedModel(program, spec, plan, rebuild=None, captured_for=meta["signature"], lengths=lengths,
                          example_shapes=meta.get("example_shapes"))


def describe(path: str | Path) -> str:
    """A readable summary of an artifact: plan, provenance, files and kernel hashes (verified)."""
    src = Path(path)
    meta = read(src)
    try:
        plan = Plan.from_json(meta["plan"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{src / 'plan.json'} is corrupted ({type(e).__name__}: {e}); "
                            "re-export the artifact") from e
    prov = meta.get("provenance") or {}
    lines = [f"artifact {src} (format {meta['format']})", "", str(plan), "", "provenance:"]
    if not prov:
        lines.append("  (none recorded: format 1 artifact)")
    for key in ("package", "version", "torch", "python", "created", "host", "input_signature"):
        if key in prov:
            lines.append(f"  {key}: {prov[key]}")
    rng = meta.get("lengths")
    lines.append("  sequence lengths: " + ("the captured shapes only" if not rng else
                                          f"{rng['low']}..{rng['high']} of {', '.join(rng['names'])}"))
    for name, shp in (meta.get("example_shapes") or {}).items():
        lines.append(f"  input {name}: {shp.get('shape', shp.get('value'))} {shp.get('dtype', '')}".rstrip())
    lines += ["", "files:"]
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        lines.append(f"  {f.relative_to(src)}  {f.stat().st_size:,} bytes")
    kernels = meta.get("kernels") or {}
    lines += ["", f"kernels ({len(kernels)}):" if kernels else "kernels: none (every planned variant lowers to "
              "PyTorch ops with no generated source)"]
    try:
        verify_kernels(src, meta)
        status = "verified: each file matches the source our codegen generates from its spec"
    except ArtifactError as e:
        status = f"NOT VERIFIED: {e}"
    for name, k in sorted(kernels.items()):
        lines.append(f"  {name}  sha256 {k.get('sha256', '?')}  {k.get('variant')} {k.get('params')} "
                     f"sites {k.get('sites')}")
    if kernels:
        lines.append(f"  {status}")
    for site, fix in sorted((meta.get("corrections") or {}).items()):
        named = ", ".join(f"{k}={v}" for k, v in fix.items() if k != "runs")
        lines.append(f"  site {site}: correction {named} runs in PyTorch on top of the kernel's output")
    for site, why in sorted((meta.get("kernel_failures") or {}).items()):
        lines.append(f"  site {site}: {why}")
    if meta.get("model_sha256"):
        lines.append(f"model.pt2 sha256 {meta['model_sha256']}")
    return "\n".join(lines)
