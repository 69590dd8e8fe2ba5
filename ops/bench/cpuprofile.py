"""Where a Switchyard process spends its CPU: run it under a CPU-time sampler.

    python ops/bench/cpuprofile.py OUT worker --provider mock  # runs `switchyard worker ...`
    python ops/bench/cpuprofile.py --report OUT                # top frames: self, inclusive

``run.py --profile scheduler,worker`` starts the bench's processes this way. SIGPROF fires after
each millisecond of the process's CPU time (user and system), and each sample records the Python
stack it interrupted, so time blocked in ``epoll`` or preempted inside a socket write is not
counted. (py-spy did count it in this container, even with ``--gil``: its profiles here read as
wall-clock time, with a fifth of the scheduler "in" ``StreamWriter.write``.) Native code (uvloop,
pydantic-core, the kernel) is charged to the Python frame that called it, and the cycle
collector's passes to ``cycle_collection``.

When the process exits (SIGTERM stops it gracefully), ``OUT`` gets one line per distinct stack,
``frame;frame;... count`` (the collapsed format of flamegraph.pl and speedscope), and
``OUT.gc.json`` the cycle collector's passes and CPU seconds per generation.
"""

from __future__ import annotations

import atexit
import collections
import gc
import json
import re
import runpy
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

INTERVAL_S = 0.001


def _sample_into(stacks: collections.Counter[str]) -> None:
    def on_sample(_signum: int, frame: FrameType | None) -> None:
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})")
            frame = frame.f_back
        stacks[";".join(reversed(names))] += 1

    signal.signal(signal.SIGPROF, on_sample)
    signal.setitimer(signal.ITIMER_PROF, INTERVAL_S, INTERVAL_S)


def _time_collector(passes: dict[int, list[float]]) -> None:
    started = [0.0]

    def cycle_collection(phase: str, info: dict[str, int]) -> None:
        """(The samples taken during a collection land here, in its "stop" call.)"""
        if phase == "start":
            started[0] = time.thread_time()
        else:
            counted = passes[info["generation"]]
            counted[0] += 1
            counted[1] += time.thread_time() - started[0]

    gc.callbacks.append(cycle_collection)


def profile(out: Path, cli_args: list[str]) -> None:
    stacks: collections.Counter[str] = collections.Counter()
    passes = {generation: [0, 0.0] for generation in range(3)}

    def write() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        out.write_text("".join(f"{stack} {count}\n" for stack, count in stacks.items()))
        collector: dict[str, Any] = {
            f"gen{g}": {"passes": int(n), "cpu_s": round(s, 3)} for g, (n, s) in passes.items()
        }
        collector["process_cpu_s"] = round(time.process_time(), 3)
        Path(f"{out}.gc.json").write_text(json.dumps(collector, indent=1))

    atexit.register(write)
    _time_collector(passes)
    _sample_into(stacks)
    sys.argv = ["broker.cli", *cli_args]
    runpy.run_module("broker.cli", run_name="__main__")


def report(out: Path, top: int = 30) -> str:
    """The frames with the most samples, by their own time and with what they call."""
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            within[frame] += samples
    lines = [f"{total} samples ({INTERVAL_S * 1000:g} ms of CPU each)", "", "self:"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in within.most_common(top * 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        print(report(Path(sys.argv[2])))
    elif len(sys.argv) >= 3:
        profile(Path(sys.argv[1]), sys.argv[2:])
    else:
        sys.exit(__doc__)
