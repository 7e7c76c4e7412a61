"""optimize's pipeline keeps one contract: passes take the state and say what changed; the plan is built once."""
from __future__ import annotations

import inspect

import pytest
import torch

import rewriter
from passes import pipeline, state
from passes.contract import PassResult, ProgramPass, run_passes
from rewriter import api


class _Attn(torch.nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.h, self.qkv, self.out = heads, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / (d // self.h) ** 0.5, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, n, d))


def _recording(monkeypatch) -> list[tuple[str, bool]]:
    """Wrap every pass of the pipeline so a run leaves (name, modified) for each pass that ran."""
    seen: list[tuple[str, bool]] = []

    class Recorder(ProgramPass):
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def call(self, s):
            result = self.inner(s)
            seen.append((self.name, result.modified))
            return result

    monkeypatch.setattr(pipeline, "PIPELINE", tuple(Recorder(p) for p in pipeline.PIPELINE))
    return seen


def test_every_step_is_a_pass_with_a_unique_name():
    names = [p.name for p in pipeline.PIPELINE]
    assert all(isinstance(p, ProgramPass) for p in pipeline.PIPELINE)
    assert len(set(names)) == len(names)
    assert names.index("capture and find") < names.index("calibrate") < names.index("price and choose") \
        < names.index("weight surgery") < names.index("rewrite") < names.index("every length")


def test_run_passes_stops_when_a_pass_finishes_the_state_and_checks_the_result_type():
    class S:
        def __init__(self, finished=False, log=()):
            self.finished, self.log = finished, log

    class Add(ProgramPass):
        def __init__(self, tag, finish=False):
            self.name, self.tag, self.finish = tag, tag, finish

        def call(self, s):
            return PassResult(S(self.finish, (*s.log, self.tag)), True)

    assert run_passes([Add("a"), Add("b", finish=True), Add("c")], S()).log == ("a", "b")

    class Bad(ProgramPass):
        name = "bad"

        def call(self, s):
            return s

    with pytest.raises(TypeError, match="'bad' returned S, not a PassResult"):
        run_passes([Bad()], S())


def test_a_calibrated_run_goes_through_every_pass_in_order(monkeypatch):
    seen = _recording(monkeypatch)
    torch.manual_seed(0)
    model, x = _Attn().eval(), torch.randn(2, 40, 32)
    opt = rewriter.optimize(model, x, budget=0.01, dynamic=False)
    assert [n for n, _ in seen] == [p.name for p in pipeline.PIPELINE]
    ran = dict(seen)
    assert ran["capture and find"] and ran["calibrate"] and ran["price and choose"]
    assert not ran["price only"] and not ran["every length"]  # skipped: samples to run; dynamic=False
    fresh = torch.randn(2, 40, 32)
    with torch.no_grad():
        assert rewriter.relative_l2(model(fresh), opt(fresh)) < 1e-5


def test_a_meta_model_is_priced_and_finishes_before_calibration(monkeypatch):
    seen = _recording(monkeypatch)
    with torch.device("meta"):
        model = _Attn().eval()
    opt = rewriter.optimize(model, torch.randn(1, 24, 32, device="meta"))
    assert [n for n, _ in seen] == ["inputs", "capture and find", "price only"]
    (d,) = opt.plan.decisions
    assert "not measured (meta device)" in d.reason


def test_the_plan_is_built_once(monkeypatch):
    built = []

    class Counted(state.Plan):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(state, "Plan", Counted)
    torch.manual_seed(1)
    opt = rewriter.optimize(_Attn().eval(), torch.randn(2, 33, 32), budget=0.01)
    assert isinstance(opt.plan, Counted) and len(built) == 1


def test_the_front_door_is_thin():
    body = [line for line in inspect.getsource(api._optimize).splitlines()
            if line.strip() and not line.strip().startswith(('"""', "#"))]
    signature_end = next(i for i, line in enumerate(body) if line.startswith(") ->"))
    assert len(body) - signature_end - 1 <= 5, "rewriter.api._optimize should only check options and run the passes"
    assert "dataclasses" not in inspect.getsource(api)
