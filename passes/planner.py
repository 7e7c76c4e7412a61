"""Choose a variant per site: the cheapest candidate (by the cost model) whose error fits the budget.

Per site, every allowed variant that applies offers a grid of parameters. Each candidate is priced
by the Einsum-cascade cost model at the site's shapes on the target's profile, and scored on the
site's calibration records (its kernel on the recorded q, k, v against the exact output). The
cheapest candidate whose site error fits the site's share of the budget is chosen. Then the
end-to-end error is measured, and while it is over the budget the site with the worst error per
unit of time saved backs off to its next more accurate candidate (eventually exact ``dense``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from codegen import KERNELS
from passes import pricing
from passes.calibrate import SiteRecord, site_error
from passes.find import Match
from passes.site import AttentionSite
from passes.variants import VARIANTS, exact_name

logger = logging.getLogger(__name__)

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
    """Every registered variant (the exact baseline first)."""
    return list(VARIANTS)


def _check_params(name: str, params: dict) -> dict:
    accepted = VARIANTS[name].params
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
    VARIANTS[name].check(out)
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
        bad = [x for x in spec if not isinstance(x, str)]
        if bad:
            raise TypeError(f"variants as a list holds names only, not {bad[0]!r}; give parameters as a dict, "
                            "for example {'sliding_window': {'window': 64}}")
        items = {name: None for name in spec}
    else:
        raise TypeError(f"variants must be None, a name, a list of names or a dict of name -> params, not {spec!r}")
    for name in list(items):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; the catalogue is: {', '.join(available())}")
        if name not in KERNELS:  # a broken install: the planner's record without its kernel
            raise ValueError(f"variant {name!r} has a planner record but no kernel yet (nothing registered "
                             f"it with the op); available now: {', '.join(n for n in available() if n in KERNELS)}")
        if items[name] is not None:
            items[name] = _check_params(name, items[name])
    return items


def drops_band(site: AttentionSite, variant: str, params: dict) -> bool:
    """True when ``variant`` reproduces the site's own band mask itself (its native window), so the rewrite
    passes the op everything but the band."""
    draws = VARIANTS[variant].draws_band if variant in VARIANTS else None
    return (draws is not None and site.window is not None and not params.get("delta")
            and draws(params) == site.window)


def choose(m: Match, allowed: dict[str, Optional[dict]]) -> tuple[Optional[str], dict, str]:
    """(variant, params, reason) without calibration: the first allowed variant that applies (backend)."""
    if not m.site.rewritable:
        return None, {}, m.site.reason
    refusals = []
    for name, fixed in allowed.items():
        rec = VARIANTS[name]
        why = rec.applies(m.site)
        if why:
            refusals.append(f"{name}: {why}")
            continue
        params: dict[str, Any] = {**rec.defaults, **(fixed or {})}
        reason = "exact; fused kernel" if rec.kernel.exact_always else "forced"
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
    inputs: Optional[Callable] = None  # record -> (q, k, v[, extra]) the variant reads (latent: low-rank K/V)
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
    gain: float = 1.0  # model error ~ gain * site_error ** power, measured by probe runs
    power: float = 1.0
    fits: dict = field(default_factory=dict)  # variant family -> (gain, power), where it was probed

    def estimate(self, c: "Candidate") -> float:
        """The model error candidate ``c`` is estimated to cause at this site (0 when exact)."""
        if c.exact or not c.error:
            return 0.0
        if not math.isfinite(c.error):
            return math.inf
        gain, power = self.fits.get(family(c), (self.gain, self.power))
        return gain * c.error ** power


def site_candidates(site: AttentionSite, allowed: dict[str, Optional[dict]], hw, forced: bool,
                    blocked: Optional[dict[str, str]] = None, facts: Optional[dict] = None) -> SitePlan:
    """Every allowed variant's applicable parameter choices for ``site``, priced (cheapest first).

    ``blocked``: variants the graph rules out at this site, with the reason (e.g. latent without factorable K/V).
    """
    base = exact_name()
    dense_s = pricing.seconds(site, base, {}, hw)
    dense = Candidate(base, {}, dense_s if dense_s is not None else math.inf, exact=True, error=0.0)
    sp = SitePlan(site, dense, [])
    for name, fixed in allowed.items():
        if name == base:
            continue
        rec = VARIANTS[name]
        why = rec.applies(site) or (blocked or {}).get(name)
        if why:
            sp.refusals.append(f"{name}: {why}")
            continue
        if fixed is not None:
            grid = [rec.complete({**rec.defaults, **fixed}, facts)]
            misfit = rec.fits(site, grid[0]) if rec.fits is not None else None
            if misfit:
                raise ValueError(f"{name} at site {site.index} ({site.name}): {misfit}")
        else:
            grid = rec.grid(site, facts)
        if not grid:
            sp.refusals.append(f"{name}: no parameter choice fits the site's shape")
        for params in grid:
            params = {**{k: v for k, v in rec.defaults.items() if k not in params}, **params}
            t = pricing.seconds(site, name, params, hw)
            if t is None:
                sp.refusals.append(f"{name}: cannot be priced at this site")
                continue
            exact = bool(rec.exact(site, params))
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


def score_all(sp: SitePlan, records: Sequence[SiteRecord]) -> None:
    """Score every candidate of ``sp`` on its records now (the search then needs no records: a site held by
    another process is planned from these scores alone)."""
    for cand in sp.options:
        _score(sp, cand, records)


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


def family(c: "Candidate") -> str:
    """A candidate's variant, with a correction it carries (its errors reach the output differently)."""
    return c.variant + ("+delta" if c.params.get("delta") else "")


