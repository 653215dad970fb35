#!/usr/bin/env bash
# experiments/reproduce.py on one lent GPU, in one call of the device tool (~10 minutes).
#
# 1. Here, once: .venv/bin/python experiments/prepare_device.py   (writes the git-ignored .repro/)
# 2. Device tool: command "bash experiments/gpu_reproduce.sh", carry [".repro"], timeout_s 570.
#    $OUT receives results.jsonl (one line per run, written as runs finish), selection.json,
#    summary.json, env.txt and log.txt; then, here:
#      .venv/bin/python experiments/make_results.py OUT/results.jsonl --md docs/results.md --png docs/results.png
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bixse_repro}"
mkdir -p "$OUT" /tmp/repro_data
PY="${PY:-python3}"  # the GPU image's python3 holds jax (CUDA), flax, optax, orbax, tokenizers
[ -d .repro/minilm-fp16 ] || { echo "missing .repro: run experiments/prepare_device.py and carry .repro" >&2; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .repro/wheels/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tar xJf .repro/data.tar.xz -C /tmp/repro_data || exit 4
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax, flax, optax, orbax.checkpoint as ocp; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
start=$(date +%s)
"$PY" experiments/reproduce.py --data-root /tmp/repro_data --model .repro/minilm-fp16 --out "$OUT" \
  --workroot /tmp/repro_work --workers "${WORKERS:-8}" --compile-cache /tmp/repro_jax_cache \
  --deadline-s "${DEADLINE_S:-430}" "$@" 2>&1 | tee "$OUT/log.txt" | grep --line-buffered -E '^\[|^learning|^\{|Error|error'
echo "reproduce.py rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
