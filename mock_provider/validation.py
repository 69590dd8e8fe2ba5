"""What the request validators of every API share: the 400 exception and JSON type names."""

from __future__ import annotations

__all__ = ["InvalidRequest", "is_int", "is_number", "json_kind"]


class InvalidRequest(Exception):
    """A 400: ``message`` as the API words it, ``param`` the offending field path."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_kind(value: object) -> str:
    """``value``'s JSON type with an article: "a string", "an array", "null"..."""
    if value is None:
        return "null"
    names: list[tuple[type, str]] = [
        (bool, "a boolean"),  # before int: bool is an int subclass
        (int, "an integer"),
        (float, "a decimal"),
        (str, "a string"),
        (list, "an array"),
    ]
    return next((name for t, name in names if isinstance(value, t)), "an object")
