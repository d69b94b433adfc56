# Sourced by the scripts: DATA (../shared/data where it exists, else ./data) and the virtual environment .venv with
# the library installed. Run from the repository root.
if [ -z "${DATA:-}" ]; then
    if [ -d ../shared/data ]; then DATA=../shared/data; else DATA=data; fi
fi
if [ ! -d .venv ]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet -e .
