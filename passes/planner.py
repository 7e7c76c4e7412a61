"""Choose a variant per site: the cheapest candidate (by the cost model) whose error fits the budget.

Per site, every allowed variant that applies offers a grid of parameters. Each candidate is priced
by the Einsum-cascade cost model at the site's shapes on the target's profile, and scored on the
site's calibration records (its kernel on the recorded q, k, v against the exact output). The
cheapest candidate whose site error fits the site's share of the budget is chosen. Then the
end-to-end error is measured, and while it is over the budget the site with the worst error per
unit of time saved backs off to its next more accurate candidate (eventually exact ``dense``).
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from codegen import KERNELS
from passes import pricing
from passes.calibrate import SiteRecord, site_error
from passes.find import Match
from passes.site import AttentionSite
from passes.variants import VARIANTS

logger = logging.getLogger(__name__)

# Every name the design reserves; those without a module or kernel yet are refused with a clear message.
CATALOGUE = (
    "dense", "sliding_window", "sinks_window", "neighborhood_2d", "block_sparse", "linear", "latent", "gqa_merge",
)

VariantSpec = Union[None, str, list, tuple, dict]

# Site errors at or below this are float rounding (fp32 attention differs from the float64 record
# by ~1e-7), not an approximation: too small to measure a site's gain with.
ROUNDING = 1e-4

# The default per-site cap on an approximate site's own error (relative L2 of its attention output
# on the calibration records). Calibration data is small; a layer whose attention was replaced
# wholesale (site error near 1) may matter on inputs it did not show. See README "The budget".
DEFAULT_SITE_CAP = 0.3

# Candidates predicted within this share of the cheapest fitting one count as equally fast and are
# ranked by accuracy: a profile measured on another day (or a noisy one) moves predicted times by
# 10-20%, and that must not flip the plan between near-equals.
TIE_MARGIN = 0.3


def available() -> list[str]:
    """Variants that have both a planner module and a registered kernel."""
    return [n for n in CATALOGUE if n in VARIANTS and n in KERNELS]


def _check_params(name: str, params: dict) -> dict:
    accepted: dict = getattr(VARIANTS[name], "PARAMS", {})
    out = {}
    for k, v in params.items():
        if k not in accepted:
            raise ValueError(f"variant {name!r} takes no parameter {k!r}; it takes: {', '.join(accepted) or 'none'}")
        want = accepted[k]
        ok = isinstance(v, want) if isinstance(want, tuple) else (
            isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else isinstance(v, want)
            and not (want is int and isinstance(v, bool)))
        if not ok:
            raise ValueError(f"variant {name!r}: parameter {k!r} must be {getattr(want, '__name__', want)}, "
                             f"not {v!r}")
        out[k] = v
    check = getattr(VARIANTS[name], "check_params", None)
    if check is not None:
        check(out)
    return out


def normalise_variants(spec: VariantSpec) -> dict[str, Optional[dict]]:
    """Turn the user's ``variants=`` argument into {name: fixed params or None}, validating names and params."""
    if spec is None:
        return {name: None for name in available()}
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, dict):
        items = {k: (dict(v) if v is not None else None) for k, v in spec.items()}
    elif isinstance(spec, (list, tuple)):
        items = {name: None for name in spec}
    else:
        raise TypeError(f"variants must be None, a name, a list of names or a dict of name -> params, not {spec!r}")
    for name in list(items):
        if name not in CATALOGUE:
            raise ValueError(f"unknown variant {name!r}; the catalogue is: {', '.join(CATALOGUE)}")
        if name not in VARIANTS or name not in KERNELS:
            have = ("a planner module but no kernel yet" if name in VARIANTS else
                    "a kernel, but the planner does not offer it yet" if name in KERNELS else "no implementation yet")
            raise ValueError(f"variant {name!r} is in the catalogue but has {have}; "
                             f"available now: {', '.join(available())}")
        if items[name] is not None:
            items[name] = _check_params(name, items[name])
    return items


