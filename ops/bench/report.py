"""The bench's outputs: JSON, a Markdown table and a PNG chart, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = ("scenario", "jobs", "errors", "jobs/s", "p50 ms", "p95 ms", "p99 ms", "notes")
NOTE_KEYS = (
    "vs_baseline_throughput",
    "vs_baseline_p50",
    "p50_minus_baseline_ms",
    "added_p50_ms",
    "added_p99_ms",
    "vs_ideal",
    "vs_baseline",
    "mock_max_in_flight",
    "cpu_s_per_job_ms",
    "accountant_drained_s_after_last_reply",
    "capped",
)


def _notes(extra: dict[str, Any]) -> str:
    notes = [f"{key}={extra[key]}" for key in NOTE_KEYS if key in extra and extra[key] is not False]
    if "rss_mib" in extra:
        rss = ", ".join(
            f"{name} {v['first']}→{v.get('half')}→{v['last']} (peak {v['peak']})"
            for name, v in extra["rss_mib"].items()
        )
        notes.append(f"RSS MiB first→halfway→last: {rss}")
    return "; ".join(notes)


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Bench run: {results['seconds']} s on {results['machine']['cpus']} CPUs; "
        + ", ".join(f"{k}={v}" for k, v in results.get("settings", {}).items())
        + ".",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for run in results["runs"]:
        cells = [
            run["name"],
            str(run["jobs"]),
            str(run["errors"]),
            f"{run['per_second']:.1f}",
            f"{run['p50_ms']:.2f}",
            f"{run['p95_ms']:.2f}",
            f"{run['p99_ms']:.2f}",
            _notes(run["extra"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = [r["name"] for r in runs]
    # One y axis for both panels, so a scenario's dots sit beside its bar.
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.5 * len(runs) + 2.5), sharey=True)
    left.barh(names, [r["per_second"] for r in runs], color="#4c72b0")
    left.set_xlabel("jobs per second")
    left.invert_yaxis()
    for key, colour in (("p50_ms", "#55a868"), ("p95_ms", "#dd8452"), ("p99_ms", "#c44e52")):
        right.scatter([r[key] for r in runs], names, label=key.removesuffix("_ms"), color=colour)
    right.set_xscale("log")
    right.set_xlabel("end-to-end latency, ms (log)")
    right.tick_params(labelleft=False)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: dict[str, Any], out: Path) -> None:
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(markdown(results))
    chart(results, out / "bench.png")
