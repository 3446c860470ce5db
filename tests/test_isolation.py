"""Decoder isolation, in a fresh interpreter: runs tests/isolation_cases.py in its own pytest process.

Whether decord dies on a damaged file can depend on what the process did before (see that file's
docstring), so the cases run where no other test has left native state behind. A case that skips
because a kept file no longer crashes this decord fails here: with the locked decord they must crash
(find new files with scripts/fuzz_decoder.py after an upgrade)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decoder_isolation_cases_in_a_fresh_interpreter():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(ROOT / "tests" / "isolation_cases.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, done.stdout[-3000:]
