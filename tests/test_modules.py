"""The package's shape: no import circle among qrm's modules, no shared module importing a command module, error
types importable without torch, and a bare ValueError out of a command treated as a bug (exit 70), not bad input."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import qrm.cli

QRM = Path(qrm.cli.__file__).resolve().parent
COMMAND_MODULES = {target.split(".")[1] for target, _ in qrm.cli.COMMANDS.values()}


def import_graph() -> dict[str, set[str]]:
    """qrm module -> the qrm modules it imports, at the top or inside a function (relative or `qrm.` imports)."""
    names = {p.stem for p in QRM.glob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in names}
    for path in QRM.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            found: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("qrm."):
                found = [node.module.split(".")[1]]  # type: ignore[union-attr]
            elif isinstance(node, ast.Import):
                found = [a.name.split(".")[1] for a in node.names if a.name.startswith("qrm.")]
            graph[path.stem] |= {f for f in found if f in names and f != path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_shared_modules_import_no_command_module() -> None:
    graph = import_graph()
    bad = {m: sorted(deps & COMMAND_MODULES) for m, deps in graph.items() if m not in COMMAND_MODULES}
    assert {m: d for m, d in bad.items() if d} == {}


def test_errors_cli_and_metrics_import_without_torch() -> None:
    code = "import sys, qrm.errors, qrm.cli, qrm.metrics; print('torch' in sys.modules, 'transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]


def test_every_exit_2_error_is_a_user_error() -> None:
    from qrm import errors

    for name in ("FlagError", "RecipeError", "LaunchError", "DataError", "SourceError", "ExportError", "PushError"):
        assert issubclass(getattr(errors, name), errors.UserError), name
    for name in ("NonFiniteError", "Preempted", "ServeError"):
        assert not issubclass(getattr(errors, name), errors.UserError), name


def test_a_bare_value_error_is_an_internal_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import qrm.export as export

    def buggy(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(export, "merge", buggy)
    assert qrm.cli.main(["merge", "--adapter", "a", "--out", "b"]) == qrm.cli.INTERNAL_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("qrm merge: internal error: ValueError: a bug") and "full traceback in " in err
    Path(err.split("full traceback in ")[1].rstrip(")")).unlink()
