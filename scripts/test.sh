#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite. CI runs exactly this.
# The tests need the extras the demo does not: pytest + slicer-core + ruff (test), FastAPI + uvicorn
# (serve), huggingface_hub (download). ruff (rules in pyproject.toml) runs first: seconds, not minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,serve,download
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -q "$@"