def _probe_gains(sites: Sequence[SitePlan], records, evaluate: Evaluate, base: float,
                 say: Callable[[str], None], power: float = 1.0) -> None:
    """How a site's error reaches the model's output, from runs with only that site approximated.

    The residual stream and later layers damp (or amplify) a site's error, and neither linearly nor
    alike for every variant: KL and cosine grow with the square of a small perturbation, relative L2
    about linearly, and a low-rank K/V error lands in directions that matter less than a window's.
    Each site is probed with its most accurate non-exact option whose error is above float rounding,
    and, per variant family, with the family's option nearest site error 0.1 (the range plans choose
    from); the model error is fitted per family as ``gain * site_error ** power``, the power from the
    two probes (clamped to 0.5-2.5) or ``power`` with one. A family without a probe of its own uses
    the most pessimistic fitted one. An option exact on the calibration rows up to rounding (a
    block-sparse choice that keeps every real key of short padded rows) would measure only noise, so
    it is never a probe; without any usable probe the gain stays 1 at power 1.
    """
    dense_all = {i: (exact_name(), {}) for i in range(len(sites))}
    for i, sp in enumerate(sites):
        inexact = sorted((c for c in sp.options if not c.exact and ROUNDING < _score(sp, c, records[i]) < math.inf),
                         key=lambda c: c.error)
        if not inexact:
            continue

        def run(c: Candidate) -> float:
            err, _ = evaluate({**dense_all, i: c.probe or (c.variant, c.params)})
            return max(err - base, 0.0)

        small = inexact[0]
        e_small = run(small)
        lines = [f"{small.label()} {small.error:.3g} -> {e_small:.3g}"]
        fits: dict[str, tuple[float, float]] = {}
        for fam in dict.fromkeys(family(c) for c in inexact):
            members = [c for c in inexact if family(c) == fam]
            far = min(members, key=lambda c: abs(math.log(c.error / 0.1)))
            if far is small or far.error < 2 * small.error:
                if family(small) == fam and e_small > 0:
                    fits[fam] = (e_small / small.error ** power, power)
                continue
            e_far = run(far)
            lines.append(f"{far.label()} {far.error:.3g} -> {e_far:.3g}")
            p = power
            if e_small > 0 and e_far > 0:
                p = min(2.5, max(0.5, math.log(e_far / e_small) / math.log(far.error / small.error)))
            fits[fam] = (e_far / far.error ** p, p)
        if not fits and e_small > 0:
            fits[family(small)] = (e_small / small.error ** power, power)
        sp.fits = fits
        if fits:  # the default for families not probed: the most pessimistic fit, judged at site error 0.1
            sp.gain, sp.power = max(fits.values(), key=lambda gp: gp[0] * 0.1 ** gp[1])
        say(f"site {i} {sp.site.name}: site error -> model error: " + "; ".join(lines) + " (" + ", ".join(
            f"{fam} ~ {g:.3g} * e^{p:.2f}" for fam, (g, p) in fits.items()) + ")")


