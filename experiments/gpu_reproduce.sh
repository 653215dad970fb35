#!/usr/bin/env bash
# experiments/reproduce.py on one lent GPU, in one call of the device tool (~10 minutes).
#
# The MiniLM table (docs/results.md):
# 1. Here, once: .venv/bin/python experiments/prepare_device.py   (writes the git-ignored .repro/)
# 2. Device tool: command "bash experiments/gpu_reproduce.sh", carry [".repro"], timeout_s 570.
#    $OUT receives results.jsonl (one line per run, written as runs finish), selection.json,
#    summary.json, env.txt and log.txt; then, here:
#      .venv/bin/python experiments/make_results.py OUT/results.jsonl --md docs/results.md --png docs/results.png
#
# The paper's regime (configs/paper/smollm2.py, issue 16): its GGUF file needs two calls.
# 1. Here: .venv/bin/python experiments/prepare_device.py --paper smollm2
# 2. Device tool, call A: command "true", carry [".repro_smollm2_a"] (the model's first half stays
#    on the machine while it is warm: make call B at once, within its idle release)
# 3. Call B: command "PAPER=smollm2 bash experiments/gpu_reproduce.sh --datasets stsb --per-loss-lr",
#    carry [".repro"], timeout_s 570. Arguments after the script go to reproduce.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bixse_repro}"
PAPER="${PAPER:-minilm}"
mkdir -p "$OUT" /tmp/repro_data
PY="${PY:-python3}"  # the GPU image's python3 holds jax (CUDA), flax, optax, orbax, tokenizers
[ -d .repro/wheels ] || { echo "missing .repro: run experiments/prepare_device.py and carry .repro" >&2; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .repro/wheels/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tar xJf .repro/data.tar.xz -C /tmp/repro_data || exit 4
if [ "$PAPER" = smollm2 ]; then
  [ -f .repro_smollm2_a/part ] || { echo "the model's first half is not here: make call A (carry .repro_smollm2_a) first, then this call at once" >&2; exit 5; }
  MODEL=/tmp/repro_model/$(awk '{print $2}' .repro/smollm2.sha256)
  mkdir -p /tmp/repro_model && cat .repro_smollm2_a/part .repro/smollm2.part_b > "$MODEL"
  (cd /tmp/repro_model && sha256sum -c "$OLDPWD/.repro/smollm2.sha256") || exit 6
  # Converted to a float32 folder once here, not by 8 workers at once (gguf_io caches it).
  "$PY" -c "import pathlib, sys; from bixse_jax.models import gguf_io; print(gguf_io.resolve(pathlib.Path(sys.argv[1])))" "$MODEL" || exit 7
else
  MODEL=.repro/minilm-fp16
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax, flax, optax, orbax.checkpoint as ocp; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
start=$(date +%s)
"$PY" experiments/reproduce.py --paper "$PAPER" --data-root /tmp/repro_data --model "$MODEL" --out "$OUT" \
  --workroot /tmp/repro_work --workers "${WORKERS:-8}" --compile-cache /tmp/repro_jax_cache \
  --deadline-s "${DEADLINE_S:-430}" "$@" 2>&1 | tee "$OUT/log.txt" | grep --line-buffered -E '^\[|^learning|^\{|Error|error'
echo "reproduce.py rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
