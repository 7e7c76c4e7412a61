"""Calibrating and planning across processes (issue 17): 2 gloo ranks, one pipeline stage each.

Every test starts real processes the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
compares what they made with the single-process ``optimize`` of the same model in this process.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rewriter
from rewriter import Plan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dist_worker  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict:
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _ranks(cmd: list[str], world: int, cwd: Path) -> list[subprocess.Popen]:
    port = _port()
    return [subprocess.Popen(cmd, env=_env(r, world, port), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for r in range(world)]


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    got = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        got.append((p.returncode, out, err))
    return got


@pytest.fixture(scope="module", params=["llama", "gpt", "latent"])
def distributed_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"dist-{request.param}")
    done = _finish(_ranks([sys.executable, str(HERE / "dist_worker.py"), str(out), request.param], 2, HERE.parent))
    if any(code for code, _, _ in done):
        raise AssertionError("\n".join(f"rank {r} exited {code}:\n{err[-3000:]}"
                                        for r, (code, _, err) in enumerate(done)))
    return request.param, out


def test_plan_matches_single_process(distributed_run):
    name, out = distributed_run
    model, example, fresh = dist_worker.models()[name]()
    single = rewriter.optimize(model, example, budget=dist_worker.budget(name), metric="kl",
                               variants=dist_worker.variants(name),
                               dynamic=False)
    plans = [Plan.from_json(torch.load(out / f"rank-{r}.pt", weights_only=False)["plan"]) for r in range(2)]
    assert plans[0].to_json() == plans[1].to_json()  # every rank holds the same, whole-model plan
    got = plans[0]
    assert [d.variant for d in got.decisions] == [d.variant for d in single.plan.decisions]
    assert [d.params for d in got.decisions] == [d.params for d in single.plan.decisions]
    assert any(d.variant != "dense" for d in got.decisions), "the test needs an approximate site to mean anything"
    for a, b in zip(got.decisions, single.plan.decisions):
        if b.error:
            assert a.error == pytest.approx(b.error, rel=0.1)
    assert got.error == pytest.approx(single.plan.error, rel=0.1, abs=1e-6)
    assert got.error <= (dist_worker.budget(name) or float("inf"))


def test_loaded_artifact_matches_single_process(distributed_run):
    name, out = distributed_run
    model, example, fresh = dist_worker.models()[name]()
    single = rewriter.optimize(model, example, budget=dist_worker.budget(name), metric="kl",
                               variants=dist_worker.variants(name),
                               dynamic=False)
    loaded = rewriter.load(out / "artifact")
    call = (lambda m: m(**fresh)) if isinstance(fresh, dict) else (lambda m: m(*fresh))
    with torch.no_grad():
        want = call(single)
        got_loaded = call(loaded)
    want_t = want.logits if hasattr(want, "logits") else want
    for got in (got_loaded, torch.load(out / "rank-0.pt", weights_only=False)["out"]):
        got_t = got.logits if hasattr(got, "logits") else got
        assert torch.allclose(got_t, want_t, atol=1e-4, rtol=1e-4), (got_t - want_t).abs().max()
    assert [d.variant for d in loaded.plan.decisions] == [d.variant for d in single.plan.decisions]


def test_each_rank_holds_its_share(distributed_run):
    name, out = distributed_run
    model, _, _ = dist_worker.models()[name]()
    total = sum(t.numel() for t in model.parameters())
    held = [torch.load(out / f"rank-{r}.pt", weights_only=False)["params"] for r in range(2)]
    assert all(h < 0.75 * total for h in held), (held, total)


def test_no_process_group_is_a_clear_error():
    model, example, _ = dist_worker.models()["gpt"]()
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        rewriter.optimize(model, example, distributed=True)


@pytest.mark.slow  # a first CLI run calibrates the CPU before the ranks start (about 80 s on 2 cores)
def test_a_dead_rank_ends_the_other_with_one_line():
    """Rank 1 is killed once calibration has begun: rank 0 exits with a one-line error within 60 s."""
    cmd = [sys.executable, "-m", "rewriter", "optimize", "--model", "tests/dist_worker.py:slow_model",
           "--out", "none", "--target", "cpu", "--budget", "0.05", "--variants", "dense,sliding_window"]
    procs = _ranks(cmd, 2, HERE.parent)
    try:
        seen = []
        deadline = time.time() + 300  # a first CLI run calibrates the CPU first
        while time.time() < deadline:
            line = procs[0].stderr.readline()
            seen.append(line)
            if "through the pipeline" in line or not line:
                break
        assert any("through the pipeline" in x for x in seen), "".join(seen)[-2000:]
        procs[1].kill()
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        took = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    assert took < 60
    assert procs[0].returncode not in (0, None)
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "rank 0" in lines[0], err[-2000:]


def test_cli_out_may_replace_a_distributed_artifact(tmp_path):
    from rewriter.cli import UsageError, _check_out

    (tmp_path / "pipeline.json").write_text("{}")
    assert _check_out(str(tmp_path)) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="not an artifact"):
        _check_out(str(other))
