"""Build Switchyard's Grafana dashboards into ``ops/grafana/dashboards/*.json``, which Grafana
provisions (``ops/grafana/provisioning``). The JSON is committed; ``tests/test_observability_rules``
checks it equals a fresh build, so edit the code and run this, never the JSON.

    python -m ops.grafana.build            # write the JSON
    python -m ops.grafana.build --check    # exit 1 if the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from ops.grafana.cost import cost
from ops.grafana.overview import overview
from ops.grafana.providers import providers
from ops.grafana.queues import queues

__all__ = ["BOARDS", "DASHBOARDS_DIR", "render", "stale", "write"]

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
BOARDS: dict[str, Callable[[], Dashboard]] = {
    "overview.json": overview,
    "providers.json": providers,
    "cost.json": cost,
    "queues.json": queues,
}


def render() -> dict[str, str]:
    """Each dashboard's file name and JSON text, as written."""
    return {
        name: json.dumps(make().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
        for name, make in BOARDS.items()
    }


def write(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """The dashboard files in ``directory`` that differ from a fresh build, are missing, or
    are not built by this script."""
    fresh = render()
    found = {path.name for path in directory.glob("*.json")}
    differ = [
        name
        for name, text in fresh.items()
        if not (directory / name).exists() or (directory / name).read_text() != text
    ]
    return sorted(differ + [name for name in found - fresh.keys()])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR)
    args = parser.parse_args(argv)
    if args.check:
        differ = stale(args.out)
        for name in differ:
            print(f"stale: {args.out / name} (run python -m ops.grafana.build)", file=sys.stderr)
        return 1 if differ else 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
