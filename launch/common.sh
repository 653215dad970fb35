# shellcheck shell=bash disable=SC2034  # the variables set here are used by the sourcing scripts
# Shared helpers for the Cloud TPU VM launch scripts (sourced, not run).
#
# Every setting is an environment variable BIXSE_*; each script's flags only set those variables,
# so babysit.sh can hand its settings to create/install/train.sh by exporting them. Every gcloud
# call goes through `run` (printed first; only printed under --dry-run) or, for read-only state
# queries that babysit.sh branches on, through `query` (printed, then run).

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="$(basename "$0")"

# Settings shared by all scripts (flag -> variable in parse_common_flag below).
BIXSE_TPU_NAME="${BIXSE_TPU_NAME:-}"
BIXSE_ZONE="${BIXSE_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
BIXSE_PROJECT="${BIXSE_PROJECT:-}"              # empty: gcloud's configured core/project
BIXSE_QUEUED="${BIXSE_QUEUED:-0}"               # 1: the TPU is owned by a queued resource
BIXSE_QR_ID="${BIXSE_QR_ID:-}"                  # default: ${BIXSE_TPU_NAME}-qr
BIXSE_DRY_RUN="${BIXSE_DRY_RUN:-0}"
BIXSE_GCLOUD="${BIXSE_GCLOUD:-gcloud}"
# Where things live on every worker; relative paths are under the worker's $HOME.
BIXSE_REMOTE_DIR="${BIXSE_REMOTE_DIR:-bixse-jax}"
BIXSE_REMOTE_VENV="${BIXSE_REMOTE_VENV:-bixse-venv}"
BIXSE_REMOTE_LOG_DIR="${BIXSE_REMOTE_LOG_DIR:-bixse-logs}"

