"""The layers of the tree: imports flow one way, no library module loads an entry script, no cycles, no sys.path."""
from __future__ import annotations

from pathlib import Path

from tests.helpers import ROOT
from tests.layout_rules import import_cycles, import_edges, layer_violations, package_cycles, project_modules


def test_every_import_follows_the_layer_order():
    assert layer_violations(ROOT) == []


def test_module_and_package_import_graphs_have_no_cycle():
    assert import_cycles(ROOT) == []
    assert package_cycles(ROOT) == []


def test_no_module_edits_sys_path():
    assert import_edges(ROOT)[1] == []


def test_utils_is_generic():
    """utils/ holds the generic helpers only: it imports nothing else of the project."""
    edges = [e for e in import_edges(ROOT)[0] if e.importer.startswith("utils")]
    assert edges and all(e.imported.startswith("utils") for e in edges)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_rules_catch_each_kind_of_fault(tmp_path):
    """A small tree with one fault of each kind: upward and sideways imports (also lazy ones inside a function),
    an entry script imported by a library module, a test helper imported by a benchmark, a sys.path edit, and a
    module cycle inside a package."""
    root = _write(tmp_path, {
        "utils/__init__.py": "", "utils/io.py": "from model import net\n",
        "haze/__init__.py": "", "haze/dcp.py": "def f():\n    from metrics.ssim import ssim\n",
        "metrics/__init__.py": "", "metrics/ssim.py": "import utils.io\n",
        "model/__init__.py": "", "model/net.py": "from haze import dcp\n",
        "pipelines/__init__.py": "", "pipelines/modes.py": "import inference_x\n",
        "pipelines/a.py": "from pipelines import b\n", "pipelines/b.py": "from . import a\n",
        "benchmarks/__init__.py": "", "benchmarks/bench.py": "import sys\nsys.path.insert(0, '.')\nimport tests.helpers\n",
        "inference_x.py": "from pipelines.modes import *\n",
        "tests/__init__.py": "", "tests/helpers.py": "",
    })
    found = "\n".join(layer_violations(root))
    assert "utils.io imports model.net (model is not below utils)" in found
    assert "haze.dcp imports metrics.ssim (metrics is not below haze)" in found
    assert "pipelines.modes imports inference_x (an entry script)" in found
    assert "benchmarks.bench imports tests.helpers (the tests)" in found
    assert "model.net imports haze.dcp" not in found and "metrics.ssim imports utils.io" not in found
    assert import_edges(root)[1] == ["benchmarks/bench.py:2"]
    assert ["pipelines.a", "pipelines.b"] in import_cycles(root)
    assert any({"utils", "model"} <= set(cycle) for cycle in package_cycles(root))
    assert "tests.helpers" not in project_modules(root)
