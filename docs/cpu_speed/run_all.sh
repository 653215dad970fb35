#!/usr/bin/env bash
# The measurements of docs/benchmarks.md's "CPU at the bf16 rate" section, in one go, on an idle
# machine: peer comparison, step breakdown before/after, encoding, the regime step, a loss curve.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-docs/cpu_speed}
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
$PY benchmarks/cpu_vs_peer.py --models smollm2-135m,minilm-l6,bert-base --rounds 2 --out $OUT/cpu_vs_peer.jsonl
for mm in none bfloat16; do
  $PY benchmarks/step_breakdown.py --model smollm2-135m --batch 32 --matmul-dtype $mm --repeats 2 | tee -a $OUT/step_breakdown.jsonl
done
$PY benchmarks/encode_cpu.py --modes bixse-f32,bixse-bf16-matmul,st-f32,st-bf16 --subset 512 | tee $OUT/encode_cpu.json
# The paper regime's step: configs/paper/smollm2.py:stsb, 128 pairs by gradient caching, evaluators off.
rm -rf /tmp/regime_step
/usr/bin/time -v $PY -m bixse_jax.cli train --config configs/paper/smollm2.py:stsb --workdir /tmp/regime_step \
  --config.data_dir=../shared/data/stsbenchmark --config.train.num_steps=4 --config.train.checkpoint_every=0 \
  --config.evals.test.kind=none --config.loss.init_logit_params=fixed 2> $OUT/regime_step.stderr
cp /tmp/regime_step/metrics.jsonl $OUT/regime_step.metrics.jsonl
# A short real run, float32 against the bf16 default: the loss curves (MiniLM, STS-B, 60 steps of 32).
for mm in float32 auto; do
  rm -rf /tmp/curve_$mm
  $PY -m bixse_jax.cli train --config configs/paper/minilm.py:stsb --workdir /tmp/curve_$mm \
    --config.data_dir=../shared/data/stsbenchmark --config.train.num_steps=60 --config.train.log_every=1 \
    --config.train.checkpoint_every=0 --config.evals.test.before_training=False --config.model.matmul_dtype=$mm \
    > $OUT/curve_$mm.stdout 2> $OUT/curve_$mm.stderr
  cp /tmp/curve_$mm/metrics.jsonl $OUT/curve_$mm.metrics.jsonl
done
echo done
