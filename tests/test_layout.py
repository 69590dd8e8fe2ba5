"""The layout's rules that import-linter cannot check (docs/architecture.md, "Layout and
layering"): modules and functions stay small enough to read in one sitting, and server code
connects to RabbitMQ only through ``connect_server``, which honours SWITCHYARD_AMQP_FAST_PATH."""

from __future__ import annotations

import ast

from tests.conftest import REPO

PRODUCTION = ("broker", "workers", "schemas")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# The producer's library connects plainly; the transport defines both.
PLAIN_CONNECT_ALLOWED = ("broker/client/", "broker/transport/")


def _modules() -> list[tuple[str, ast.Module, str]]:
    found = []
    for package in PRODUCTION:
        for path in sorted((REPO / package).rglob("*.py")):
            text = path.read_text()
            found.append((path.relative_to(REPO).as_posix(), ast.parse(text), text))
    return found


def test_no_production_module_or_function_is_too_long() -> None:
    modules = _modules()
    assert len(modules) > 50  # the walk found the tree
    too_long = [
        f"{name}: {text.count(chr(10))} lines"
        for name, _, text in modules
        if text.count("\n") > MAX_MODULE_LINES
    ]
    functions = [
        f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree, _ in modules
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert too_long == [] and functions == []


def test_server_code_connects_only_through_connect_server() -> None:
    plain = [
        f"{name}:{node.lineno}"
        for name, tree, _ in _modules()
        if not name.startswith(PLAIN_CONNECT_ALLOWED)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module == "broker.transport.amqp"
        and any(alias.name == "connect" for alias in node.names)
    ]
    assert plain == []
