"""The one contract every planning pass keeps, in the style of torch.fx's ``PassBase``.

A pass takes the program state and returns a ``PassResult``: the new state and whether it changed
anything. ``run_passes`` runs a sequence in order, logs what each changed and how long it took, and
stops early when a pass marks the state finished (a model with nothing to run, say).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Generic, Protocol, Sequence, TypeVar

logger = logging.getLogger(__name__)


class State(Protocol):
    """What a pass sequence threads through: any frozen record with a ``finished`` flag."""

    finished: bool


S = TypeVar("S", bound=State)


@dataclass(frozen=True)
class PassResult(Generic[S]):
    """A pass's answer: the state after it, whether it changed anything, and one line saying what."""

    state: S
    modified: bool
    summary: str = ""


class ProgramPass(Generic[S]):
    """One step of a pipeline; subclasses set ``name`` and implement ``call``."""

    name: str = "pass"

    def requires(self, state: S) -> bool:
        """Whether this pass has work on ``state`` (a pass that does not is skipped, unchanged)."""
        return True

    def call(self, state: S) -> PassResult[S]:
        """Run the pass on ``state``."""
        raise NotImplementedError

    def __call__(self, state: S) -> PassResult[S]:
        if not self.requires(state):
            return PassResult(state, False, "nothing to do")
        return self.call(state)


def run_passes(passes: Sequence[ProgramPass[S]], state: S) -> S:
    """Run ``passes`` in order on ``state``; the state after the last (or after one that finishes it)."""
    for p in passes:
        if state.finished:
            break
        t0 = time.perf_counter()
        result = p(state)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
        logger.debug("pass %s: %s%s (%.2fs)", p.name, "changed" if result.modified else "unchanged",
                     f": {result.summary}" if result.summary else "", time.perf_counter() - t0)
        state = result.state
    return state
