#!/usr/bin/env bash
# One pass of the checks and figures worth having from an accelerator machine, in order of value:
# golden parity of every backbone (default and highest matmul precision), the retnet tests, then
# decode and training-step figures for llama and retnet side by side, then the server's load test
# (issue 22: the half preset, 1/4/16/64 clients, the codec on the CPU).
#
#   bash benchmarks/accelerator_report.sh [GOLDEN_DIR] [SIZES]      (SIZES: comma list, default half)
#   environment: DECODE_BATCHES (default 1,8,32), MEMORY_SECONDS (default 10,30; "" skips), PYTHON
#
# Each step has its own time limit, so a slow one cannot starve the rest; everything goes to stdout.
set -u
golden=${1:-../shared/golden}
sizes=${2:-half}
export PYTHONUNBUFFERED=1 VALLE_JAX_GOLDEN=$golden
py=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
$py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

for arch in transformer llama retnet; do
  step "parity $arch (default matmul precision)"
  timeout 60 $py -m tools.parity "$golden" --arch "$arch"
  step "parity $arch (highest matmul precision)"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 60 $py -m tools.parity "$golden" --arch "$arch"
done

step "retnet tests"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 $py -m pytest -q -x -p no:cacheprovider tests/test_retnet.py -k "not sharded"  # one device: no mesh of 8

for arch in llama retnet; do
  step "decode $arch $sizes"
  timeout 150 $py benchmarks/decode.py --sizes "$sizes" --arch "$arch" --no-tcmalloc \
    --batches "${DECODE_BATCHES:-1,8,32}" --memory-seconds "${MEMORY_SECONDS-10,30}"
done
for arch in llama retnet; do
  step "train step $arch $sizes"
  timeout 120 $py benchmarks/train_step.py --sizes "$sizes" --arch "$arch" --no-tcmalloc
done
step "serve load half"
timeout 420 $py benchmarks/serve_load.py --sizes half --per-client 2
step done
