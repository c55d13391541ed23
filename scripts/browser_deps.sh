#!/usr/bin/env bash
# What the browser test (tests/test_browser.py) needs, installed into the active environment:
# Debian's chromium from apt, and the Python side, JupyterLab and Playwright's driver. The
# browser is the system one, started through executable_path: never `playwright install`.
# JupyterLab's ipywidgets front end comes with the jupyterlab_widgets pip package (no network at
# run time). Safe to run twice; called by .ci/run before scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
pip install -q -e ".[browser]"
chromium --version 2>/dev/null | head -n 1
python -c "import jupyterlab, playwright.sync_api; print('jupyterlab', jupyterlab.__version__)"
