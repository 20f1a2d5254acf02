#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and checks the system packages.
#   bash tools/setup_env.sh [VENV_DIR]      (Makefile targets call this)
# Python 3.11 to 3.13: $PYTHON if set, else the first of python3.11, python3.12, python3.13, python3.
# Packages: the dev extra (codec, eval, test tools) at the exact versions of requirements.lock.
set -euo pipefail
VENV="${1:-.venv}"
LOCK="requirements.lock"
SUPPORTED='import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$SUPPORTED" 2>/dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "$SUPPORTED" 2>/dev/null; then
  echo "setup: Python 3.11 to 3.13 is required ($PYTHON is $("$PYTHON" --version 2>&1 || echo missing));" \
       "set PYTHON=/path/to/python3.12 (or 3.11, 3.13)" >&2
  exit 1
fi

# espeak-ng: the phonemizer backend and the demo/test speech source (a Debian package)
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing espeak-ng (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null
  else
    echo "setup: espeak-ng is missing. Install it, then rerun:  sudo apt-get install -y espeak-ng" >&2
    exit 1
  fi
fi

# Chromium (a Debian package): the web UI's browser test drives it with Playwright (no browser download);
# without it that test skips and says so
if ! [ -x /usr/lib/chromium/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (apt-get, for the web UI's browser test)"
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ||
     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) ||
      echo "setup: could not install chromium; the browser test will skip" >&2
  else
    echo "setup: optional: sudo apt-get install -y chromium (the web UI's browser test)" >&2
  fi
fi

# TCMalloc (optional, a Debian package): training re-executes itself with it preloaded, which keeps
# XLA's CPU buffers paged in between steps (several times faster memory-bound ops; valle_jax/runtime.py)
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing libtcmalloc-minimal4 (apt-get)"
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 ||
     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null)) ||
      echo "setup: could not install libtcmalloc-minimal4; training works without it, slower on CPU" >&2
  else
    echo "setup: optional: sudo apt-get install -y libtcmalloc-minimal4 (faster CPU training)" >&2
  fi
fi

if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c "$SUPPORTED" 2>/dev/null; then
  echo "setup: $VENV has an unsupported Python ($("$VENV/bin/python" --version 2>&1)); remove it and rerun" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
# The lock pins every package (torch==2.13.0: on the project's machines the local CPU wheel; see
# docs/install.md for other machines). It was made on Python 3.11; on 3.12/3.13 the same pins apply.
# pip's registry-location warnings are noise here; real errors still fail the command.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$LOCK" -e ".[dev]" \
  2> >(grep -v "^WARNING: Location" >&2)
# encodec imports torchaudio, whose PyPI build cannot load beside torch+cpu: valle_jax.codec
# installs a stand-in for it at import time, so nothing is patched in the venv. Check it works:
"$VENV/bin/python" -c "from valle_jax.codec import import_encodec; import_encodec()" 2>/dev/null
echo "setup: $VENV ready"