def _pick(fits: Sequence[Candidate]) -> Candidate:
    """The most accurate of the fitting candidates priced within TIE_MARGIN of the cheapest (exact first)."""
    fastest = min(fits, key=lambda c: c.seconds)
    close = [c for c in fits if c.seconds <= fastest.seconds * (1 + TIE_MARGIN)]
    return min(close, key=lambda c: (not c.exact, c.error or 0.0, c.seconds))


def _allocate(sites: Sequence[SitePlan], records, budget: float, cap: float) -> None:
    """Share the budget between sites by time saved per unit of estimated model error (greedy knapsack).

    Every site starts exact (its cheapest exact option, else dense). A move takes one site to a
    cheaper candidate; the move with the most seconds saved per unit of added estimated error that
    keeps the estimated total inside the budget is made, until none fits. Estimated errors add up,
    which holds for small errors and is checked afterwards by measuring the whole model.
    """
    for sp in sites:
        exact = [c for c in sp.options if c.exact]
        sp.chosen = _pick(exact) if exact else sp.dense
    total = 0.0
    while True:
        best, best_ratio = None, -1.0
        for i, sp in enumerate(sites):
            cur, e_cur = sp.chosen, sp.estimate(sp.chosen)
            for c in sp.options:
                if c.seconds >= cur.seconds or c.exact or not _score(sp, c, records[i]) <= cap:
                    continue
                d_err = sp.estimate(c) - e_cur
                if total + d_err > budget:
                    continue
                ratio = (cur.seconds - c.seconds) / max(d_err, 1e-12)
                if ratio > best_ratio:
                    best, best_ratio = (sp, c, d_err), ratio
        if best is None:
            break
        sp, c, d_err = best
        sp.chosen, total = c, total + d_err
    for i, sp in enumerate(sites):  # near-equal alternatives: the most accurate one that still fits
        if sp.chosen.exact:
            continue
        rest = total - sp.estimate(sp.chosen)
        near = [c for c in sp.options + [sp.dense] if c.seconds <= sp.chosen.seconds * (1 + TIE_MARGIN)
                and (c.exact or (_score(sp, c, records[i]) <= cap and rest + sp.estimate(c) <= budget))]
        # (a NaN or infinite error fails the comparisons above, so a refused kernel is never picked)
        pick = _pick(near) if near else sp.chosen
        total = rest + sp.estimate(pick)
        sp.chosen = pick


def search(
    sites: Sequence[SitePlan],
    records: Sequence[Sequence[SiteRecord]],
    evaluate: Evaluate,
    budget: Optional[float],
    progress: Optional[Callable[[str], None]] = None,
    max_rounds: int = 64,
    site_cap: Optional[float] = None,
    gain_evaluate: Optional[Evaluate] = None,
    power: float = 1.0,
) -> Outcome:
    """Choose per site, measure the whole model, back off until it fits ``budget``, then use any slack.

    Each site's candidates get an estimated model error from its measured gain (``_probe_gains``;
    ``power`` is how the metric grows with a small error when one probe is all there is); the budget
    is shared between sites where it saves the most time (``_allocate``). The whole model is then
    measured: while it is over the budget, the site with the worst estimated error per second saved
    backs off to its next more accurate candidate; while it is under, sites try their next cheaper
    candidate and keep it when the measurement still fits. ``site_cap`` bounds each approximate
    site's own error, however little of it the calibration data shows at the output.
    ``gain_evaluate`` measures the gain probes when the budget's own metric is too noisy for one
    site's effect (a perplexity change can be negative on a few rows); it must be in the budget's
    units, or an upper proxy of them.
    """
    say = progress or (lambda msg: None)
    for sp in sites:
        sp.chosen = sp.dense
    cap = math.inf if site_cap is None else site_cap
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
            base, _ = probe({i: (exact_name(), {}) for i in range(len(sites))})
            _probe_gains(sites, records, probe, base, say, power)
        _allocate(sites, records, budget, cap)
        for i, sp in enumerate(sites):
            _explain_choice(sp, budget, cap)
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
            return sp.estimate(sp.chosen) / saved

        worst = max(movable, key=cost_of_error)
        sp = sites[worst]
        prev = sp.chosen
        sp.chosen = _next_more_accurate(sp, records[worst])
        sp.note = f"backed off from {prev.label()} (site error {prev.error:.2g}) to fit the whole-model budget"
        rounds += 1
        err, held = evaluate(assignment())
        say(f"back-off {rounds}: site {worst} -> {sp.chosen.label()}, end-to-end error {err:.3g}")
    if budget is not None and budget > 0 and err <= budget:
        err, held = _use_slack(sites, records, evaluate, assignment, budget, cap, err, held, say)
    return Outcome(tuple(sites), err, held, rounds)


