#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. CI runs exactly this.
# The tests need the extras the demo does not: pytest + slicer-core (test), FastAPI + uvicorn
# (serve), huggingface_hub (download).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,serve,download
exec .venv/bin/python -m pytest -q "$@"
