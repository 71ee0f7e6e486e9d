"""The package's import graph (tests/import_graph.py, read from the source with ast): the
layers of docs/architecture.md hold, no module is over MAX_LINES lines, and every exception
class lives in errors.py. `python -m tests.import_graph` draws the graph."""

from __future__ import annotations

from tests import import_graph
from tests.import_graph import LAYERS, MAX_LINES, TYPE_ONLY_UPWARD, Graph

GRAPH: Graph = import_graph.build()


def test_the_graph_sees_imports_at_module_level_in_functions_and_for_types_only() -> None:
    imports, type_only = GRAPH.imports, GRAPH.type_only
    assert "s3xfer.transport.s3" in imports["s3xfer.write.engine"]  # from ..transport.s3 import
    assert "s3xfer.runner" in imports["s3xfer.distributed.worker"]  # from .. import runner
    assert "s3xfer.dataset.tarpack" in imports["s3xfer.localfs"]  # inside a function
    assert "s3xfer.planning.survey" in type_only["s3xfer.localfs"]  # under TYPE_CHECKING
    assert "s3xfer.planning.survey" not in imports["s3xfer.localfs"]


def test_the_checks_find_what_they_look_for() -> None:
    edges = {"s3xfer.a": {"s3xfer.b"}, "s3xfer.b": {"s3xfer.c"}, "s3xfer.c": {"s3xfer.a"}}
    assert import_graph.circles(edges) == [["s3xfer.a", "s3xfer.b", "s3xfer.c"]]
    assert import_graph.circles({"s3xfer.a": {"s3xfer.b"}, "s3xfer.b": set()}) == []
    assert import_graph.upward({"s3xfer.errors": {"s3xfer.cli.main"}}) == [
        ("s3xfer.errors", "s3xfer.cli.main")
    ]
    assert import_graph.upward({"s3xfer.cli.main": {"s3xfer.errors"}}) == []


def test_every_module_is_in_a_layer() -> None:
    ranks = {name: import_graph.layer_of(name) for name in GRAPH.modules}
    assert ranks["s3xfer.errors"] == 0
    assert ranks["s3xfer.cli.main"] == len(LAYERS) - 1


def test_no_import_circle() -> None:
    assert import_graph.circles(GRAPH.imports) == []


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    assert import_graph.upward(GRAPH.imports) == []


def test_upward_imports_for_types_only_are_the_ones_listed_with_a_reason() -> None:
    # The root package's TYPE_CHECKING block is what type checkers see of its lazy public
    # names (every layer's), not a dependency of its own.
    found = [edge for edge in import_graph.upward(GRAPH.type_only) if edge[0] != "s3xfer"]
    assert found == sorted(TYPE_ONLY_UPWARD)


def test_no_module_over_the_line_limit() -> None:
    assert import_graph.long_modules(GRAPH) == {}, f"modules over {MAX_LINES} lines"


def test_exception_classes_live_in_errors_py() -> None:
    assert import_graph.exception_classes(GRAPH) == {}
