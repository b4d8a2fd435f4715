"""Value rules of a settings object: the one mechanism by which the ``inference.*`` and ``train.*`` settings check
their values (``pipelines.settings.InferenceSettings``, ``training.settings.TrainSettings`` / ``ExtensionSettings``).

A rule is ``(keys, test, expected)``: every attribute named in ``keys`` must pass ``test``; ``expected`` says what a
valid value is, for the one-line message ``<section>.<key> must be <expected>, got <key>=<value>``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

Rule = tuple[tuple[str, ...], Callable[[Any], bool], str]


def first_violation(settings: Any, rules: Sequence[Rule], section: str) -> str | None:
    """The message of the first rule (in order) that an attribute of ``settings`` breaks, or None."""
    for keys, ok, expected in rules:
        for key in keys:
            value = getattr(settings, key)
            if not ok(value):
                return f"{section}.{key} must be {expected}, got {key}={value!r}"
    return None


def is_int(value: Any) -> bool:
    """An integer, not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float, not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """``test`` that also accepts None (a key that may be null)."""
    return lambda value: value is None or test(value)
