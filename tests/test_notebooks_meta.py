"""The notebooks are a product: checks of their form that need no kernel (the notebooks themselves
run under nbval, see scripts/test.sh).

Every notebook in ``notebooks/``: valid nbformat 4, kernelspec ``python3``, first cell
``%load_ext nbcompress``, no stored errors, a gallery line in the README. The suite runs them
strictly, with a per-cell timeout. The quickstart runs one step of each magic; the homework
asserts its own targets, so nbval fails when they are missed. The root conftest.py gives nbval a
wait for cell output that a busy machine meets and fails any notebook cell that did not run
(skipped, or xfailed after an earlier cell timed out); the last tests run it on tiny notebooks.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
    startup = [w for w in words if w.startswith("--nbval-kernel-startup-timeout=")]
    output = [w for w in words if w.startswith("--nbval-output-timeout=")]
    assert startup and float(startup[0].split("=")[1]) >= 60, "a busy machine starts kernels slowly"
    assert output and float(output[0].split("=")[1]) >= 60, \
        "nbval's own 5 s wait for cell output is too short under load (root conftest.py)"
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


def _run_nbval(tmp_path: Path, cells: list[str], *extra: str, unit_test: str = ""):
    """Run pytest + nbval, with scripts/test.sh's --nbval flags and the root conftest.py, on a
    notebook of ``cells`` (and a ``test_unit.py`` of ``unit_test``) in ``tmp_path``."""
    from nbformat.v4 import new_code_cell, new_notebook

    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not the project's
    nb = new_notebook(cells=[new_code_cell(c) for c in cells],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nbformat.write(nb, str(tmp_path / "tiny.ipynb"))
    args = ["tiny.ipynb"]
    if unit_test:
        (tmp_path / "test_unit.py").write_text(unit_test)
        args.append("test_unit.py")
    flags = [w for w in _test_command()[1] if w.startswith("--nbval")]
    overridden = {e.split("=")[0] for e in extra}
    flags = [w for w in flags if w.split("=")[0] not in overridden] + list(extra)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           *args, *flags], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_notebook_cell_that_did_not_run_fails_the_run(tmp_path):
    # cell 1 is skipped by its marker; cell 2 kills the kernel, so nbval times it out, stops the
    # kernel and marks cell 3 xfail ("Kernel dead on test start") - the homework's failure mode.
    rc, out = _run_nbval(tmp_path, ["x = 1", "# NBVAL_SKIP\nprint(x)", "import os\nos._exit(1)",
                                    "print(x)"],
                         "--nbval-cell-timeout=2", "--nbval-output-timeout=1")
    assert rc == 1, out
    assert re.search(r"^3 failed, 1 passed in ", out, flags=re.M), out
    assert "xfail" not in out.splitlines()[-1] and "skipped" not in out.splitlines()[-1], out
    assert "PASSED tiny.ipynb::Cell 0" in out
    for cell in (1, 2, 3):
        assert f"FAILED tiny.ipynb::Cell {cell}" in out, out
    assert "tiny.ipynb::Cell 1 did not run: nbval skipped" in out, out
    assert "tiny.ipynb::Cell 3 did not run: nbval xfailed" in out, out
    assert "Kernel dead on test start" in out, out
    assert "Failed to interrupt kernel in 1 seconds" in out, \
        "--nbval-output-timeout does not reach nbval's output wait"


def test_a_clean_notebook_passes_and_unit_test_skips_stay_skips(tmp_path):
    unit = "import pytest\n\ndef test_cuda_only():\n    pytest.skip('needs CUDA')\n"
    rc, out = _run_nbval(tmp_path, ["x = 1", "print(x + 1)"], unit_test=unit)
    assert rc == 0, out
    assert re.search(r"^2 passed, 1 skipped in ", out, flags=re.M), out
    assert "SKIPPED [1] test_unit.py" in out and "needs CUDA" in out, out
