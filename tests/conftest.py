"""Test session set-up: a private, empty hardware-profile cache.

The CLI calibrates this CPU on first use and caches the profile; plans depend on it. Every test
process (and the subprocesses it starts, which inherit the environment) sees the same empty cache
unless a test points it elsewhere, so plans do not change with what ran before or what a developer
calibrated by hand.

Most tests check what the rewrite put in the graph and which kernels ran, so they keep every site an
``rewriter::attention`` call (``REWRITER_NATIVE_DENSE=0``). The last step users get by default, exact
dense sites lowered to the library's SDPA call on the CPU, is tested on its own in
``tests/test_native_dense.py``, which turns it back on.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("REWRITER_NATIVE_DENSE", "0")
# the Python API would calibrate this CPU on first use; tests plan from the generic figures unless they calibrate
os.environ.setdefault("ATTENTION_REWRITER_CALIBRATE", "0")
os.environ["ATTENTION_REWRITER_CACHE"] = tempfile.mkdtemp(prefix="rewriter-test-hw-")
