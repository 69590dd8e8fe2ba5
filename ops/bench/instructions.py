"""Instructions per job of Switchyard's processes, counted by callgrind: a figure the machine's
speed does not move, so two versions of the code compare in any hour.

    python ops/bench/instructions.py                        # scheduler, worker and accountant
    python ops/bench/instructions.py --kinds worker --jobs 300 --in-flight 8

The pipeline runs as in ``run.py`` (its own mock provider at 0 ms, database and namespace), with
one process at a time under ``valgrind --tool=callgrind``. Instructions are counted only from
after a warm-up to the end of the counted jobs. The same jobs at the same in-flight count give
the same figure to within 1 % from run to run, where CPU seconds on this machine drift by a
factor of two. They count what runs in user space (Python, uvloop, pydantic-core, libc), not the
kernel's part of a send, and not time: a cache miss counts as one instruction.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import REPO, Proc, cli
from run import Bench, Sizes

from broker.core.settings import Settings
from broker.transport.runtime import run_loop, tune_gc

KINDS = ("scheduler", "worker", "accountant")
WARM_UP_JOBS = 100
START_TIMEOUT_S = 180.0  # a process under valgrind starts several times slower


class _Counted(Bench):
    """The bench's pipeline with the process of one kind under callgrind, not yet counting."""

    def __init__(self, out: Path, kind: str) -> None:
        super().__init__(Sizes(), out)
        self.kind = kind
        self.start_timeout_s = START_TIMEOUT_S
        self.dump = out / f"callgrind-{kind}"

    def _start(self, name: str, *command: str) -> Proc:
        if command[0] != self.kind:
            return super()._start(name, *command)
        wrapper = (
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={self.dump}.%p",
        )
        return self.procs.start(name, *cli(*command), wrapper=wrapper)


def _callgrind(command: str, pid: int) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)


def _totals(dump: Path, timeout_s: float = 10.0) -> int:
    """The instructions in a callgrind dump, once the process has written it (it does when it
    next runs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = dump.read_text() if dump.exists() else ""
        totals = [line for line in text.splitlines() if line.startswith("totals:")]
        if totals:
            return int(totals[0].split()[1])
        if time.monotonic() > deadline:
            raise TimeoutError(f"callgrind wrote no totals to {dump}")
        time.sleep(0.1)


async def count(kind: str, jobs: int, in_flight: int, out: Path) -> dict[str, object]:
    bench = _Counted(out, kind)
    await bench.setup()
    try:
        bench.mock(latency_ms=0)
        bench.config_path.write_text(yaml.safe_dump({"providers": [bench.provider(in_flight)]}))
        procs = await bench.pipeline(concurrency=in_flight)
        [counted] = [p for p in procs if p.name.split("-")[0] == kind]
        await bench.switchyard_load("warm-up", WARM_UP_JOBS, in_flight)
        _callgrind("--instr=on", counted.pid)
        run = await bench.switchyard_load("counted", jobs, in_flight)
        _callgrind("--dump", counted.pid)  # written as <dump>.<pid>.1
        instructions = await asyncio.to_thread(_totals, Path(f"{bench.dump}.{counted.pid}.1"))
    finally:
        await bench.teardown()
    return {
        "kind": kind,
        "jobs": run.jobs,
        "errors": run.errors,
        "in_flight": in_flight,
        "instructions_per_job": round(instructions / max(run.jobs, 1)),
    }


async def main(kinds: list[str], jobs: int, in_flight: int, out: Path) -> list[dict[str, object]]:
    return [await count(kind, jobs, in_flight, out) for kind in kinds]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "ops" / "bench" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tune_gc()
    counts = run_loop(
        main(args.kinds.split(","), args.jobs, args.in_flight, args.out), Settings().event_loop
    )
    (args.out / "instructions.json").write_text(json.dumps(counts, indent=1) + "\n")
    for c in counts:
        print(
            f"{c['kind']:<10} {c['jobs']} jobs ({c['errors']} errors), {c['in_flight']} in flight:"
            f" {c['instructions_per_job']:,} instructions per job"
        )
