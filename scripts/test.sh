#!/usr/bin/env bash
# Set up a fresh virtual environment with the test extra and run the whole test suite (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-test}"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet -e '.[test]'
"$VENV/bin/python" -m pytest -q "$@"
