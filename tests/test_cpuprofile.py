"""The bench's CPU profiler (``ops/bench/cpuprofile.py``) on a real ``switchyard`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PROFILER = REPO / "ops" / "bench" / "cpuprofile.py"


def test_the_profiler_writes_the_stacks_and_the_collector_passes_of_a_command(
    tmp_path: Path,
) -> None:
    out = tmp_path / "profile.txt"
    ran = subprocess.run(
        [sys.executable, str(PROFILER), str(out), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert "Usage" in ran.stdout  # the command itself ran
    stacks = [line.rpartition(" ") for line in out.read_text().splitlines()]
    assert stacks and all(count.isdigit() for _, _, count in stacks)
    # running the CLI package (python -m broker.cli runs its __main__)
    assert any("<module> (__main__.py:" in stack for stack, _, _ in stacks)
    collector = json.loads(Path(f"{out}.gc.json").read_text())
    assert set(collector) == {"gen0", "gen1", "gen2", "process_cpu_s"}
    assert collector["gen0"]["passes"] > 0 and collector["process_cpu_s"] > 0

    report = subprocess.run(
        [sys.executable, str(PROFILER), "--report", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    samples = sum(int(count) for _, _, count in stacks)
    assert report.stdout.startswith(f"{samples} samples (1 ms of CPU each)")
