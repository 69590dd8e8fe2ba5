"""What every Switchyard process sets up before it serves: the tuned cycle collector."""

from __future__ import annotations

import gc
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import cli
from broker.core.config import Config
from broker.core.settings import Settings
from broker.transport.runtime import GC_THRESHOLDS


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_a_served_process_runs_with_startup_frozen_and_the_raised_thresholds(
    restored_gc: None, config_file: Path, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def run_loop(main: Coroutine[Any, Any, None], event_loop: str) -> None:
        seen["threshold"] = gc.get_threshold()
        seen["frozen"] = gc.get_freeze_count()
        main.close()  # the services themselves are other tests' business

    monkeypatch.setattr(cli, "run_loop", run_loop)
    assert gc.get_threshold() != GC_THRESHOLDS and gc.get_freeze_count() == 0
    cli._serve(Settings(config=config_file), config, [])
    assert seen["threshold"] == GC_THRESHOLDS
    assert seen["frozen"] > 10_000  # modules, classes, schemas: what startup made
