"""pytest hooks for the notebooks under nbval. They act on nbval's cell items only (tests/ is
untouched). This file sits at the project root, not in notebooks/: conftest.py files outside a
package all import as module ``conftest`` and the last one loaded owns that name; tests/ does
``from conftest import ...``, and pytest loads a root conftest before tests/conftest.py, whatever
the order of the paths on the command line.

1. A longer wait for a cell's output. nbval 0.11 (``IPyNbCell.__init__``) hard-codes
   ``self.output_timeout = 5``: once the kernel has replied on the shell channel (that wait *is*
   ``--nbval-cell-timeout``), nbval reads the cell's output and the closing ``idle`` status from the
   IOPub channel with a 5-second timeout per message (and again 5 s in ``await_idle`` after an
   error). Those messages go through the kernel's IOPub thread; on a busy 2-core machine, after a
   cell that printed a lot (the homework's training progress bars), that thread can be starved for
   longer than 5 s, and nbval then reports "Timeout of 5 seconds exceeded waiting for output",
   *stops the kernel* and marks every later cell of the notebook xfail. nbval has no option for
   this wait (``--nbval-kernel-startup-timeout`` covers only the kernel start), so
   ``--nbval-output-timeout`` (default 120 s) sets it on each cell item here. It only bounds how
   long nbval waits for messages that do come; a cell that hangs is still stopped by
   ``--nbval-cell-timeout``.

2. A notebook passes only if every cell ran and passed. After a timed-out cell nbval marks the
   rest of the notebook xfail, so those cells were reported "xfailed" and the run showed a single
   failure while most of the notebook went untested; a cell tagged NBVAL_SKIP/nbval-skip would
   be "skipped" silently. Here any notebook cell that ends skipped or xfailed is reported as a
   failure naming the notebook and cell (the notebooks are a product; every cell must run).
   Only nbval cell items are touched: skips in tests/ (CUDA-only tests on CPU) stay skips.
"""
from __future__ import annotations

import pytest

try:
    from nbval.plugin import IPyNbCell
except ImportError:  # nbval not installed: no notebook items, nothing to do
    IPyNbCell = None

OUTPUT_TIMEOUT_S = 120.0


def _is_notebook_cell(item) -> bool:
    return IPyNbCell is not None and isinstance(item, IPyNbCell)


def pytest_addoption(parser):
    parser.getgroup("nbval").addoption(
        "--nbval-output-timeout", action="store", type=float, default=OUTPUT_TIMEOUT_S,
        help="seconds nbval waits for each output message of a cell after the kernel replied "
             "(nbval hard-codes 5; see the root conftest.py). Default %(default)s.")


def pytest_runtest_setup(item):
    if _is_notebook_cell(item):
        # getoption's default: in case this file was loaded too late to add the option
        item.output_timeout = item.config.getoption("nbval_output_timeout", OUTPUT_TIMEOUT_S)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    # tryfirst makes this the outermost wrapper: the code after ``yield`` sees the report after
    # _pytest.skipping has turned an xfail-marked failure into "skipped" with ``wasxfail``.
    outcome = yield
    report = outcome.get_result()
    if not _is_notebook_cell(item) or not report.skipped:
        return
    name = f"{item.fspath.basename}::Cell {item.cell_num}"
    if hasattr(report, "wasxfail"):
        why = f"xfailed ({report.wasxfail or 'marked xfail'}; see the earlier failing cell)"
        if call.excinfo is not None:
            why += f": {call.excinfo.typename}: {call.excinfo.value}"
        del report.wasxfail
    else:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
        why = f"skipped ({reason})"
    report.outcome = "failed"
    report.longrepr = (f"{name} did not run: nbval {why}. Every cell of a notebook must run "
                       f"and pass (the root conftest.py).")
