"""Every example's --smoke mode runs end to end and prints what changed and the measured speed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "generate_backend.py": "the same tokens as eager",
    "gpt2_long_context.py": "sliding_window",
    "vit_high_res.py": "neighborhood_2d",
    "minilm_embeddings.py": "cosine vs original",
    "transformer_encoder.py": "sliding_window",
}


@pytest.mark.parametrize("name, word", sorted(EXAMPLES.items()))
def test_example_smoke(name, word, tmp_path):
    pytest.importorskip("transformers")
    env = {**os.environ, "ATTENTION_REWRITER_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--smoke"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "changed:" in res.stdout and "speedup" in res.stdout and "IQR" in res.stdout, res.stdout
    assert word in res.stdout, res.stdout
