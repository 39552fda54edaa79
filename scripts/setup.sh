#!/usr/bin/env bash
# Idempotent setup: the Fashion-MNIST files, a virtualenv at .venv with torch from this machine's wheel
# store, and pupil with its dependencies. Each step is skipped when its result is already there, so a
# second call takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist' or pass --data-dir" >&2
  fi
fi

# Headless Chromium renders the HTML report in the report tests.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing chromium (Debian) for the report tests"
  apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
PY=.venv/bin/python
# find_spec looks the packages up without importing torch (which takes seconds).
if ! $PY -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('torchvision')))"; then
  echo "setup: installing torch 2.14.1 and torchvision 0.29.1"
  $PY -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
STAMP=.venv/.pupil-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing pupil and its dependencies"
  $PY -m pip install -q --disable-pip-version-check -e ".[all,dev]"
  touch "$STAMP"
fi
