"""Random attention programs: every one found once, with the right flags, and rewritten exactly."""
from __future__ import annotations

import dataclasses
import logging

import pytest

import passes.variants as variants_registry
from codegen import KERNELS
from passes.variants import VARIANTS
from tests import fuzz_check
from tests.fuzz_programs import generate

DEFAULT_PROGRAMS = 150
SLOW_PROGRAMS = 1000


def _run(seeds, capsys, variants_every: int) -> fuzz_check.Tally:
    logging.disable(logging.WARNING)
    try:
        t = fuzz_check.run(seeds, variants_every)
    finally:
        logging.disable(logging.NOTSET)
    with capsys.disabled():
        print("\n" + t.line())
    assert t.bad == 0, t.line() + "\n\n" + "\n\n".join(t.failures[:3])
    return t


def test_fuzz_default_tier(capsys):
    # Forcing every other variant runs the planner per variant: every 10th program in this tier.
    t = _run(range(DEFAULT_PROGRAMS), capsys, variants_every=10)
    assert t.programs == t.found == DEFAULT_PROGRAMS


@pytest.mark.slow
def test_fuzz_slow_tier(capsys):
    t = _run(range(DEFAULT_PROGRAMS, DEFAULT_PROGRAMS + SLOW_PROGRAMS), capsys, variants_every=5)
    assert t.programs == t.found == SLOW_PROGRAMS


def test_generator_is_deterministic_and_varied():
    assert generate(5).source == generate(5).source
    summaries = {generate(s).summary.split(" ")[0] for s in range(60)}
    assert len(summaries) >= 8  # layouts x operators x GQA methods
    src = "\n".join(generate(s).source for s in range(200))
    for needle in ("baddbmm", "einsum", "torch.bmm", "repeat_interleave", "expand(", "tanh", "masked_fill",
                   "torch.where", "full_like", "rot(", "LayerNorm", "Dropout", "self.rel", "slopes", "memory",
                   # issue 14: dead clones, in-place ops and writes, transposed products, tensor scales, lengths
                   "kept = s.clone()", "inplace=True", "s.mul_(", "s += ", "] += (", "s.masked_fill_(", "] = ",
                   "v.transpose(-2, -1) @ p.transpose(-2, -1)", "torch.matmul(k, q.transpose(-1, -2))", "self.ls",
                   "self.qs[:n]", ".item()"):
        assert needle in src, needle


def test_a_failing_program_prints_a_standalone_reproducer():
    prog = generate(3)
    t = fuzz_check.Tally()
    fuzz_check._fail(t, prog, "example")
    text = t.failures[0]
    assert "class Model" in text and "def inputs" in text and "rewriter.find_attention" in text
    env: dict = {}
    exec(compile(prog.source, "<repro>", "exec"), env)  # the source alone defines the model and inputs


def test_forced_variant_check_is_generic(monkeypatch):
    """A variant with a kernel is forced and compared with its reference; a wrong kernel is caught."""
    prog = next(p for p in map(generate, range(100)) if not p.expect["is_cross"] and p.expect["mask_kind"] == "none"
                and p.expect["softcap"] == 0.0 and p.expect["window"] is None)
    name = sorted(n for n, r in VARIANTS.items() if not r.kernel.exact_always)[0]  # any approximate variant:
    rec = VARIANTS[name]  # made to apply here, with a kernel that is its reference
    monkeypatch.setitem(variants_registry._discover(), name, dataclasses.replace(rec, applies=lambda s: None))

    def good(q, k, v, mask, scale, causal, **kw):
        return rec.kernel.reference(q, k, v, mask, scale, causal, **kw)

    monkeypatch.setitem(KERNELS, name, good)
    t = fuzz_check.Tally()
    fuzz_check.check_program(t, prog)
    assert t.variants_checked[name] == 1 and t.bad == 0, t.failures
    monkeypatch.setitem(KERNELS, name, lambda *a, **kw: good(*a, **kw) + 1.0)
    t = fuzz_check.Tally()
    fuzz_check.check_program(t, prog)
    assert t.wrong_results >= 1
