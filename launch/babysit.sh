#!/usr/bin/env bash
# Keep a (spot / queued) TPU training run going until it finishes: recreate the TPU when it is
# preempted, missing or failed, reinstall, and restart training, which resumes from the newest
# checkpoint in the gs:// workdir. Stops when the run's end marker exists.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator TYPE --config configs/X.py --workdir gs://...
           [create/install/train options] [--config.KEY=VALUE ...] [options]

Every round: stop (exit 0) if the done marker exists; else describe the TPU (with --queued: its
queued resource) and
  READY/ACTIVE, training running on all workers  -> nothing
  READY/ACTIVE, bixse-jax not installed          -> install.sh, then train.sh
  READY/ACTIVE, training not running on a worker -> train.sh --force (all workers restart)
  CREATING, PROVISIONING, WAITING_FOR_RESOURCES  -> wait
  PREEMPTED, SUSPENDED, FAILED, TERMINATED, ...  -> delete.sh, then create.sh (next rounds install
                                                     and train on the new TPU)
  not found                                      -> create.sh
then sleeps. Restarting is safe: training resumes from the newest checkpoint in the workdir.

  --interval SECONDS   BIXSE_BABYSIT_INTERVAL  sleep between rounds (default 60)
  --max-restarts N     BIXSE_MAX_RESTARTS      give up (exit 1) after N restarts: deletions of a
                                               broken TPU plus relaunches of a training that died
                                               (default 20; the first start is free)
  --max-failures N     BIXSE_MAX_FAILURES      give up after N failed rounds in a row (describe
                                               error, ssh unreachable, a failing create/install/
                                               train; default 10)
  --done-marker URL    BIXSE_DONE_MARKER       default WORKDIR/summary.jsonl, written when a
                                               run ends (remove it, or pick another, to extend a
                                               finished run)
  --delete-when-done   BIXSE_DELETE_WHEN_DONE=1  delete the TPU once the marker exists
Passed on to create.sh: --accelerator, --version, --spot, --reserved, --valid-until
Passed on to install.sh: --ref, --repo, --with-minilm, --jax-spec, --python
Passed on to train.sh: --config, --workdir, --config.KEY=VALUE, --env KEY=VALUE, --pre, -- ARGS

$COMMON_USAGE
EOF
}

BIXSE_BABYSIT_INTERVAL="${BIXSE_BABYSIT_INTERVAL:-60}"
BIXSE_MAX_RESTARTS="${BIXSE_MAX_RESTARTS:-20}"
BIXSE_MAX_FAILURES="${BIXSE_MAX_FAILURES:-10}"
BIXSE_DONE_MARKER="${BIXSE_DONE_MARKER:-}"
BIXSE_DELETE_WHEN_DONE="${BIXSE_DELETE_WHEN_DONE:-0}"
BIXSE_WORKDIR="${BIXSE_WORKDIR:-}"
BIXSE_CONFIG="${BIXSE_CONFIG:-}"
BIXSE_ACCELERATOR="${BIXSE_ACCELERATOR:-}"
TRAIN_ARGS=()
kv=""

while (($#)); do
  if parse_common_flag "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --interval | --interval=*) opt_value BIXSE_BABYSIT_INTERVAL "$@"; shift "$OPT_SHIFT" ;;
    --max-restarts | --max-restarts=*) opt_value BIXSE_MAX_RESTARTS "$@"; shift "$OPT_SHIFT" ;;
    --max-failures | --max-failures=*) opt_value BIXSE_MAX_FAILURES "$@"; shift "$OPT_SHIFT" ;;
    --done-marker | --done-marker=*) opt_value BIXSE_DONE_MARKER "$@"; shift "$OPT_SHIFT" ;;
    --delete-when-done) BIXSE_DELETE_WHEN_DONE=1; shift ;;
    # create.sh
    --accelerator | --accelerator=*) opt_value BIXSE_ACCELERATOR "$@"; shift "$OPT_SHIFT"; export BIXSE_ACCELERATOR ;;
    --version | --version=*) opt_value BIXSE_RUNTIME_VERSION "$@"; shift "$OPT_SHIFT"; export BIXSE_RUNTIME_VERSION ;;
    --valid-until | --valid-until=*) opt_value BIXSE_VALID_UNTIL "$@"; shift "$OPT_SHIFT"; export BIXSE_VALID_UNTIL ;;
    --spot) export BIXSE_SPOT=1; shift ;;
    --reserved) export BIXSE_RESERVED=1; shift ;;
    # install.sh
    --ref | --ref=*) opt_value BIXSE_REF "$@"; shift "$OPT_SHIFT"; export BIXSE_REF ;;
    --repo | --repo=*) opt_value BIXSE_REPO_DIR "$@"; shift "$OPT_SHIFT"; export BIXSE_REPO_DIR ;;
    --jax-spec | --jax-spec=*) opt_value BIXSE_JAX_SPEC "$@"; shift "$OPT_SHIFT"; export BIXSE_JAX_SPEC ;;
    --python | --python=*) opt_value BIXSE_PYTHON_VERSION "$@"; shift "$OPT_SHIFT"; export BIXSE_PYTHON_VERSION ;;
    --with-minilm) export BIXSE_WITH_MINILM=1; shift ;;
    # train.sh
    --config | --config=*) opt_value BIXSE_CONFIG "$@"; shift "$OPT_SHIFT" ;;
    --workdir | --workdir=*) opt_value BIXSE_WORKDIR "$@"; shift "$OPT_SHIFT" ;;
    --pre | --pre=*) opt_value BIXSE_PRE_TRAIN "$@"; shift "$OPT_SHIFT"; export BIXSE_PRE_TRAIN ;;
    --env | --env=*) opt_value kv "$@"; shift "$OPT_SHIFT"; TRAIN_ARGS+=(--env "$kv") ;;
    --config.*) TRAIN_ARGS+=("$1"); shift ;;
    --) TRAIN_ARGS+=("$@"); break ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done
