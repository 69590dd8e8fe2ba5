"""A rule that does not compile, explained: the rule, the expression, line:column, a caret under
the fault and, for the common mistakes, a hint, so the file's author can fix it from the message.

Checked at compile: syntax; unknown variables and unknown fields (``foo.bar``,
``provider.day_token_used``); operand types (``provider.day_tokens_used == "a"``; CEL does not
mix int and double, so ``provider.error_rate > 1`` is refused: write ``1.0``); a result type
other than bool. A ``dyn`` result (``request.metadata.urgent``) is accepted and checked when
evaluated.
"""

from __future__ import annotations

import re

from broker.core.errors import ConfigError
from broker.core.rule_env import BOOL, DYN, ENV, FIELDS, SECTIONS, Program

__all__ = ["compile_when"]


def compile_when(index: int, name: str, when: str) -> Program:
    """Rule ``index`` (``name``)'s expression, compiled; ``ConfigError`` explains a failure."""
    where = f"rules.{index} ({name}): invalid `when` expression {when!r}"
    try:
        program = ENV.compile(when)
    except Exception as exc:
        problems = _parse_issues(str(exc))
        raise ConfigError("\n".join([where, *(_show(when, *p) for p in problems)])) from None
    result_type = program.return_type()
    if result_type != BOOL and result_type != DYN:
        reason = f"must be a boolean expression, but its type is {result_type.name().lower()}"
        raise ConfigError(f"{where}\n{_show(when, 1, 1, reason)}")
    return program


# cel-cpp reports "ERROR: <input>:LINE:COL: reason", then " | source" and " | ...^" lines.
_ISSUE = re.compile(r"^ERROR: <input>:(\d+):(\d+): (.*)$")
_STATUS = re.compile(r"^[A-Z_]+: (?=ERROR: )|\s*\[[A-Z_]+\]\s*$")
_UNDECLARED = re.compile(r"undeclared reference to '([^']*)'")


def _parse_issues(text: str) -> list[tuple[int | None, int | None, str]]:
    issues: list[tuple[int | None, int | None, str]] = []
    for line in _STATUS.sub("", text).splitlines():
        match = _ISSUE.match(line)
        if match:
            reason = _hint(match.group(3).replace(" (in container '')", ""))
            issues.append((int(match.group(1)), int(match.group(2)), reason))
        elif issues and not line.startswith(" | "):
            line_no, column, reason = issues[-1]
            issues[-1] = (line_no, column, f"{reason}\n{line}")
    return issues or [(None, None, text)]


def _hint(reason: str) -> str:
    undeclared = _UNDECLARED.search(reason)
    if undeclared:
        root = undeclared.group(1).split(".", 1)[0]
        if root in FIELDS:
            return f"{reason} ({root} has: {', '.join(FIELDS[root])})"
        return f"{reason} (the variables are: {', '.join(SECTIONS)})"
    if "(double, int)" in reason or "(int, double)" in reason:
        return f"{reason} (CEL does not mix int and double: write 1.0, or use double()/int())"
    return reason


def _show(expression: str, line_no: int | None, column: int | None, reason: str) -> str:
    """``  L:C: reason`` then the source line and a caret under column C (1-based)."""
    if line_no is None or column is None:
        return f"  {reason}"
    lines = expression.split("\n")
    source = lines[line_no - 1].rstrip("\r") if 0 < line_no <= len(lines) else ""
    # Keep tabs so the caret lines up with the source as a terminal renders it.
    pad = "".join("\t" if ch == "\t" else " " for ch in source[: column - 1])
    pad += " " * max(0, column - 1 - len(source))
    return f"  {line_no}:{column}: {reason}\n    | {source}\n    | {pad}^"
