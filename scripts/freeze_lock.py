"""Write requirements/lock.txt from a venv's installed packages (``pip freeze --all``, the
editable energy-train left out): ``python scripts/freeze_lock.py VENV_PYTHON``. Used by
scripts/lock.sh after the tests passed there."""
import subprocess
import sys
from pathlib import Path

HEADER = """\
# The versions CI tests with: every package `make setup` resolves on a CPU machine (Python 3.11,
# Linux x86-64), as pip constraints, pip/setuptools/wheel included (the editable install builds
# without isolation, with these). scripts/setup.sh installs with `-c requirements/lock.txt`, so
# a fresh machine next month gets what CI tested today. Refresh: `make lock` (scripts/lock.sh:
# a fresh venv with the NEWEST releases, the whole test suite there, then this file rewritten
# from that venv). The GPU path (system torch, no registry) does not read it.
"""


def main(python: str) -> None:
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    pins = sorted((line for line in out.splitlines()
                   if "==" in line and not line.startswith(("#", "-e", "energy-train", "energy_train"))),
                  key=str.lower)
    path = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
    path.write_text(HEADER + "\n".join(pins) + "\n")
    print(f"wrote {path} ({len(pins)} pins)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else sys.executable)
