#!/usr/bin/env bash
# `make lock`: refresh requirements/lock.txt. Builds a fresh venv (.venv-latest) with the NEWEST
# releases of every dependency (LOCK=none), runs the whole test suite there, and only if it
# passes rewrites the lock from that venv. `make test-latest` is the same without the rewrite:
# it shows whether a new release breaks the package before the lock moves to it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-latest}
rm -rf "$VENV"
VENV="$VENV" LOCK=none bash scripts/setup.sh
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile
if [ "${WRITE_LOCK:-1}" = 1 ]; then
  "$VENV/bin/python" scripts/freeze_lock.py "$VENV/bin/python"
  git --no-pager diff --stat -- requirements/lock.txt || true
fi
