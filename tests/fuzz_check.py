"""Run generated attention programs through find and rewrite and count what went wrong."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

import rewriter
from codegen import KERNELS
from passes.capture import capture, graph_context
from passes.find import find_matches
from passes.rewrite import rewrite_graph
from passes.variants import VARIANTS
from tests.fuzz_programs import Program, generate

logger = logging.getLogger(__name__)

FLAGS = ("causal", "mask_kind", "is_cross", "num_heads", "num_kv_heads", "head_dim", "q_len", "kv_len", "batch",
         "window", "softcap", "has_bias")


@dataclass
class Tally:
    """Counts over a fuzz run and the reproducers of every failure."""

    programs: int = 0
    found: int = 0
    misses: int = 0
    wrong_flags: int = 0
    false_positives: int = 0
    wrong_results: int = 0
    crashes: int = 0
    variants_checked: Counter = field(default_factory=Counter)
    variants_no_kernel: set = field(default_factory=set)
    variant_refusals: Counter = field(default_factory=Counter)  # a kernel refused a site its applies() took
    findings: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    def line(self) -> str:
        """The counts, as the run prints them."""
        checked = ", ".join(f"{k}={v}" for k, v in sorted(self.variants_checked.items())) or "none"
        return (f"fuzz: {self.programs} programs, {self.found} found, {self.misses} misses, {self.wrong_flags} wrong "
                f"flags, {self.false_positives} false positives, {self.wrong_results} wrong results, {self.crashes} "
                f"crashes; forced variants checked: {checked}; skipped (no kernel yet): "
                f"{', '.join(sorted(self.variants_no_kernel)) or 'none'}; kernels refusing a site their variant "
                f"applies to: {dict(self.variant_refusals) or 'none'}")

    @property
    def bad(self) -> int:
        return self.misses + self.wrong_flags + self.false_positives + self.wrong_results + self.crashes


def _fail(t: Tally, prog: Program, what: str) -> None:
    t.failures.append(f"{what}\n--- reproducer ---\n{prog.reproducer()}")


def _spec_reference(name: str):
    """The naive reference of variant ``name``'s kernel (full op contract), from its registered record."""
    from codegen.registry import kernel_variants
    return kernel_variants()[name].reference


def _forced_variants(t: Tally, prog: Program, site) -> None:
    """Every non-dense variant that applies, forced, must equal its reference on the captured q, k, v
    (and the mask, soft-cap and fill the op carried)."""
    for name, module in VARIANTS.items():
        if module.kernel.exact_always or module.applies(site):
            continue
        if name not in KERNELS:
            t.variants_no_kernel.add(name)
            continue
        # small sizes so windows, blocks and chunks matter at the programs' lengths
        params = {k: (min(v, 4) if isinstance(v, int) and not isinstance(v, bool) and v > 0 and k != "sinks" else v)
                  for k, v in module.defaults.items()}
        calls = []
        kernel = KERNELS[name]

        def spy(q, k, v, mask, scale, causal, **kw):
            out = kernel(q, k, v, mask, scale, causal, **kw)
            calls.append((q, k, v, mask, scale, causal, kw, out))
            return out

        model, args = prog.build()
        KERNELS[name] = spy
        try:
            opt = rewriter.optimize(model, args, variants={name: params}, budget=None)
            if opt.plan.decisions[0].variant != name:
                continue  # the planner kept the site (its reason is in the plan); nothing to compare
            calls.clear()  # compare the calls of one plain run, not the planner's
            with torch.no_grad():
                opt(*args)
        except ValueError as e:
            # A clean refusal by the kernel, not a wrong number: the variant's applies() should have
            # refused the site. Counted and shown, for the variant's owner.
            t.variant_refusals[name] += 1
            t.findings.append(f"{name}: {e}\n{prog.reproducer()}")
            continue
        finally:
            KERNELS[name] = kernel
        t.variants_checked[name] += 1
        full = _spec_reference(name)
        for q, k, v, mask, scale, causal, kw, out in calls[:1]:
            ref = full(q, k, v, mask, scale, causal, **kw)
            if not torch.allclose(out.float(), ref.float(), atol=1e-4, rtol=1e-4):
                t.wrong_results += 1
                _fail(t, prog, f"variant {name} ({kw}) differs from its reference by "
                               f"{(out.float() - ref.float()).abs().max():.2e}")


def check_program(t: Tally, prog: Program, variants: bool = True) -> None:
    """Find, compare flags, rewrite dense and compare outputs on fresh inputs; count into ``t``."""
    t.programs += 1
    try:
        model, args = prog.build()
        ep, spec = capture(model, args)
        matches, _ = find_matches(graph_context(ep))
        want_sites = prog.expect.get("sites", 1)  # a per-sample loop is one site per sample
        if len(matches) < want_sites:
            t.misses += 1
            return _fail(t, prog, f"{len(matches)} of {want_sites} sites found")
        if len(matches) > want_sites:
            t.false_positives += 1
            return _fail(t, prog, f"{len(matches)} sites found, {want_sites} expected")
        t.found += 1
        for m in matches:
            site = m.site
            got = {f: getattr(site, f) for f in FLAGS if f in prog.expect}
            want = {f: prog.expect[f] for f in got}
            if not site.rewritable or got != want:
                t.wrong_flags += 1
                diff = {f: (got[f], want[f]) for f in got if got[f] != want[f]}
                return _fail(t, prog, f"flags (got, want): {diff} rewritable={site.rewritable} {site.reason}")
        site = matches[0].site
        failures = rewrite_graph(ep.graph_module, [(m, "dense", {}) for m in matches])
        if failures:
            t.crashes += 1
            return _fail(t, prog, f"rewrite failed: {failures}")
        args2 = _fresh_inputs(prog, args)
        with torch.no_grad():
            ref = model(*args2)
            out = ep.module()(**spec.bind(args2, {}))
        err = rewriter.relative_l2(ref, out)
        if not err < 1e-5:
            t.wrong_results += 1
            return _fail(t, prog, f"dense rewrite error {err:.2e}")
        if variants:
            _forced_variants(t, prog, site)
    except Exception as e:  # a crash anywhere is a finding, with its reproducer
        t.crashes += 1
        _fail(t, prog, f"crash: {type(e).__name__}: {e}")


def _fresh_inputs(prog: Program, args: tuple) -> tuple:
    env: dict = {}
    exec(compile(prog.source, "<fuzz>", "exec"), env)
    return env["inputs"](prog.seed + 100_000)


def run(seeds, variants_every: int = 1) -> Tally:
    """Check every program in ``seeds`` (forcing the other variants on every ``variants_every``-th); the tally."""
    t = Tally()
    for i, seed in enumerate(seeds):
        check_program(t, generate(seed), variants=variants_every > 0 and i % variants_every == 0)
    return t