require_common
require BIXSE_ACCELERATOR --accelerator
require BIXSE_CONFIG --config
require_gs_workdir
for n in BIXSE_BABYSIT_INTERVAL BIXSE_MAX_RESTARTS BIXSE_MAX_FAILURES; do
  [[ ${!n} =~ ^[0-9]+$ ]] || usage_error "$n must be a whole number, got: ${!n}"
done
BIXSE_DONE_MARKER="${BIXSE_DONE_MARKER:-${BIXSE_WORKDIR%/}/summary.jsonl}"
export_settings
export BIXSE_CONFIG BIXSE_WORKDIR BIXSE_ACCELERATOR

marker_argv() { gcloud_cmd storage ls "$BIXSE_DONE_MARKER"; }
health_argv() {
  gcloud_cmd compute tpus tpu-vm ssh "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE" --worker=all \
    "--command=$(health_remote)"
}

if is_dry_run; then
  for f in marker_argv describe_argv health_argv; do
    "$f"
    printf '+ %s\n' "$(quote_args "${GCLOUD_ARGV[@]}")" >&2
  done
  log "each round runs the checks above; depending on the answers it runs:"
  bash "$LAUNCH_DIR/delete.sh"
  bash "$LAUNCH_DIR/create.sh" --no-wait
  bash "$LAUNCH_DIR/install.sh"
  bash "$LAUNCH_DIR/train.sh" --force ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
  exit 0
fi

finish() {
  log "done: $BIXSE_DONE_MARKER exists (restarts: $restarts)"
  if [[ $BIXSE_DELETE_WHEN_DONE == 1 ]]; then bash "$LAUNCH_DIR/delete.sh"; fi
  exit 0
}

marker_exists() {
  marker_argv
  printf '+ %s\n' "$(quote_args "${GCLOUD_ARGV[@]}")" >&2
  "${GCLOUD_ARGV[@]}" >/dev/null 2>&1
}

restarts=0
failures=0
fresh=1  # the next training start is part of the action that made this TPU (not a restart)

count_restart() {
  restarts=$((restarts + 1))
  if ((restarts > BIXSE_MAX_RESTARTS)); then
    die "giving up: $1 would be restart $restarts, more than --max-restarts=$BIXSE_MAX_RESTARTS"
  fi
  log "restart $restarts of at most $BIXSE_MAX_RESTARTS: $1"
}

failed() {
  failures=$((failures + 1))
  log "$1 (failure $failures in a row, at most $BIXSE_MAX_FAILURES)"
  if ((failures >= BIXSE_MAX_FAILURES)); then die "giving up after $failures failed rounds in a row"; fi
}

start_training() {
  if ((fresh)); then fresh=0; else count_restart "training stopped on a worker; relaunching it"; fi
  if bash "$LAUNCH_DIR/train.sh" --force ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; then
    failures=0
  else
    failed "train.sh failed"
  fi
}

while true; do
  if marker_exists; then finish; fi
  state="$(resource_state)"
  case "$(state_class "$state")" in
    ready)
      health_argv
      printf '+ %s\n' "$(quote_args "${GCLOUD_ARGV[@]}")" >&2
      rc=0
      health_err="$("${GCLOUD_ARGV[@]}" 2>&1 >/dev/null)" || rc=$?
      case $rc in
        0) failures=0; log "$BIXSE_TPU_NAME is $state and training runs on every worker" ;;
        "$HEALTH_NOT_INSTALLED")
          log "$BIXSE_TPU_NAME is $state without bixse-jax: installing"
          if bash "$LAUNCH_DIR/install.sh"; then start_training; else failed "install.sh failed"; fi ;;
        "$HEALTH_NOT_RUNNING")
          if marker_exists; then finish; fi
          start_training ;;
        *)
          printf '%s\n' "$health_err" | tail -n 5 | sed 's/^/  gcloud: /' >&2
          failed "$BIXSE_TPU_NAME is $state but ssh to its workers failed (exit $rc)" ;;
      esac
      ;;
    wait)
      failures=0
      log "$BIXSE_TPU_NAME is $state: waiting"
      ;;
    broken)
      if [[ $state != MISSING ]]; then
        count_restart "$BIXSE_TPU_NAME is $state: deleting and recreating it"
        bash "$LAUNCH_DIR/delete.sh" || log "delete.sh failed; trying to create anyway"
      else
        log "$BIXSE_TPU_NAME does not exist: creating it"
      fi
      fresh=1
      if bash "$LAUNCH_DIR/create.sh" --no-wait; then failures=0; else failed "create.sh failed"; fi
      ;;
    *)
      failed "$BIXSE_TPU_NAME state unknown ($state)"
      ;;
  esac
  sleep "$BIXSE_BABYSIT_INTERVAL"
done
