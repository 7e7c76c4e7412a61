"""Calibrate and plan a model split into pipeline stages, one stage per process, over torch.distributed.

Each rank holds one ``passes.stages.Stage``: the weights of its blocks, and the records of the attention
sites inside them, made and scored where they are and never sent. Ranks exchange only stage activations
(point to point, in stage order) and each site's priced and scored candidates. Rank 0 runs the planner's
search; each end-to-end measurement it asks for runs the samples through the pipeline, and the last
rank, which holds the model's outputs and the exact references, answers with the error. Rank 0 then
broadcasts the choices, and every rank rewrites its own stage with the single-process passes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from passes import metrics
from passes.choose import Calibrate, Choose, Planning, apply_assignment, gain_metric, metric_power
from passes.contract import run_passes
from passes.measure import Measure
from passes.options import Options
from passes.pipeline import BindInputs, Capture, Rewrite, WeightSurgery
from passes.plan import Decision
from passes.planner import Candidate, Outcome, SitePlan, score_all, search
from passes.stages import Stage
from passes.state import Program

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    """What one rank ends with: its stage's final program state and the whole model's decisions."""

    program: Program  # this rank's stage, rewritten (``plan_of`` gives the stage's own plan, errors model-wide)
    decisions: tuple[Decision, ...]  # every site of the model, numbered across stages


def send(obj: Any, dst: int) -> None:
    """Send a picklable object (tensors included) to rank ``dst``."""
    dist.send_object_list([obj], dst=dst)


def recv(src: int) -> Any:
    """The object rank ``src`` sends next."""
    box = [None]
    dist.recv_object_list(box, src=src)
    return box[0]


def broadcast(obj: Any, src: int) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def stage_inputs(stage: Stage, kw: dict, received: Optional[tuple]) -> dict:
    """The keyword inputs of ``stage``'s module for one model call: the model's own inputs it reads and the
    activations the previous stage sent."""
    got = {n: kw[n] for n in stage.model_inputs}
    if stage.received:
        got.update(zip(stage.received, received))
    return got


def forward(stage: Stage, module: torch.nn.Module, samples: list[dict]) -> tuple[list[dict], list]:
    """Run every sample through the pipeline: (this stage's inputs per sample, the outputs on the last rank).

    Each rank receives the previous stage's activations, runs its module and sends its own on; only the
    last rank's outputs are the model's.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs, outputs = [], []
    for kw in samples:
        got = stage_inputs(stage, kw, recv(rank - 1) if rank > 0 else None)
        with torch.no_grad():
            out = module(**got)
        inputs.append(got)
        if rank < world - 1:
            send(tuple(t.detach() for t in out), rank + 1)
        else:
            outputs.append(out)
    return inputs, outputs


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess), or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_memory(collect: bool = True) -> None:
    """Hand freed memory back to the system (glibc's ``malloc_trim``; elsewhere a no-op), after a garbage
    collection unless ``collect`` is False: a rank's peak is what its share of the model promises."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _stripped(c: Candidate) -> Candidate:
    """A candidate as another process sees it: its price and score, without the tensors it was fitted with."""
    return dataclasses.replace(c, extra=(), inputs=None, prepare=None)


def _summary(sp: SitePlan) -> SitePlan:
    return SitePlan(sp.site, _stripped(sp.dense), [_stripped(c) for c in sp.options], list(sp.refusals))


class _Evaluator:
    """One end-to-end measurement, run collectively: the assignment's share set on each rank, the samples
    through the pipeline, the error measured on the last rank and broadcast to all."""

    def __init__(self, stage: Stage, p: Program, pl: Planning, samples: list[dict], offset: int,
                 measures: dict[str, Optional[Measure]]):
        self.stage, self.p, self.pl, self.samples, self.offset, self.measures = stage, p, pl, samples, offset, measures

    def __call__(self, assignment: dict[int, tuple[str, dict]], by: str) -> tuple[float, Optional[float]]:
        n = len(self.pl.nodes)
        mine = {g - self.offset: a for g, a in assignment.items() if self.offset <= g < self.offset + n}
        module = apply_assignment(self.p.ep, self.pl.nodes, mine)
        rank, last = dist.get_rank(), dist.get_world_size() - 1
        result = None
        if rank < last:
            forward(self.stage, module, self.samples)
        else:  # each sample's outputs measured as they arrive: one sample's logits held at a time, not all
            def run(**kw):
                return module(**stage_inputs(self.stage, kw, recv(rank - 1) if rank > 0 else None))

            result = self.measures[by](run)
        release_memory(collect=False)  # each measurement's outputs (the model's logits) go back at once
        return broadcast(result, last)


def plan_stage(stage: Stage, samples: list[dict], options: Options) -> StagePlan:
    """Plan and rewrite ``stage`` on this rank, the whole model's search on rank 0 (collective: every rank of
    the default process group calls it with its own stage and the same ``samples`` and ``options``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    say = options.say if rank == 0 else (lambda msg: logger.info("rank %d: %s", rank, msg))
    say(f"rank {rank}: running {len(samples)} calibration sample(s) through the pipeline")
    inputs, references = forward(stage, stage.module, samples)
    # the stage's own passes: quiet on other ranks, and never naming a metric (the model's is chosen below)
    quiet = (lambda msg: None if msg.startswith("budget measured as") else options.say(msg)) if rank == 0 else None
    local = dataclasses.replace(options, metric=None, progress=quiet, dynamic=False)
    p = Program(stage.module, inputs[0], list(inputs), local)
    last = rank == world - 1
    p = run_passes((BindInputs(), Capture(), Calibrate(tuple(references) if last else None)), p)
    pl: Planning = p.planning
    counts = [None] * world
    dist.all_gather_object(counts, (len(pl.live), len(p.matches), any(m.site.causal for m in pl.live)))
    offset = sum(c[0] for c in counts[:rank])  # model-wide position of this stage's first rewritten site
    first = sum(c[1] for c in counts[:rank])  # ... and of its first site found
    choice = None
    if rank == world - 1:  # the model's own outputs are here: the budget's metric is chosen from them
        choice = metrics.resolve(options.metric, samples[0], references[0], causal=any(c[2] for c in counts))
    shared = broadcast(None if choice is None else dataclasses.replace(choice, fn=None), world - 1)
    choice = choice or shared
    say(f"budget measured as {choice.describe()}")
    measures: dict[str, Optional[Measure]] = {"budget": None, "gain": None}
    if rank == world - 1:
        measures = {"budget": Measure(list(references), list(samples), pl.rows, choice),
                    "gain": Measure(list(references), list(samples), pl.rows, gain_metric(choice))}
    pl = dataclasses.replace(pl, choice=choice, references=(), measure=None)  # the measures above hold them
    p = p.but(planning=pl)
    plans, projections = Choose._candidates(p, pl)
    for sp, recs in zip(plans, pl.records):
        score_all(sp, recs)  # every candidate scored here, where its records are
    summaries = [None] * world if rank == 0 else None
    dist.gather_object([_summary(sp) for sp in plans], summaries, dst=0)
    evaluate = _Evaluator(stage, p, pl, samples, offset, measures)
    if rank == 0:
        from tqdm.auto import tqdm

        every = [sp for part in summaries for sp in part]
        # one bar, on rank 0 only: the end-to-end measurements, each a run of the samples through every stage
        bar = tqdm(desc="measuring through the pipeline", unit="run", leave=False,
                   disable=None if options.progress is not None else True)

        def ask(a: dict, by: str) -> tuple[float, Optional[float]]:
            bar.update(1)
            return _ask(evaluate, a, by)

        gain = (lambda a: ask(a, "gain")) if choice.name == "perplexity" else None
        try:
            outcome = search(every, [()] * len(every), lambda a: ask(a, "budget"), options.budget,
                             progress=say, site_cap=options.site_cap, gain_evaluate=gain, power=metric_power(choice))
        finally:
            bar.close()
        final = _choices(outcome)
        broadcast(("done", final), 0)
    else:
        while True:
            cmd = broadcast(None, 0)
            if cmd[0] == "done":
                final = cmd[1]
                break
            evaluate(cmd[1], cmd[2])
    outcome = _adopt(plans, final, offset)
    result = Choose().finish(p, pl, plans, projections, outcome)
    p = run_passes((WeightSurgery(), Rewrite()), result.state)
    decisions = [None] * world
    dist.all_gather_object(decisions, [dataclasses.replace(d, site=dataclasses.replace(d.site, index=first + i))
                                       for i, d in enumerate(p.decisions)])
    return StagePlan(p, tuple(d for part in decisions for d in part))