def drops_band(site: AttentionSite, variant: str, params: dict) -> bool:
    """True when ``variant`` reproduces the site's own band mask itself (its native window), so the rewrite
    passes the op everything but the band."""
    return (variant in ("sliding_window", "sinks_window") and site.window is not None
            and int(params.get("window", -1)) == site.window and int(params.get("sinks", 0) or 0) == 0
            and not params.get("delta"))


def choose(m: Match, allowed: dict[str, Optional[dict]]) -> tuple[Optional[str], dict, str]:
    """(variant, params, reason) without calibration: the first allowed variant that applies (backend)."""
    if not m.site.rewritable:
        return None, {}, m.site.reason
    refusals = []
    for name, fixed in allowed.items():
        module = VARIANTS[name]
        why = module.applies(m.site)
        if why:
            refusals.append(f"{name}: {why}")
            continue
        params: dict[str, Any] = {**getattr(module, "DEFAULTS", {}), **(fixed or {})}
        reason = "exact; fused kernel" if name == "dense" else "forced"
        return name, params, reason
    return None, {}, "; ".join(refusals) or "no allowed variant applies"


@dataclass
class Candidate:
    """One (variant, params) for one site, with its predicted time and measured site error."""

    variant: str
    params: dict
    seconds: float
    exact: bool = False
    error: Optional[float] = None  # None until scored
    extra: tuple = ()  # fitted tensors the variant's kernel takes (latent factors)
    inputs: Optional[Callable] = None  # record -> (q, k, v) the variant reads (latent: low-rank K/V)
    probe: Optional[tuple[str, dict]] = None  # (variant, params) that evaluates it on the unchanged graph
    prepare: Optional[Callable[["Candidate"], None]] = None  # fits what the candidate needs, before scoring
    score_as: Optional[tuple[str, dict]] = None  # (kernel variant, its params) when they differ from the plan's
    failure: str = ""  # why the kernel refused the site's records, when it did

    def label(self) -> str:
        """``variant(k=v,...)``, as the plan prints it."""
        ps = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k != "block")
        return f"{self.variant}({ps})" if ps else self.variant


@dataclass
class SitePlan:
    """The planner's state for one site."""

    site: AttentionSite
    dense: Candidate
    options: list[Candidate]  # priced, applicable, cheaper than dense; cheapest first
    refusals: list[str] = field(default_factory=list)
    chosen: Optional[Candidate] = None
    note: str = ""
    gain: float = 1.0  # output error per unit of site error, measured by a probe run


def site_candidates(site: AttentionSite, allowed: dict[str, Optional[dict]], hw, forced: bool,
                    blocked: Optional[dict[str, str]] = None, facts: Optional[dict] = None) -> SitePlan:
    """Every allowed variant's applicable parameter choices for ``site``, priced (cheapest first).

    ``blocked``: variants the graph rules out at this site, with the reason (e.g. latent without factorable K/V).
    """
    dense_s = pricing.seconds(site, "dense", {}, hw)
    dense = Candidate("dense", {}, dense_s if dense_s is not None else math.inf, exact=True, error=0.0)
    sp = SitePlan(site, dense, [])
    for name, fixed in allowed.items():
        if name == "dense":
            continue
        module = VARIANTS[name]
        why = module.applies(site) or (blocked or {}).get(name)
        if why:
            sp.refusals.append(f"{name}: {why}")
            continue
        takes_facts = "facts" in inspect.signature(module.grid).parameters
        if fixed is not None:
            complete = getattr(module, "complete", lambda p, f: p)
            grid = [complete({**getattr(module, "DEFAULTS", {}), **fixed}, facts)]
        else:
            grid = module.grid(site, facts) if takes_facts else module.grid(site)
        if not grid:
            sp.refusals.append(f"{name}: no parameter choice fits the site's shape")
        for params in grid:
            params = {**{k: v for k, v in getattr(module, "DEFAULTS", {}).items() if k not in params}, **params}
            t = pricing.seconds(site, name, params, hw)
            if t is None:
                sp.refusals.append(f"{name}: cannot be priced at this site")
                continue
            exact = bool(getattr(module, "exact", lambda s, p: False)(site, params))
            # the model's own window is its semantics, exact and the pattern a window kernel is for
            if forced or t < dense.seconds or drops_band(site, name, params):
                sp.options.append(Candidate(name, params, t, exact=exact, error=0.0 if exact else None))
    sp.options.sort(key=lambda c: c.seconds)
    return sp


