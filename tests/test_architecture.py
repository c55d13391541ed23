"""The shape of the package (issue 14): small files, no import cycles, and one registry that
drives the magics, the demo, the README's magic table and ``nbcompress.TECHNIQUES``."""
from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

import nbcompress
from nbcompress.core import DEMOS, TECHNIQUES, StepConfig
from nbcompress.options import options_of

ROOT = pathlib.Path(nbcompress.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level_imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """Modules of the package that ``name`` imports when it is imported (module level, also
    inside top-level if/try blocks; imports inside functions are deliberate late imports)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue            # annotations only: not imported at run time
        if isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                stack.extend(h.body)
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def test_no_file_over_the_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in ROOT.rglob("*.py")}
    big = {k: v for k, v in sizes.items() if v > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _top_level_imports(m, p, modules) for m, p in modules.items()}
    # a package's import of its own submodules is how packages work, not a cycle
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle(tmp_path):
    """The checker above is not vacuous: two modules importing each other are found."""
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import thing\n")
    modules = {"pkgx": pkg / "__init__.py", "pkgx.a": pkg / "a.py", "pkgx.b": pkg / "b.py"}
    assert "pkgx.b" in _top_level_imports("pkgx.a", pkg / "a.py", modules)
    assert _top_level_imports("pkgx.b", pkg / "b.py", modules) == {"pkgx.a"}


def test_modules_do_not_share_names_with_the_verbs():
    import importlib

    for verb in ("prune", "quantize", "lowrank", "distill", "early_exit", "sensitivity"):
        assert callable(getattr(nbcompress, verb))
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"nbcompress.{verb}")


@pytest.mark.parametrize("technique", ["prune", "distill", "quantize", "lowrank", "earlyexit"])
def test_registered_technique_is_complete(technique):
    cls = TECHNIQUES[technique]
    assert issubclass(cls, StepConfig) and cls.summary and cls.examples
    assert technique in DEMOS
    declared = {f.name for f, _ in options_of(cls)}
    fields = {f.name for f in dataclasses.fields(cls)} - {"device", "progress"}
    assert fields == declared, f"fields without an option declaration: {fields - declared}"
    for f, opt in options_of(cls):
        assert opt.help, f"{technique}.{f.name} has no help"
    assert nbcompress.TECHNIQUES is TECHNIQUES


def test_readme_magic_table_is_the_registrys():
    from nbcompress.magics.technique import magic_table

    readme = (ROOT.parent / "README.md").read_text()
    begin, end = "<!-- techniques: begin -->\n", "<!-- techniques: end -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == magic_table(), ("README's technique table is out of date: paste the output "
                                    "of `python -m nbcompress magics` between the markers")


def test_builtin_techniques_keep_their_order_and_the_demo_runs(capsys):
    """The README's first command runs the demo: its pipeline applies the techniques in
    registration order, and int8 before pruning is refused. An import between techniques once
    registered quantize first (prune imported a quantize helper at load time) and broke it."""
    from nbcompress.core import DEMOS, TECHNIQUES
    from nbcompress.demo import run

    assert list(TECHNIQUES)[:5] == ["prune", "distill", "quantize", "lowrank", "earlyexit"]
    assert list(DEMOS)[:5] == ["prune", "distill", "quantize", "lowrank", "earlyexit"]
    histories = run(epochs=1)
    out = capsys.readouterr().out
    assert "reloaded outputs identical: True" in out and "done in" in out
    steps = [v.technique for v in histories["model"].versions]
    assert steps[:2] == ["baseline", "prune"] and "quantize" in steps
