"""Test session set-up: a private, empty hardware-profile cache.

The CLI calibrates this CPU on first use and caches the profile; plans depend on it. Every test
process (and the subprocesses it starts, which inherit the environment) sees the same empty cache
unless a test points it elsewhere, so plans do not change with what ran before or what a developer
calibrated by hand.
"""
from __future__ import annotations

import os
import tempfile

os.environ["ATTENTION_REWRITER_CACHE"] = tempfile.mkdtemp(prefix="rewriter-test-hw-")
