#!/usr/bin/env bash
# Stream the training log of one worker, or of all of them (lines prefixed with the worker).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--worker N|all] [--lines N] [--no-follow]

Shows \$HOME/$BIXSE_REMOTE_LOG_DIR/train-worker<N>.log of the chosen workers (written by train.sh),
following it until Ctrl-C unless --no-follow. With --worker=all every line starts with [wN].

  --worker N|all      BIXSE_LOG_WORKER    worker number, list (1,3), range (0-3) or all (default 0)
  --lines N           BIXSE_LOG_LINES     lines of history to show first (default 100)
  --no-follow         BIXSE_LOG_FOLLOW=0  print and exit

$COMMON_USAGE
EOF
}

BIXSE_LOG_WORKER="${BIXSE_LOG_WORKER:-0}"
BIXSE_LOG_LINES="${BIXSE_LOG_LINES:-100}"
BIXSE_LOG_FOLLOW="${BIXSE_LOG_FOLLOW:-1}"

while (($#)); do
  if parse_common_flag "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --worker | --worker=*) opt_value BIXSE_LOG_WORKER "$@"; shift "$OPT_SHIFT" ;;
    --lines | --lines=*) opt_value BIXSE_LOG_LINES "$@"; shift "$OPT_SHIFT" ;;
    --no-follow) BIXSE_LOG_FOLLOW=0; shift ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done
require_common
[[ $BIXSE_LOG_WORKER =~ ^(all|[0-9]+([,-][0-9]+)*)$ ]] ||
  usage_error "--worker wants N, a list 1,3, a range 0-3 or all, got: $BIXSE_LOG_WORKER"
[[ $BIXSE_LOG_LINES =~ ^[0-9]+$ ]] || usage_error "--lines wants a number, got: $BIXSE_LOG_LINES"

follow=""
if [[ $BIXSE_LOG_FOLLOW == 1 ]]; then follow=" -F"; fi
remote="$(worker_id_snippet)
cd $(remote_path "$BIXSE_REMOTE_LOG_DIR") 2>/dev/null || { echo \"[w\$BIXSE_WORKER_ID] no logs yet\" >&2; exit 0; }
tail -q -n $BIXSE_LOG_LINES$follow train-worker\$BIXSE_WORKER_ID.log"
if [[ $BIXSE_LOG_WORKER == *[!0-9]* ]]; then  # several workers: tell their lines apart
  remote+=" | sed -u \"s/^/[w\$BIXSE_WORKER_ID] /\""
fi

run_gcloud compute tpus tpu-vm ssh "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE" "--worker=$BIXSE_LOG_WORKER" "--command=$remote"
