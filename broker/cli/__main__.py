"""``python -m broker.cli``: the ``switchyard`` command, for where the console script is not
installed (tests, the bench)."""

from __future__ import annotations

from broker.cli import app

__all__: list[str] = []

if __name__ == "__main__":
    app()
