#!/usr/bin/env bash
# Train-step throughput on one GPU: bixse-jax's targets, then the peer sentence-transformers script,
# in one process tree on the same card, within ~8 minutes. See docs/benchmarks.md.
#
# 1. Here, on the development machine, once (copies the peer script, fetches the one wheel the
#    GPU image lacks; both folders are git-ignored):
#        bash benchmarks/gpu_suite.sh --prepare
# 2. On the GPU machine (the device tool: command "bash benchmarks/gpu_suite.sh",
#    carry [".bench", ".whl"], timeout_s 600). Everything lands in $OUT:
#        ours.jsonl     one JSON line per bixse-jax setting (train_throughput.py)
#        ours.log       its stderr
#        peer.log       the peer script's output (JSON lines), peer_st.json its summary
#        env.txt        GPU, driver, versions
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  mkdir -p .bench .whl
  cp -f ../shared/bench/peer_st_bench.py .bench/
  # ml_collections is the only dependency of bixse_jax.train missing from the GPU image (pure Python).
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
  ls -l .bench .whl
  exit 0
fi

OUT="${OUT:-/tmp/bixse_gpu_suite}"
mkdir -p "$OUT"
OURS_S="${OURS_S:-290}"   # our settings' budget; the rest are skipped (recorded as such)
PEER_S="${PEER_S:-200}"   # its recorded H200 step times add up to ~2 minutes, plus start-up
PY="${PY:-python3}"       # the GPU image's python3 holds jax, flax, optax, orbax and torch
OURS_ARGS="${OURS_ARGS:---suite gpu}"  # smoke test on a CPU: PY=.venv/bin/python OURS_ARGS=--quick

for f in .bench/peer_st_bench.py .whl/ml_collections-*.whl; do
  [ -e "$f" ] || { echo "missing $f: run 'bash benchmarks/gpu_suite.sh --prepare' first and carry .bench and .whl" >&2; exit 2; }
done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # as much of the card as torch may take

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  "$PY" -c "import torch, sentence_transformers as st, transformers as t; print('torch', torch.__version__, 'sentence-transformers', st.__version__, 'transformers', t.__version__)"
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== bixse-jax (budget ${OURS_S}s)"
start=$(date +%s)
timeout $((OURS_S + 30)) "$PY" benchmarks/train_throughput.py $OURS_ARGS --deadline-s "$OURS_S" \
  --out "$OUT/ours.jsonl" 2> "$OUT/ours.log"
echo "bixse-jax rc=$? in $(( $(date +%s) - start ))s"

echo "== peer sentence-transformers (limit ${PEER_S}s)"
start=$(date +%s)
OUT="$OUT" timeout "$PEER_S" "$PY" .bench/peer_st_bench.py > "$OUT/peer.log" 2>&1
echo "peer rc=$? in $(( $(date +%s) - start ))s"
grep -E '^\{|^torch|^sentence|^total' "$OUT/peer.log"
exit 0
