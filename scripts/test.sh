#!/usr/bin/env bash
# The test command (README): install what tests need, then run the unit tests and every notebook
# under nbval in one pytest run. NBCOMPRESS_STRICT=1 turns magic errors into real exceptions, so a
# failing magic fails its notebook cell (a UsageError alone would not fail --nbval-lax).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -e ".[test]"
export NBCOMPRESS_STRICT=1 NBCOMPRESS_DISPLAY=text MPLBACKEND=Agg
python -m pytest -q -rs -p no:cacheprovider --durations=15 tests notebooks \
    --nbval-lax --nbval-current-env --nbval-cell-timeout=600 "$@"
