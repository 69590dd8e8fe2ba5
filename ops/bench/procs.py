"""Processes a bench run starts (mock provider, Switchyard processes, the bare baseline worker),
stopped by PID, with their CPU time and memory read from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (all cores, from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / CLOCK_TICKS


def pids_named(name: str) -> list[int]:
    """PIDs whose command name is ``name`` (e.g. beam.smp for RabbitMQ, postgres)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    cpu_at_mark: float = 0.0
    rss_samples: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def mark(self) -> None:
        self.cpu_at_mark = cpu_seconds(self.pid)
        self.rss_samples.clear()

    def cpu_since_mark(self) -> float:
        return cpu_seconds(self.pid) - self.cpu_at_mark

    def sample(self) -> None:
        if self.popen.poll() is None:
            self.rss_samples.append(memory_kib(self.pid)[0])


class Procs:
    """Starts commands with one environment and stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.running: list[Proc] = []

    def start(self, name: str, *args: str, wrapper: Sequence[str] = ()) -> Proc:
        """Run ``python ARGS...`` (under ``wrapper``, a command such as valgrind's, if given);
        ``cli(...)`` builds the args of a ``switchyard`` command."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        popen = subprocess.Popen(
            [*wrapper, sys.executable, *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc = Proc(name, popen)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 15) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc)


def cli(*args: str) -> tuple[str, ...]:
    return ("-m", "broker.cli", *args)


def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")