def _score(sp: SitePlan, cand: Candidate, records: Sequence[SiteRecord]) -> float:
    if cand.error is None and cand.prepare is not None:
        cand.prepare(cand)
        cand.prepare = None
    if cand.error is None:
        if cand.exact:
            cand.error = 0.0  # float rounding of an exact rewrite is not spent from the budget
        else:
            try:
                variant, params = cand.score_as or (cand.variant, cand.params)
                cand.error = site_error(records, variant, params, extra=cand.extra, inputs=cand.inputs)
            except (ValueError, RuntimeError, NotImplementedError) as e:
                logger.info("site %s: %s failed on calibration records: %s", sp.site.name, cand.label(), e)
                cand.error = math.inf
                cand.failure = f"{type(e).__name__}: {e}"
    return cand.error


def _next_more_accurate(sp: SitePlan, records: Sequence[SiteRecord]) -> Candidate:
    cur = sp.chosen
    assert cur is not None
    for cand in sp.options:
        if cand.seconds < cur.seconds or cand is cur:
            continue
        if _score(sp, cand, records) < (cur.error or 0.0):
            return cand
    return sp.dense


Evaluate = Callable[[dict[int, tuple[str, dict]]], tuple[float, Optional[float]]]


@dataclass(frozen=True)
class Outcome:
    """What the search settled on."""

    sites: tuple  # SitePlan per site, in input order
    error: Optional[float]  # end-to-end error on the calibration rows
    holdout_error: Optional[float]
    backoffs: int


def _probe_gains(sites: Sequence[SitePlan], records, evaluate: Evaluate, base: float,
                 say: Callable[[str], None]) -> None:
    """How much of a site's error reaches the model's output, from one run with only that site approximated.

    The residual stream and later layers damp (or amplify) a site's error; the gain converts a site
    error into the end-to-end error the budget counts. The probe is the site's most accurate
    non-exact option whose error is above float rounding, so the gain is measured in the small-error
    regime the plan works in. An option that is exact on the calibration rows up to rounding (a
    block-sparse choice that keeps every real key of short padded rows) would measure only noise,
    and a gain near 0 from it would let every coarser option through; without a usable probe the
    gain stays 1.
    """
    dense_all = {i: ("dense", {}) for i in range(len(sites))}
    for i, sp in enumerate(sites):
        inexact = [c for c in sp.options if not c.exact and ROUNDING < _score(sp, c, records[i]) < math.inf]
        if not inexact:
            continue
        probe = min(inexact, key=lambda c: c.error)
        if probe.error <= 0:
            continue
        err, _ = evaluate({**dense_all, i: probe.probe or (probe.variant, probe.params)})
        sp.gain = max(err - base, 0.0) / probe.error
        say(f"site {i} {sp.site.name}: {probe.label()} site error {probe.error:.3g} -> output error {err:.3g} "
            f"(gain {sp.gain:.2f})")


def _pick(fits: Sequence[Candidate]) -> Candidate:
    """The most accurate of the fitting candidates priced within TIE_MARGIN of the cheapest (exact first)."""
    fastest = min(fits, key=lambda c: c.seconds)
    close = [c for c in fits if c.seconds <= fastest.seconds * (1 + TIE_MARGIN)]
    return min(close, key=lambda c: (not c.exact, c.error or 0.0, c.seconds))


