"""The distributed route: ``optimize(..., distributed=True)``, one pipeline stage of the model per rank.

Under an initialised process group (``torchrun``, or ``init_process_group`` by hand), every rank calls
``optimize`` with the same arguments. The model is split by its repeated blocks into one stage per rank
(``passes.stages``); each rank keeps only its stage's weights (loaded from ``checkpoint`` when the model's
parameters are on the meta device) and calibrates the sites inside it; rank 0 runs the search
(``passes.distributed``). Each rank gets a ``StageModel``: its rewritten stage and the whole model's
plan. ``export`` writes one artifact per stage plus ``pipeline.json``; ``rewriter.load`` reads that
directory back as one module that runs the stages in turn.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import resource
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from passes.capture import call_spec, split_inputs
from passes.distributed import broadcast, plan_stage, recv, release_memory, send, stage_inputs
from passes.options import bind_samples, check_options, input_signature
from passes.plan import Plan
from passes.planner import DEFAULT_SITE_CAP
from passes.stages import materialise, place, safetensors_loader, split_stages
from passes.state import plan_of
from rewriter.api import OptimizedModel

logger = logging.getLogger(__name__)

MANIFEST = "pipeline.json"


class DistributedError(RuntimeError):
    """A distributed run that cannot go on (no process group, a rank lost); the message is one line."""


def init(timeout_s: Optional[float] = None) -> None:
    """Initialise the default process group from torchrun's environment, if it is not already: gloo on the
    CPU, nccl where CUDA is. A rank that dies ends the others' next collective at once (its connections
    close); a collective that waits longer than ``timeout_s`` for a rank that is alive but stuck fails
    instead of hanging (default ``$ATTENTION_REWRITER_DIST_TIMEOUT`` or 1800 s: long enough for rank 0 to
    calibrate the CPU and for the slowest stage to calibrate its sites)."""
    if dist.is_initialized():
        return
    secs = float(timeout_s or os.environ.get("ATTENTION_REWRITER_DIST_TIMEOUT", 1800))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=secs))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageModel(torch.nn.Module):
    """One rank's share of a model optimized across processes: its rewritten stage and the model's plan.

    Calling it is collective: every rank calls it with the same inputs, the stages run in turn and every
    rank returns the model's output.
    """

    def __init__(self, stage, program: OptimizedModel, plan: Plan, spec):
        super().__init__()
        self.stage = dataclasses.replace(stage, module=None)  # the weights live in ``program`` only
        self.program = program
        self.plan = plan  # the whole model's (``program.plan``: this stage's sites, numbered within the stage)
        self.spec = spec

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output, computed by the pipeline of every rank's stage."""
        kw = self.spec.bind(args, kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
        got = stage_inputs(self.stage, kw, recv(rank - 1) if rank > 0 else None)
        with torch.no_grad():
            out = self.program(**got)
        if rank < world - 1:
            send(tuple(out), rank + 1)
            out = None
        return broadcast(out, world - 1)


def optimize_distributed(
    model: torch.nn.Module,
    example_inputs: Any,
    budget: Optional[float] = 0.01,
    metric: Any = None,
    variants: Any = None,
    target: Optional[str] = None,
    calibration: Any = None,
    progress: Optional[Callable[[str], None]] = None,
    site_cap: Optional[float] = DEFAULT_SITE_CAP,
    checkpoint: Optional[str] = None,
) -> StageModel:
    """``optimize`` across the ranks of the default process group (see the module docstring); collective."""
    if not dist.is_initialized():
        raise DistributedError("distributed=True needs an initialised process group: run under torchrun, or call "
                               "torch.distributed.init_process_group first")
    options = check_options(example_inputs, budget, metric, variants, target, site_cap, None, False, progress)
    rank, world = dist.get_rank(), dist.get_world_size()
    args0, kwargs0 = split_inputs(example_inputs)
    spec = call_spec(model, args0, kwargs0)
    example = spec.bind(args0, kwargs0)
    samples = list(bind_samples(calibration, example_inputs, spec, input_signature(example)))
    stages = split_stages(model, example, world)  # every rank splits alike; each keeps its own stage
    stage = stages[rank]
    del stages
    if any(t.device.type == "meta" for t in stage.module.state_dict().values()):
        if checkpoint is None:
            raise ValueError("the model's parameters are on the meta device: pass checkpoint= (a directory of "
                             "safetensors shards) so each rank loads its own stage's weights")
        materialise(stage, safetensors_loader(checkpoint, model))
    if dist.get_backend() == "nccl":  # one GPU per rank: the stage's weights and the graph's fixed devices move
        place(stage, torch.device("cuda", torch.cuda.current_device()))
    options.say(f"rank {rank} of {world}: blocks {stage.blocks[0]}..{stage.blocks[1] - 1}, "
                f"{sum(t.numel() for t in stage.module.parameters()):,} parameters held")
    sp = plan_stage(stage, samples, options)
    p = sp.program
    mine = plan_of(p)
    notes = [None] * world
    dist.all_gather_object(notes, list(mine.notes))
    every = tuple(dict.fromkeys(n for part in notes for n in part))
    plan = dataclasses.replace(mine, decisions=sp.decisions, notes=every)
    program = OptimizedModel(p.ep, p.spec, mine, p.rebuild, captured_for=p.signature)
    del sp, p
    release_memory()
    return StageModel(stage, program, plan, spec)


def export_stages(opt: StageModel, path: str | Path) -> Path:
    """Write every rank's stage as an artifact under ``path`` and, on rank 0, ``pipeline.json`` (collective)."""
    from rewriter.artifact import export

    out = Path(path)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    release_memory()
    export(opt.program, out / f"stage-{rank}")
    parts = [None] * world
    s = opt.stage
    dist.all_gather_object(parts, {"path": f"stage-{rank}", "model_inputs": list(s.model_inputs),
                                   "received": list(s.received), "sent": list(s.sent), "blocks": list(s.blocks)})
    if rank == 0:
        manifest = {"format": 1, "stages": parts, "call": opt.spec.to_json(), "plan": opt.plan.to_json()}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    dist.barrier()
    return out


@dataclasses.dataclass(frozen=True)
class _StageIO:
    model_inputs: tuple[str, ...]
    received: tuple[str, ...]
    sent: tuple[str, ...]
    blocks: tuple[int, int] = (0, 0)


class PipelineModel(torch.nn.Module):
    """The stages of a distributed artifact loaded in one process and run in turn; same call and outputs as the
    model."""

    def __init__(self, stages: list[tuple[_StageIO, OptimizedModel]], spec, plan: Plan):
        super().__init__()
        self.io = [io for io, _ in stages]
        self.stages = torch.nn.ModuleList([m for _, m in stages])
        self.spec = spec
        self.plan = plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run every stage in order on the call's inputs."""
        kw = self.spec.bind(args, kwargs)
        sent = None
        for io, module in zip(self.io, self.stages):
            out = module(**stage_inputs(io, kw, sent))
            sent = tuple(out) if io.sent else out
        return sent


def load_pipeline(path: str | Path) -> PipelineModel:
    """Read a directory written by ``export_stages`` (``rewriter.load`` calls this when it finds the manifest)."""
    from passes.capture import CallSpec
    from rewriter.artifact import ArtifactError, load

    src = Path(path)
    try:
        meta = json.loads((src / MANIFEST).read_text())
        call = meta["call"]
        spec = CallSpec(call["names"], call["captured"], call.get("injected", {}), call.get("var_positional", False))
        plan = Plan.from_json(meta["plan"])
        ios = [(_StageIO(tuple(s["model_inputs"]), tuple(s["received"]), tuple(s["sent"]), tuple(s["blocks"])),
                s["path"]) for s in meta["stages"]]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{src / MANIFEST} is corrupted ({type(e).__name__}: {e}); re-export the artifact") from e
    return PipelineModel([(io, load(src / rel)) for io, rel in ios], spec, plan)
