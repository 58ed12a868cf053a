"""The package imports form no circle (issue 33, item 1): every module's imports, function-level ones included,
point only at modules that do not import it back, so the import drawing reads top to bottom."""

from __future__ import annotations

from pathlib import Path

from scripts.structure import circles, import_graph, largest_functions

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_has_no_import_circle():
    graph = import_graph(ROOT)
    assert {"beacon_peft.model", "beacon_peft.memory", "beacon_peft.training.readback.loop"} <= graph.keys()
    assert {"beacon_peft.forward", "beacon_peft.support"} <= graph["beacon_peft.model"]  # it sees the imports
    assert circles(graph) == [], "import circles (python scripts/structure.py draws them)"


def test_a_circle_hidden_in_a_function_is_found(tmp_path):
    """The check can fail: two modules importing each other, one of them inside a function, and a relative
    ``from .. import name`` of a subpackage back into the package's ``__init__``."""
    pkg = tmp_path / "beacon_peft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub.leaf import thing\n")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (pkg / "c.py").write_text("import beacon_peft.a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("from .. import Config\nthing = 1\n")
    graph = import_graph(tmp_path)
    assert graph["beacon_peft.c"] == {"beacon_peft.a"} and graph["beacon_peft.a"] == {"beacon_peft.b"}
    assert circles(graph) == [["beacon_peft", "beacon_peft.sub.leaf"], ["beacon_peft.a", "beacon_peft.b"]]
    assert largest_functions(tmp_path, ("beacon_peft",), 1) == [(3, "beacon_peft/b.py:f")]
