"""utils.optional.require, and the entry points that need an optional group: with the package hidden they stop with
exit status 2 and one stderr line naming the group and its install command, never a traceback.

A package is hidden by setting ``sys.modules[name] = None`` in a fresh interpreter before the entry point runs
(``runpy`` from the repository root), so the tests do not depend on what the venv has installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.optional import INSTALL, require

ROOT = Path(__file__).resolve().parents[2]
METRICS_LINE = ("ERROR matplotlib is missing: it belongs to the optional metrics group; install it with: "
                "pip install -r requirements-metrics.txt && pip install --no-deps pyiqa==0.1.16")
APP_LINE = ("ERROR gradio is missing: it belongs to the optional app group; install it with: "
            "pip install -r requirements-app.txt")


def test_require_returns_the_module():
    import json

    assert require("json", "metrics") is json


def test_missing_module_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        require("hcdyc_not_a_real_package", "metrics")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"ERROR hcdyc_not_a_real_package is missing: it belongs to the optional metrics group; "
                                f"install it with: {INSTALL['metrics']}"]


def test_missing_dependency_names_both(tmp_path, monkeypatch, capsys):
    (tmp_path / "hcdyc_needs_more.py").write_text("import hcdyc_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        require("hcdyc_needs_more", "app", install="pip install something")
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "ERROR hcdyc_needs_more cannot be imported (hcdyc_missing_dependency is missing): it belongs to the optional "
        "app group; install it with: pip install something"]


def _run_hidden(hidden: str, argv: list[str], *, module: str | None = None, path: str | None = None):
    """Run an entry point (``python -m module`` or ``python path``) from the repository root with ``hidden``
    unimportable."""
    if module is not None:
        launch = f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    else:
        launch = f"runpy.run_path({path!r}, run_name='__main__')"
    code = f"import runpy, sys; sys.modules[{hidden!r}] = None; sys.argv = {[module or path, *argv]!r}; {launch}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def _assert_one_line(proc: subprocess.CompletedProcess, line: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [line]


def test_app_without_gradio(tmp_path):
    _assert_one_line(_run_hidden("gradio", ["--config", str(tmp_path / "unused.yaml")], path="app.py"), APP_LINE)


def test_run_benchmark_without_matplotlib(tmp_path):
    proc = _run_hidden("matplotlib", ["--bench", str(tmp_path / "bench")], module="tools.run_benchmark")
    _assert_one_line(proc, METRICS_LINE)
    assert not (tmp_path / "bench").exists()


def test_compare_methods_without_matplotlib(tmp_path):
    proc = _run_hidden("matplotlib", ["--methods", f"hazy={tmp_path}", "--out", str(tmp_path / "out")],
                       module="tools.compare_methods")
    _assert_one_line(proc, METRICS_LINE)
    assert not (tmp_path / "out").exists()


def test_evaluate_save_maps_without_matplotlib(tmp_path):
    proc = _run_hidden("matplotlib", ["--results", str(tmp_path), "--out", str(tmp_path / "eval"), "--save-maps",
                                      "--no-ref-metrics", "fade"], path="evaluate.py")
    _assert_one_line(proc, METRICS_LINE)
    assert not (tmp_path / "eval").exists()


def test_evaluate_without_fade_python_reports_fade_unavailable(tmp_path):
    """A missing metric package is a per-metric 'unavailable' (exit 1, the other metrics still run), as for a missing
    parameter file; no traceback."""
    proc = _run_hidden("pyfade", ["--results", str(ROOT / "inputs"), "--out", str(tmp_path / "eval"), "--quiet",
                                  "--no-ref-metrics", "fade"], path="evaluate.py")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "metric unavailable: fade: fade-python is not installed" in proc.stderr