def _ask(evaluate: _Evaluator, assignment: dict, by: str) -> tuple[float, Optional[float]]:
    """Rank 0: have every rank run one measurement of ``assignment``."""
    broadcast(("eval", assignment, by), 0)
    return evaluate(assignment, by)


def _choices(outcome: Outcome) -> dict:
    """What rank 0 broadcasts after the search: per site its choice (an index into its options, -1 dense) and
    its note and fitted gains, and the whole model's measured errors."""
    picks = []
    for sp in outcome.sites:
        idx = -1 if sp.chosen is sp.dense else next(j for j, c in enumerate(sp.options) if c is sp.chosen)
        picks.append((idx, sp.note, sp.fits, sp.gain, sp.power))
    return {"picks": picks, "error": outcome.error, "held": outcome.holdout_error, "backoffs": outcome.backoffs}


def _adopt(plans: list[SitePlan], final: dict, offset: int) -> Outcome:
    """This rank's sites set to rank 0's choices: the local candidates, which hold the fitted tensors."""
    for i, sp in enumerate(plans):
        idx, note, fits, gain, power = final["picks"][offset + i]
        sp.chosen = sp.dense if idx < 0 else sp.options[idx]
        sp.note, sp.fits, sp.gain, sp.power = note, fits, gain, power
    return Outcome(tuple(plans), final["error"], final["held"], final["backoffs"])