def search(
    sites: Sequence[SitePlan],
    records: Sequence[Sequence[SiteRecord]],
    evaluate: Evaluate,
    budget: Optional[float],
    progress: Optional[Callable[[str], None]] = None,
    max_rounds: int = 64,
    site_cap: Optional[float] = None,
    gain_evaluate: Optional[Evaluate] = None,
) -> Outcome:
    """Choose per site, then back off until the measured end-to-end error fits ``budget``.

    A site's share is the whole budget, in output-error units (site error times the site's measured
    gain): each site alone would fit. Together they may not, which the back-off settles with the
    measured error of the whole model. ``site_cap`` bounds each approximate site's own error, however
    little of it the calibration data shows at the output. ``gain_evaluate`` measures the gain probes
    when the budget's own metric is too noisy for one site's effect (a perplexity change can be
    negative on a few rows); it must be in the budget's units, or an upper proxy of them.
    """
    say = progress or (lambda msg: None)
    for sp in sites:
        sp.chosen = sp.dense
    if budget is None:  # no gate: the cheapest (a forced variant) wherever one applies and its kernel runs
        for i, sp in enumerate(sites):
            for cand in sp.options:
                if _score(sp, cand, records[i]) < math.inf:
                    sp.chosen = cand
                    sp.note = "forced, no accuracy gate"
                    break
            else:
                if sp.options:
                    sp.note = f"{sp.options[0].label()} refused by its kernel: {sp.options[0].failure or 'not finite'}"
    else:
        if budget > 0:
            probe = gain_evaluate or evaluate
            base, _ = probe({i: ("dense", {}) for i in range(len(sites))})
            _probe_gains(sites, records, probe, base, say)
        cap = math.inf if site_cap is None else site_cap
        for i, sp in enumerate(sites):
            fits = [c for c in sp.options if c.exact or (
                budget > 0 and _score(sp, c, records[i]) <= cap and c.error * sp.gain <= budget)]
            if fits:
                sp.chosen = _pick(fits)
                sp.note = "exact" if sp.chosen.exact else (
                    f"estimated model error {sp.chosen.error * sp.gain:.2g} fits the budget")
            elif sp.options:
                if budget == 0:
                    sp.note = "budget 0 admits exact rewrites only"
                else:
                    scored = [c for c in sp.options if c.error is not None]
                    best = min(scored, key=lambda c: c.error) if scored else sp.options[0]
                    capped = best.error > cap and best.error * sp.gain <= budget
                    sp.note = (f"no candidate fits: the most accurate, {best.label()}, has site error "
                               f"{best.error:.2g}" + (f", above the site cap {cap:g}" if capped else
                                                      f", about {best.error * sp.gain:.2g} at the output"))
            say(f"site {i} {sp.site.name}: {sp.chosen.label()}")

    def assignment() -> dict[int, tuple[str, dict]]:
        return {i: sp.chosen.probe or (sp.chosen.variant, sp.chosen.params) for i, sp in enumerate(sites)}

    err, held = evaluate(assignment())
    say(f"end-to-end error {err:.3g}" + ("" if budget is None else f" (budget {budget:g})"))
    rounds = 0
    while budget is not None and err > budget and rounds < max_rounds:
        movable = [i for i, sp in enumerate(sites) if sp.chosen is not sp.dense and not sp.chosen.exact]
        if not movable:
            break

        def cost_of_error(i: int) -> float:
            sp = sites[i]
            saved = max(sp.dense.seconds - sp.chosen.seconds, 1e-12)
            return (sp.chosen.error or 0.0) * sp.gain / saved

        worst = max(movable, key=cost_of_error)
        sp = sites[worst]
        prev = sp.chosen
        sp.chosen = _next_more_accurate(sp, records[worst])
        sp.note = f"backed off from {prev.label()} (site error {prev.error:.2g}) to fit the whole-model budget"
        rounds += 1
        err, held = evaluate(assignment())
        say(f"back-off {rounds}: site {worst} -> {sp.chosen.label()}, end-to-end error {err:.3g}")
    return Outcome(tuple(sites), err, held, rounds)