def _explain_choice(sp: SitePlan, budget: float, cap: float) -> None:
    """The site's note for its allocated candidate (or why nothing cheaper than dense fits)."""
    if sp.chosen.exact and sp.chosen is not sp.dense:
        sp.note = "exact"
    elif not sp.chosen.exact:
        sp.note = f"estimated model error {sp.estimate(sp.chosen):.2g} within its share of the budget"
    elif sp.options:
        if budget == 0:
            sp.note = "budget 0 admits exact rewrites only"
            return
        scored = [c for c in sp.options if c.error is not None]
        best = min(scored, key=lambda c: c.error) if scored else sp.options[0]
        inside = [c for c in scored if not c.exact and c.error <= cap and sp.estimate(c) <= budget]
        fastest = min(inside, key=lambda c: c.seconds) if inside else None
        if fastest is not None and fastest.seconds * (1 + TIE_MARGIN) >= sp.dense.seconds:
            # accurate enough, but not predicted fast enough to be worth an approximation
            gain = sp.dense.seconds / fastest.seconds if fastest.seconds > 0 else math.inf
            sp.note = (f"kept exact: {fastest.label()} fits the budget (site error {fastest.error:.2g}, about "
                       f"{sp.estimate(fastest):.2g} at the output) but is predicted only {gain:.2f}x as fast as "
                       f"dense, inside the {TIE_MARGIN:.0%} margin where the exact one is preferred")
            return
        capped = best.error > cap and sp.estimate(best) <= budget
        sp.note = (f"no candidate fits: the most accurate, {best.label()}, has site error {best.error:.2g}"
                   + (f", above the site cap {cap:g}" if capped else
                      f", about {sp.estimate(best):.2g} at the output"))


def _use_slack(sites, records, evaluate: Evaluate, assignment, budget: float, cap: float, err: float,
               held: Optional[float], say, max_tries: int = 0) -> tuple[float, Optional[float]]:
    """Under the budget after measuring: move sites to their next cheaper candidate while the model still fits.

    Estimates are conservative for some sites and not others; each try is measured, kept when the
    whole model still fits, else undone. Sites that save the most time try first; at most
    ``max_tries`` measurements (default two per site).
    """
    tries = max_tries or 2 * len(sites)
    frozen: set[int] = set()
    while tries > 0:
        steps = []
        for i, sp in enumerate(sites):
            if i in frozen:
                continue
            cheaper = [c for c in sp.options if c.seconds < sp.chosen.seconds / (1 + TIE_MARGIN) and not c.exact
                       and _score(sp, c, records[i]) <= cap and math.isfinite(c.error)]
            if cheaper:  # the most accurate of the cheaper ones: the smallest step down
                nxt = min(cheaper, key=lambda c: (sp.estimate(c), -c.seconds))
                steps.append((sp.chosen.seconds - nxt.seconds, i, nxt))
        if not steps:
            break
        _, i, nxt = max(steps, key=lambda t: t[0])
        sp, prev = sites[i], sites[i].chosen
        sp.chosen = nxt
        tries -= 1
        got, got_held = evaluate(assignment())
        if got <= budget:
            err, held = got, got_held
            sp.note = f"{nxt.label()}: the measured model error {got:.2g} still fits the budget"
            say(f"slack: site {i} -> {nxt.label()}, end-to-end error {got:.3g}")
        else:
            sp.chosen = prev
            frozen.add(i)
            say(f"slack: site {i} -> {nxt.label()} would make the error {got:.3g}; kept {prev.label()}")
    return err, held
