#!/usr/bin/env bash
# The test command (README): install what tests need (the test extra: pytest, nbval, transformers
# and timm; torch + torchvision are pinned before, see .ci/run), then run the unit tests and every
# notebook under nbval in one pytest run. NBCOMPRESS_STRICT=1 turns magic errors into real
# exceptions, so a failing magic fails its notebook cell (a UsageError alone would not fail
# --nbval-lax).
# Timeouts sized for a busy 2-core machine: the kernel start (nbval's default 60 s) and the wait
# for each output message of a cell (nbval hard-codes 5 s; --nbval-output-timeout is ours, from
# the root conftest.py, which also fails any notebook cell that ends skipped or xfailed).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -e ".[test]"
python -c "import torch; print('torch', torch.__version__)"
export NBCOMPRESS_STRICT=1 NBCOMPRESS_DISPLAY=text MPLBACKEND=Agg
python -m pytest -q -rs -p no:cacheprovider --durations=15 tests notebooks \
    --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
    --nbval-kernel-startup-timeout=120 --nbval-output-timeout=120 "$@"