COMMON_USAGE="Common flags (or environment variables):
  --name NAME         BIXSE_TPU_NAME   TPU VM name (the queued resource's node id)   [required]
  --zone ZONE         BIXSE_ZONE       e.g. us-central2-b (default: \$CLOUDSDK_COMPUTE_ZONE) [required]
  --project PROJECT   BIXSE_PROJECT    default: gcloud's configured project
  --queued            BIXSE_QUEUED=1   the TPU belongs to a queued resource
  --qr-id ID          BIXSE_QR_ID      queued resource id (default: NAME-qr)
  --dry-run           BIXSE_DRY_RUN=1  print the gcloud commands, run none
  -h, --help"

log() { printf '[%s] %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }
usage_error() { log "error: $*"; printf 'Run %s --help for usage.\n' "$PROG" >&2; exit 2; }

# Shell-quote each argument only where needed, so printed commands can be pasted back; a
# multi-line --flag=VALUE (the remote scripts) is shown as a here-document, readable as it is.
quote_args() {
  local out="" a nl=$'\n'
  for a in "$@"; do
    if [[ $a == --*=*$nl* && $a != *"${nl}BIXSE_REMOTE"* ]]; then
      out+="${a%%=*}=\"\$(cat <<'BIXSE_REMOTE'$nl${a#*=}${nl}BIXSE_REMOTE$nl)\" "
    elif [[ -n $a && $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$a "
    else
      out+="'${a//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# Always single-quotes (for values spliced into remote shell commands).
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# A remote path as shell text: relative paths are under the worker's $HOME.
remote_path() {
  # shellcheck disable=SC2016  # $HOME is for the worker's shell to expand
  if [[ $1 == /* ]]; then q "$1"; else printf '"$HOME"/%s' "$(q "$1")"; fi
}

is_dry_run() { [[ $BIXSE_DRY_RUN == 1 ]]; }

# run CMD...: print, then run unless --dry-run.
run() {
  printf '+ %s\n' "$(quote_args "$@")" >&2
  is_dry_run || "$@"
}

# gcloud ARGS...: the gcloud binary with --project appended when set.
gcloud_cmd() {
  GCLOUD_ARGV=("$BIXSE_GCLOUD" "$@")
  if [[ -n $BIXSE_PROJECT ]]; then GCLOUD_ARGV+=("--project=$BIXSE_PROJECT"); fi
}
run_gcloud() { gcloud_cmd "$@"; run "${GCLOUD_ARGV[@]}"; }

# opt_value VAR "$@": store the value of "--flag=value" or "--flag value"; sets OPT_SHIFT.
opt_value() {
  local var=$1 flag=$2
  if [[ $flag == *=* ]]; then
    printf -v "$var" '%s' "${flag#*=}"; OPT_SHIFT=1
  elif (($# >= 3)); then
    printf -v "$var" '%s' "$3"; OPT_SHIFT=2
  else
    usage_error "$flag needs a value"
  fi
}

# parse_common_flag "$@": handle one common flag (returns 1 if $1 is not one); sets OPT_SHIFT.
parse_common_flag() {
  case "$1" in
    --name | --name=*) opt_value BIXSE_TPU_NAME "$@" ;;
    --zone | --zone=*) opt_value BIXSE_ZONE "$@" ;;
    --project | --project=*) opt_value BIXSE_PROJECT "$@" ;;
    --qr-id | --qr-id=*) opt_value BIXSE_QR_ID "$@" ;;
    --queued) BIXSE_QUEUED=1; OPT_SHIFT=1 ;;
    --dry-run) BIXSE_DRY_RUN=1; OPT_SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# require VAR FLAG: stop with a message naming the setting when VAR is empty.
require() {
  local var=$1 flag=$2
  if [[ -z ${!var} ]]; then
    usage_error "missing setting ${flag#--}: pass $flag or set $var"
  fi
}

require_common() {
  local var
  require BIXSE_TPU_NAME --name
  require BIXSE_ZONE --zone
  BIXSE_QR_ID="${BIXSE_QR_ID:-${BIXSE_TPU_NAME}-qr}"
  # install.sh runs `rm -rf` on the remote folder: refuse anything but a plain named folder.
  for var in BIXSE_REMOTE_DIR BIXSE_REMOTE_VENV BIXSE_REMOTE_LOG_DIR; do
    if [[ ! ${!var} =~ ^/?[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ ]]; then
      usage_error "$var must name a folder (letters, digits, _ . -, relative to the worker's \$HOME or absolute), got: '${!var}'"
    fi
  done
}

require_gs_workdir() {
  require BIXSE_WORKDIR --workdir
  if [[ $BIXSE_WORKDIR != gs://?* ]]; then
    usage_error "workdir must be a gs:// path that every worker shares, got: $BIXSE_WORKDIR (--workdir / BIXSE_WORKDIR)"
  fi
}

export_settings() {
  export BIXSE_TPU_NAME BIXSE_ZONE BIXSE_PROJECT BIXSE_QUEUED BIXSE_QR_ID BIXSE_DRY_RUN BIXSE_GCLOUD \
    BIXSE_REMOTE_DIR BIXSE_REMOTE_VENV BIXSE_REMOTE_LOG_DIR
}

# The gcloud describe command for the node (or its queued resource), printing only the state.
describe_argv() {
  if [[ $BIXSE_QUEUED == 1 ]]; then
    gcloud_cmd compute tpus queued-resources describe "$BIXSE_QR_ID" "--zone=$BIXSE_ZONE" '--format=value(state.state)'
  else
    gcloud_cmd compute tpus tpu-vm describe "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE" '--format=value(state)'
  fi
}

# resource_state: prints the node's state (queued resource's with --queued), MISSING when gcloud
# says it does not exist, UNKNOWN when describe fails otherwise (API hiccup: do nothing drastic).
resource_state() {
  local out err rc=0
  describe_argv
  printf '+ %s\n' "$(quote_args "${GCLOUD_ARGV[@]}")" >&2
  err="$(mktemp)"
  out="$("${GCLOUD_ARGV[@]}" 2>"$err")" || rc=$?
  if ((rc == 0)); then
    out="${out//[[:space:]]/}"
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qiE 'not[_ ]found' "$err"; then
    echo MISSING
  else
    sed 's/^/  gcloud: /' "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

# state_class STATE: ready | wait | broken | unknown (node states and queued-resource states).
state_class() {
  case "$1" in
    READY | ACTIVE) echo ready ;;
    CREATING | STARTING | RESTARTING | REIMAGING | REPAIRING | UNHIDING | DELETING | ACCEPTED | \
      PROVISIONING | WAITING_FOR_RESOURCES) echo wait ;;
    PREEMPTED | TERMINATED | STOPPED | STOPPING | HIDING | HIDDEN | FAILED | SUSPENDED | \
      SUSPENDING | MISSING) echo broken ;;
    *) echo unknown ;;
  esac
}

# The shell line, run on a worker, that sets BIXSE_WORKER_ID from the TPU VM metadata server
# (fallback: the -w-N suffix of the worker's hostname).
worker_id_snippet() {
  cat <<'EOF'
BIXSE_WORKER_ID="$(curl -sf -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname | sed -n 's/.*-w-\([0-9][0-9]*\)$/\1/p')"
[ -n "$BIXSE_WORKER_ID" ] || { echo "cannot tell this worker's number" >&2; exit 1; }
export BIXSE_WORKER_ID
EOF
}

# Shell function for workers: is PID running (zombies, which some containers never reap, are not)?
alive_snippet() {
  cat <<'EOF2'
alive() { s="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1; case "$s" in Z*) return 1 ;; esac; }
EOF2
}

# Exit codes of health_remote on a worker (gcloud ssh --worker=all exits with the first worker's
# non-zero code): 0 training runs, 3 not running, 4 bixse-jax not installed; 255 is ssh's own.
HEALTH_NOT_RUNNING=3
HEALTH_NOT_INSTALLED=4
health_remote() {
  local venv log_dir
  venv="$(remote_path "$BIXSE_REMOTE_VENV")"
  log_dir="$(remote_path "$BIXSE_REMOTE_LOG_DIR")"
  alive_snippet
  cat <<EOF2
[ -x $venv/bin/bixse-jax ] || exit $HEALTH_NOT_INSTALLED
pid="\$(cat $log_dir/train.pid 2>/dev/null)" || exit $HEALTH_NOT_RUNNING
alive "\$pid" || exit $HEALTH_NOT_RUNNING
EOF2
}
