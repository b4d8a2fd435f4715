"""Value rules of a settings object: the one mechanism by which every config section checks its keys and values
(``pipelines.settings.InferenceSettings``, ``training.settings.TrainSettings`` / ``ExtensionSettings``, the ``dcp``
and ``guidance`` sections, and through :func:`check_section_keys` / :func:`check_target_block` the top level, the
``model`` and ``dataset`` sections).

A rule is ``(keys, test, expected)``: every attribute named in ``keys`` must pass ``test``; ``expected`` says what a
valid value is, for the one-line message ``<section>.<key> must be <expected>, got <key>=<value>``. Unknown keys are
refused with the closest known one (:func:`unknown_keys_message`). Every failure is a :class:`SettingsError`: one line
naming the key path, exit status 2 at start-up.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

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


class SettingsError(ValueError):
    """A bad config key or value; the message is one line naming its key path."""


def shown_key(key: str) -> str:
    """A key as a one-line message shows it: as written, or quoted (repr) when empty or not printable."""
    return key if key and key.isprintable() and key.strip() == key else repr(key)


def unknown_keys_message(given: Iterable[str], known: Iterable[str], section: str) -> str | None:
    """'unknown <section>.* key(s) a (did you mean b?); valid keys: ...' for the keys of ``given`` not in ``known``,
    or None. ``section`` '' is the top level."""
    known = sorted(str(k) for k in known)
    unknown = sorted(str(k) for k in set(given) - set(known))
    if not unknown:
        return None
    hints = [f"{shown_key(key)} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1))
             else shown_key(key) for key in unknown]
    where = f"{section}.* key(s)" if section else "top-level key(s)"
    return f"unknown {where} {', '.join(hints)}; valid keys: {', '.join(known)}"


def check_section_keys(values: Any, known: Iterable[str], section: str) -> None:
    """SettingsError unless ``values`` is a mapping whose keys are all in ``known``."""
    if not isinstance(values, Mapping):
        raise SettingsError(f"{section or 'the config'} must be a mapping of keys, got {values!r}")
    message = unknown_keys_message(values, known, section)
    if message is not None:
        raise SettingsError(message)


def check_top_level(cfg: Any, known: Iterable[str]) -> None:
    """The top level of a config: only ``known`` sections (did-you-mean), each a mapping of keys or null."""
    check_section_keys(cfg, known, "")
    for name in cfg:
        if cfg[name] is not None and not isinstance(cfg[name], Mapping):
            raise SettingsError(f"{name} must be a section (a mapping of keys), got {name}={cfg[name]!r}")


def check_target_block(block: Any, path: str, resolve: Callable[[str], Any]) -> None:
    """A ``target`` + ``params`` block (model parts, dataset, guidance): ``target`` must name a class or function
    (``resolve`` imports it), ``params`` must be a mapping of its keyword arguments (did-you-mean for an unknown one);
    nested blocks (a param that is itself a mapping with a ``target``) are checked the same way. SettingsError naming
    the key path otherwise. Values are the target's to check (its own settings object, or its constructor)."""
    check_section_keys(block, ("target", "params"), path)
    target = block.get("target")
    if target is None:
        raise SettingsError(f"{path}.target is required (a dotted class path)")
    if not isinstance(target, str):
        raise SettingsError(f"{path}.target must be a dotted class path, got {target!r}")
    try:
        obj = resolve(target)
    except (ImportError, AttributeError, ValueError) as err:
        raise SettingsError(f"{path}.target: cannot import {target!r} ({(str(err).splitlines() or [''])[0]})") from None
    params = block.get("params") or {}
    if not isinstance(params, Mapping):
        raise SettingsError(f"{path}.params must be a mapping of keys, got {params!r}")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return
    accepted = [name for name, p in signature.parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        check_section_keys(params, accepted, f"{path}.params")
    for key, value in params.items():
        if isinstance(value, Mapping) and "target" in value:
            check_target_block(value, f"{path}.params.{key}", resolve)


def read_section(cls: type, values: Any, rules: Sequence[Rule], section: str) -> Any:
    """``cls(**values)`` for a frozen settings dataclass whose fields are the keys of ``section``: unknown keys
    refused (did-you-mean), then every value checked by ``rules``. SettingsError otherwise."""
    import dataclasses

    check_section_keys(values, [f.name for f in dataclasses.fields(cls)], section)
    settings = cls(**values)
    message = first_violation(settings, rules, section)
    if message is not None:
        raise SettingsError(message)
    return settings
