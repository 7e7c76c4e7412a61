"""Artifacts: fresh-process round trip, tampered kernels refused, partial directories named, atomic export."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import rewriter
from rewriter.artifact import ArtifactError, describe
from tests.builders import Causal


@pytest.fixture(scope="module")
def optimized():
    torch.manual_seed(0)
    model = Causal().eval()
    x = torch.randn(2, 80, 32)
    opt = rewriter.optimize(model, (x,), budget=None, variants={"sliding_window": {"window": 24}})
    assert opt.plan.decisions[0].variant == "sliding_window"
    return opt, x


@pytest.fixture
def artifact(optimized, tmp_path):
    return rewriter.export(optimized[0], tmp_path / "art")


def test_layout_and_kernel_hashes(artifact):
    meta = json.loads((artifact / "plan.json").read_text())
    assert meta["format"] == 2
    assert meta["provenance"]["torch"] == torch.__version__
    files = sorted(p.name for p in (artifact / "kernels").iterdir())
    assert files and files == sorted(meta["kernels"])
    assert any(n.startswith("sliding_window_cpu_") for n in files)  # the compiled CPU kernel
    assert all(n.startswith("sliding_window_") for n in files)  # (and its Triton source, where generated)
    text = describe(artifact)
    assert "verified" in text and meta["kernels"][files[0]]["sha256"] in text


def test_round_trip_in_a_fresh_process(optimized, artifact, tmp_path):
    opt, x = optimized
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        ref = opt(x)
    torch.save(ref, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, rewriter
        m = rewriter.load({str(artifact)!r})
        x, ref = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'ref.pt')!r})
        with torch.no_grad():
            out = m(x)
        assert [d.variant for d in m.plan.decisions] == ["sliding_window"], m.plan
        print("SAME", torch.equal(out, ref))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SAME True" in res.stdout


def test_tampered_kernel_is_refused_by_name(artifact):
    kernel = next((artifact / "kernels").iterdir())
    kernel.write_text(kernel.read_text() + "\n// injected\n")
    with pytest.raises(ArtifactError, match=kernel.name):
        rewriter.load(artifact)
    assert "NOT VERIFIED" in describe(artifact)


def test_stray_kernel_file_is_refused(artifact):
    (artifact / "kernels" / "evil.cpp").write_text("int main(){}")
    with pytest.raises(ArtifactError, match="evil.cpp"):
        rewriter.load(artifact)


def test_missing_kernel_is_partial(artifact):
    kernel = next((artifact / "kernels").iterdir())
    kernel.unlink()
    with pytest.raises(ArtifactError, match=f"{kernel.name} is missing"):
        rewriter.load(artifact)


def test_modified_program_is_refused(artifact):
    data = bytearray((artifact / "model.pt2").read_bytes())
    data[-1] ^= 1
    (artifact / "model.pt2").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt2"):
        rewriter.load(artifact)


def test_partial_directory_names_what_is_missing(artifact):
    (artifact / "plan.json").unlink()
    with pytest.raises(ArtifactError, match="plan.json"):
        rewriter.load(artifact)


def test_interrupted_export_leaves_nothing(optimized, tmp_path, monkeypatch):
    target = tmp_path / "art"

    def boom(*a, **k):
        raise KeyboardInterrupt  # as a Ctrl-C in the middle of writing

    monkeypatch.setattr(torch.export, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        rewriter.export(optimized[0], target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_interrupted_reexport_keeps_the_old_artifact(optimized, artifact):
    before = (artifact / "plan.json").read_text()

    def boom(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        rewriter.export(optimized[0], artifact, extra=boom)
    assert (artifact / "plan.json").read_text() == before
    rewriter.load(artifact)


def test_export_refuses_to_replace_a_file_or_foreign_directory(optimized, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="file"):
        rewriter.export(optimized[0], f)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an artifact"):
        rewriter.export(optimized[0], d)
    assert (d / "notes.txt").read_text() == "keep me"
