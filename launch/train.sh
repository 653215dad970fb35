#!/usr/bin/env bash
# Start `bixse-jax train ... --jax_distributed` on every worker of a TPU VM, detached (setsid +
# nohup) so the ssh session can end, each worker logging to its own file.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config configs/X.py --workdir gs://BUCKET/RUN
           [--config.KEY=VALUE ...] [--env KEY=VALUE ...] [options] [-- MORE_TRAIN_ARGS...]

Runs on every worker (--worker=all), in \$HOME/$BIXSE_REMOTE_DIR:
  bixse-jax train --config CONFIG --workdir WORKDIR [overrides] --jax_distributed
detached, with BIXSE_WORKER_ID (the worker's number), TPU_NAME and BIXSE_WORKDIR exported, output
appended to \$HOME/$BIXSE_REMOTE_LOG_DIR/train-worker<N>.log and the process id in train.pid there.
A run resumes from the newest checkpoint in WORKDIR, so starting again after a stop is safe.

  --config FILE         BIXSE_CONFIG        config file, relative to the repository    [required]
  --workdir gs://...    BIXSE_WORKDIR       run folder shared by all workers            [required]
  --config.KEY=VALUE                        config override, passed on as it is (repeatable)
  --env KEY=VALUE                           extra environment on every worker (repeatable),
                                            e.g. --env LIBTPU_INIT_ARGS='--xla_tpu_...'
  --pre COMMAND         BIXSE_PRE_TRAIN     shell command run first on each worker (e.g. fetch data)
  --force               BIXSE_FORCE=1       stop a training that is still running first
                                            (otherwise its worker refuses with exit code 5)
  BIXSE_OVERRIDES       whitespace-separated overrides added before the flags' ones

$COMMON_USAGE
EOF
}

BIXSE_CONFIG="${BIXSE_CONFIG:-}"
BIXSE_WORKDIR="${BIXSE_WORKDIR:-}"
BIXSE_PRE_TRAIN="${BIXSE_PRE_TRAIN:-}"
BIXSE_FORCE="${BIXSE_FORCE:-0}"
set -f  # split BIXSE_OVERRIDES on whitespace (its documented format), expand no globs
# shellcheck disable=SC2206
OVERRIDES=(${BIXSE_OVERRIDES:-})
set +f
ENVS=()
kv=""

while (($#)); do
  if parse_common_flag "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --config | --config=*) opt_value BIXSE_CONFIG "$@"; shift "$OPT_SHIFT" ;;
    --workdir | --workdir=*) opt_value BIXSE_WORKDIR "$@"; shift "$OPT_SHIFT" ;;
    --pre | --pre=*) opt_value BIXSE_PRE_TRAIN "$@"; shift "$OPT_SHIFT" ;;
    --env | --env=*) opt_value kv "$@"; shift "$OPT_SHIFT"; ENVS+=("$kv") ;;
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --config.*) usage_error "override $1 needs =VALUE (--config.KEY=VALUE)" ;;
    --force) BIXSE_FORCE=1; shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done
require_common
require BIXSE_CONFIG --config
require_gs_workdir
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants KEY=VALUE, got: $kv"
done

train_argv=(train --config "$BIXSE_CONFIG" --workdir "$BIXSE_WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --jax_distributed)
train_words=" $(quote_args "${train_argv[@]}")"
log_dir="$(remote_path "$BIXSE_REMOTE_LOG_DIR")"
venv="$(remote_path "$BIXSE_REMOTE_VENV")"

remote="set -e
$(worker_id_snippet)
$(alive_snippet)
export TPU_NAME=$(q "$BIXSE_TPU_NAME") BIXSE_WORKDIR=$(q "$BIXSE_WORKDIR")"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  remote+="
export ${kv%%=*}=$(q "${kv#*=}")"
done
remote+="
mkdir -p $log_dir
log=$log_dir/train-worker\$BIXSE_WORKER_ID.log
pidfile=$log_dir/train.pid
if [ -f \"\$pidfile\" ] && alive \"\$(cat \"\$pidfile\")\"; then"
if [[ $BIXSE_FORCE == 1 ]]; then
  remote+="
  pid=\"\$(cat \"\$pidfile\")\"
  echo \"worker \$BIXSE_WORKER_ID: stopping training pid \$pid\" >&2
  kill -TERM -- \"-\$pid\" 2>/dev/null || kill -TERM \"\$pid\" 2>/dev/null || true
  i=0; while alive \"\$pid\" && [ \$i -lt 60 ]; do sleep 1; i=\$((i + 1)); done
  kill -KILL -- \"-\$pid\" 2>/dev/null || kill -KILL \"\$pid\" 2>/dev/null || true"
else
  remote+="
  echo \"worker \$BIXSE_WORKER_ID: training already running (pid \$(cat \"\$pidfile\")); pass --force to restart it\" >&2
  exit 5"
fi
remote+="
fi
cd $(remote_path "$BIXSE_REMOTE_DIR")"
if [[ -n $BIXSE_PRE_TRAIN ]]; then
  remote+="
$BIXSE_PRE_TRAIN"
fi
remote+="
printf '=== %s worker %s: %s\\n' \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"\$BIXSE_WORKER_ID\" $(q "bixse-jax$train_words") >>\"\$log\"
setsid nohup $venv/bin/bixse-jax$train_words >>\"\$log\" 2>&1 </dev/null &
echo \$! >\"\$pidfile\"
echo \"worker \$BIXSE_WORKER_ID: training started, pid \$!, log \$log\""

run_gcloud compute tpus tpu-vm ssh "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE" --worker=all "--command=$remote"
