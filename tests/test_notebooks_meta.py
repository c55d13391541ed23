"""The notebooks are a product: checks of their form that need no kernel (the notebooks themselves
run under nbval, see scripts/test.sh).

Every notebook in ``notebooks/``: valid nbformat 4, kernelspec ``python3``, first cell
``%load_ext nbcompress``, no stored errors, a gallery line in the README. The suite runs them
strictly, with a per-cell timeout. The quickstart runs one step of each magic; the homework
asserts its own targets, so nbval fails when they are missed.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_IMAGE_BYTES = 300_000


def _read(path: Path):
    return nbformat.read(str(path), as_version=4)


def _code_lines(nb) -> list[str]:
    return [line.strip() for c in nb.cells if c.cell_type == "code"
            for line in c.source.splitlines()]


def _gallery() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Gallery\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, "README.md has no '## Gallery' section"
    return m.group(1)


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "06_homework.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_conventions(path):
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", \
        f"{path.name}: kernelspec must be python3 (what nbval and JupyterLab start)"
    first = nb.cells[0]
    assert first.cell_type == "code" and first.source.strip() == "%load_ext nbcompress", \
        f"{path.name}: the first cell must be %load_ext nbcompress"
    for i, c in enumerate(nb.cells):
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            assert o.get("output_type") != "error", f"{path.name}: cell {i} has a stored error"


def _test_command() -> tuple[str, list[str]]:
    """scripts/test.sh: (the whole script, the words of its ``python -m pytest`` command with the
    script's own ``NAME="..."`` variables expanded)."""
    script = (ROOT / "scripts" / "test.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    code = code.replace("\\\n", " ")
    variables = dict(re.findall(r'^\s*([A-Za-z_]\w*)="([^"]*)"\s*$', code, flags=re.M))
    commands = [line for line in code.splitlines() if re.search(r"python\S* -m pytest\b", line)]
    assert len(commands) == 1, "scripts/test.sh should run one pytest command"
    words = []
    for w in commands[0].split():
        m = re.fullmatch(r'"?\$\{?([A-Za-z_]\w*)\}?"?', w)
        words += variables.get(m.group(1), "").split() if m else [w.strip('"')]
    return script, words


def test_notebook_suite_runs_every_notebook_strictly_with_a_cell_timeout():
    script, words = _test_command()
    assert "--nbval-lax" in words and "--nbval-current-env" in words
    timeout = [w for w in words if w.startswith("--nbval-cell-timeout=")]
    assert timeout and 0 < int(timeout[0].split("=")[1]) <= 600, \
        "each notebook cell needs a timeout of at most 600 s"
    assert re.search(r"NBCOMPRESS_STRICT=1", script), "notebooks must run with NBCOMPRESS_STRICT=1"
    assert re.search(r"NBCOMPRESS_DISPLAY=text", script)
    paths = {w.rstrip("/") for w in words}
    missing = [p.name for p in NOTEBOOKS if "notebooks" not in paths
               and f"notebooks/{p.name}" not in paths]
    assert not missing, f"scripts/test.sh does not run {missing} under nbval"


def test_readme_gallery_lists_every_notebook_with_a_small_screenshot():
    gallery = _gallery()
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in gallery]
    assert not missing, f"README gallery has no line for {missing}"
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", gallery)
    assert images, "the gallery shows no screenshot"
    for img in images:
        path = ROOT / img
        assert path.is_file(), f"gallery image {img} does not exist"
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < MAX_IMAGE_BYTES, img


def test_quickstart_runs_each_magic_then_history_and_undo():
    lines = _code_lines(_read(ROOT / "notebooks" / "01_quickstart.ipynb"))
    order = []
    for magic in ("%nbcompress model", "%prune model", "%quantize model", "%lowrank",
                  "%distill", "%earlyexit", "%compress_history model", "%undo model"):
        hits = [i for i, line in enumerate(lines) if line.startswith(magic)]
        assert hits, f"the quickstart never runs {magic}"
        order.append(hits[0])
    assert order[-1] > order[-2] > order[2], "%compress_history and %undo come after the steps"


def test_homework_asserts_budget_and_accuracy_with_all_four_magics():
    nb = _read(ROOT / "notebooks" / "06_homework.ipynb")
    lines = _code_lines(nb)
    for magic in ("%distill student", "%lowrank student", "%prune student", "%quantize student",
                  "%compress_history student"):
        assert any(line.startswith(magic) for line in lines), f"the homework never runs {magic}"
    assert "BUDGET_BYTES = 20_000" in " ".join(lines) and "KEEP = 0.99" in " ".join(lines)
    check = [c.source for c in nb.cells if c.cell_type == "code" and "nbcompress.save(" in c.source
             and "assert" in c.source]
    assert check, "no cell saves the model and asserts the targets"
    assert re.search(r"assert saved_bytes <= BUDGET_BYTES", check[0])
    assert re.search(r"assert accuracy >= target", check[0])
    assert "nbcompress.load(" in check[0], "the handed-in accuracy is the reloaded model's"
    last_code = [c for c in nb.cells if c.cell_type == "code"][-1].source
    assert "compress_history" in last_code and "sort_values" in last_code, \
        "the closing cell ranks every version of the histories"
    md = " ".join(c.source for c in nb.cells if c.cell_type == "markdown").lower()
    assert "your turn" in md
