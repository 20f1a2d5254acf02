#!/usr/bin/env bash
# What a new user does, in fresh virtualenvs outside the checkout (docs/install.md):
#   1. pip install './[codec,dev]', then every console script's --help;
#   2. pip install . alone, then `import valle_jax` loads no torch.
#   bash tools/check_install.sh [PYTHON]      (default python3; e.g. python3.12)
# Takes minutes: it installs everything. LOCK=1 installs with -c requirements.lock.
set -euo pipefail
PYTHON="${1:-python3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/valle-jax-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
CONSTRAINTS=()
if [ "${LOCK:-0}" = 1 ]; then CONSTRAINTS=(-c "$REPO/requirements.lock"); fi
cd "$WORK"  # outside the checkout: nothing is imported from it
# a user's copy of the tree: the files git tracks, as they are in the working tree (pip builds in the
# source folder, so the checkout itself is left alone)
mkdir src && git -C "$REPO" ls-files -z | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C src
echo "check: $("$PYTHON" --version 2>&1), from $WORK"

"$PYTHON" -m venv full
full/bin/pip install -q "${CONSTRAINTS[@]}" './src[codec,dev]' 2> >(grep -v "^WARNING: Location" >&2)
scripts=(valle-jax)
while IFS= read -r name; do scripts+=("valle-jax-$name"); done < <(full/bin/python -c \
  'from valle_jax.cli import COMMANDS; print("\n".join(COMMANDS))')
failed=0
for script in "${scripts[@]}"; do
  if ! out="$(full/bin/"$script" --help 2>&1)"; then
    echo "check: FAIL $script --help" >&2; echo "$out" | tail -5 >&2; failed=1
  else
    echo "check: ok $script --help ($(echo "$out" | head -1 | cut -c1-70))"
  fi
done
full/bin/python -c 'import valle_jax.codec as c; c.import_encodec(); print("check: ok codec extra imports encodec")'

"$PYTHON" -m venv core
core/bin/pip install -q "${CONSTRAINTS[@]}" ./src 2> >(grep -v "^WARNING: Location" >&2)
core/bin/python -c "import valle_jax, sys; assert 'torch' not in sys.modules"
if core/bin/python -c "import torch" 2>/dev/null; then echo "check: FAIL the core install has torch" >&2; exit 1; fi
core/bin/valle-jax-train --help >/dev/null
echo "check: ok core install: import valle_jax without torch, and torch not installed"
if [ "$failed" = 1 ]; then echo "check: some --help failed (above)" >&2; exit 1; fi
echo "check: all passed ($("$PYTHON" --version 2>&1))"
