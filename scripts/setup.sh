#!/usr/bin/env bash
# Make the project's virtual environment in $VENV (default .venv) and install the package.
#  - Where the system python3 already has a CUDA build of torch (a GPU machine, possibly with
#    no package registry), the venv sees the system packages and uses that torch and triton.
#  - Elsewhere it installs the CPU build of torch 2.13.0 (a local wheel where one is on disk,
#    e.g. via PIP_FIND_LINKS), triton and the package with its dev extras, every version pinned
#    by the committed lock requirements/lock.txt (what CI tested). LOCK=none installs the newest
#    releases instead (scripts/lock.sh: the lock's refresh).
#  - PINS=FILE: constraints that replace the lock's versions of the packages they name (the
#    rest stays locked): `make setup-oft` builds .venv-oft with requirements/oft-pins.txt,
#    OpenVLA-OFT's own transformers / peft / tokenizers.
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=${LOCK:-requirements/lock.txt}
PINS=${PINS:-}
cd "$(dirname "$0")/.."

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: CUDA torch found in $("$PY" -c 'import torch; print(torch.__version__)'); reusing it"
  # --without-pip: no ensurepip needed (a distribution python may lack it); pip comes from $PY.
  "$PY" -m venv --without-pip --system-site-packages "$VENV"
  # --system-site-packages reaches the BASE interpreter's packages; where $PY is itself a venv
  # (the GPU image's python3 is /opt/torch/.venv/bin/python3) torch and pip live in $PY's own
  # site-packages, so list those in a .pth file of the new venv.
  "$PY" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_system_python.pth"
  # The GPU image has no registry: install the package alone, from here, without an index;
  # its dependencies come from the system.
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VENV/bin/python" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || "$VENV/bin/python" -m pip install -q --no-deps -e .
  # headers for the C++ runtime (CMakeLists.txt); without them its tests are skipped
  "$VENV/bin/python" -m pip install -q --timeout 5 --retries 0 "nlohmann-json>=3.11" 2>/dev/null \
    || echo "setup: nlohmann-json not installed (no registry?): the C++ runtime will not build"
  if [ -n "$PINS" ]; then  # the pinned stack over the system's, where a registry answers
    "$VENV/bin/python" -m pip install -q --timeout 5 --retries 0 -c "$PINS" transformers peft \
      tokenizers huggingface-hub 2>/dev/null \
      || echo "setup: $PINS not installed (no registry?): $VENV has the system's transformers and peft"
  fi
else
  "$PY" -m venv "$VENV"
  if [ "$LOCK" = none ]; then
    C=()
    echo "setup: LOCK=none: the newest releases (not what CI tested)"
  else
    C=(-c "$LOCK")
  fi
  if [ -n "$PINS" ]; then
    # the lock without the packages PINS names (names compared as pip normalises them), + PINS
    "$PY" - "$LOCK" "$PINS" "$VENV/constraints.txt" <<'PYEOF'
import re, sys
lock, pins, out = sys.argv[1:]
def name(line):
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0])
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None
pinned = [l for l in open(pins).read().splitlines() if name(l)]
names = {name(l) for l in pinned}
kept = [] if lock == "none" else [l for l in open(lock).read().splitlines()
                                  if name(l) and name(l) not in names]
open(out, "w").write("\n".join(kept + pinned) + "\n")
PYEOF
    C=(-c "$VENV/constraints.txt")
    echo "setup: $PINS replaces the lock's versions of: $(grep -oE '^[A-Za-z0-9._-]+' "$PINS" | tr '\n' ' ')"
  fi
  "$VENV/bin/python" -m pip install -q "${C[@]}" --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q "${C[@]}" "torch==2.13.0" "triton==3.6.0"
  # no build isolation: the build uses the venv's (locked) setuptools, not whatever is newest
  "$VENV/bin/python" -m pip install -q "${C[@]}" --no-build-isolation -e ".[dev]"
fi
"$VENV/bin/python" -c "import energy_train, torch; print('setup: energy_train', energy_train.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
