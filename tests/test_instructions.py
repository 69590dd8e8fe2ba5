"""The bench's instruction counter (``ops/bench/instructions.py``) on the real pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

COUNTER = REPO / "ops" / "bench" / "instructions.py"


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_the_counter_counts_a_process_under_callgrind_through_the_pipeline(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, str(COUNTER), "--kinds", "accountant", "--jobs", "20", "--out", tmp_path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    [counted] = json.loads((tmp_path / "instructions.json").read_text())
    assert (counted["kind"], counted["jobs"], counted["errors"]) == ("accountant", 20, 0)
    assert counted["instructions_per_job"] > 1000
    [dump] = tmp_path.glob("callgrind-accountant.*.1")  # the counted part, dumped on request
    assert "events: Ir" in dump.read_text()
    assert "accountant" in ran.stdout and "instructions per job" in ran.stdout
