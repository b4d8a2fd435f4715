"""Packages of the optional requirement groups: import one, or stop with one line that says how to install it.

The core install (``requirements.txt``) runs the inference and training scripts. Two groups are extra:

* ``metrics`` (``requirements-metrics.txt`` plus pyiqa without its dependency list): FADE, pyiqa's learned metrics,
  the charts of the comparison tools (matplotlib);
* ``app`` (``requirements-app.txt``): the local web page ``app.py`` (gradio).

An entry point that needs such a package calls :func:`require` before its work starts. A missing package is one
``ERROR`` line on stderr naming the package, its group and the install command, and exit status 2 (the status the
scripts use for an unusable setup) instead of a ``ModuleNotFoundError`` traceback.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

EXIT_MISSING = 2
INSTALL = {
    "metrics": "pip install -r requirements-metrics.txt && pip install --no-deps pyiqa==0.1.16",
    "app": "pip install -r requirements-app.txt",
}


def missing_message(module: str, group: str, install: str, missing: str | None = None) -> str:
    """The one line :func:`require` prints: ``module`` (or ``missing``, a package it needs) is not installed."""
    if missing in (None, module):
        what = f"{module} is missing"
    else:
        what = f"{module} cannot be imported ({missing} is missing)"
    return f"ERROR {what}: it belongs to the optional {group} group; install it with: {install}"


def require(module: str, group: str, install: str | None = None) -> ModuleType:
    """Import ``module`` (a dotted name) and return it. If it, or a package it imports, is not installed: print
    one line to stderr naming ``module``, the optional ``group`` and the install command (``install``, default
    ``INSTALL[group]``) and exit with status 2 (``SystemExit``, so no traceback is printed)."""
    command = install if install is not None else INSTALL[group]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        parents = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 2)}
        missing = module if err.name is None or err.name in parents else err.name
        print(missing_message(module, group, command, missing), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_MISSING) from None
