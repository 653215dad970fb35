#!/usr/bin/env bash
# Create a Cloud TPU VM (on-demand, spot, reserved, or through a queued resource) and wait until
# it is READY (queued resource: ACTIVE).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator TYPE [options] [-- EXTRA_GCLOUD_FLAGS...]

Creates the TPU VM NAME and waits until it is READY. Without --queued: gcloud compute tpus tpu-vm
create (on-demand, or --spot / --reserved). With --queued: gcloud compute tpus queued-resources
create ID --node-id=NAME (add --spot or --reserved), then waits until the request is ACTIVE.
Arguments after -- go to the gcloud create command as they are (e.g. --network=..., --labels=...).

  --accelerator TYPE   BIXSE_ACCELERATOR       v4-32, v5litepod-64, v5p-128, v6e-64, ...  [required]
  --version VERSION    BIXSE_RUNTIME_VERSION   TPU software version (default from the type:
                                               v4/v3/v2: tpu-ubuntu2204-base, v5litepod: v2-alpha-tpuv5-lite,
                                               v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot               BIXSE_SPOT=1            spot capacity (preemptible; pair with babysit.sh)
  --reserved           BIXSE_RESERVED=1        your reserved capacity
  --valid-until D      BIXSE_VALID_UNTIL       queued only: give up queueing after D (e.g. 6h)
  --timeout SECONDS    BIXSE_CREATE_TIMEOUT    wait at most this long for READY/ACTIVE (default 3600)
  --poll SECONDS       BIXSE_POLL_INTERVAL     seconds between state checks (default 30)
  --no-wait            BIXSE_NO_WAIT=1         return right after the create request

$COMMON_USAGE
EOF
}

BIXSE_ACCELERATOR="${BIXSE_ACCELERATOR:-}"
BIXSE_RUNTIME_VERSION="${BIXSE_RUNTIME_VERSION:-}"
BIXSE_SPOT="${BIXSE_SPOT:-0}"
BIXSE_RESERVED="${BIXSE_RESERVED:-0}"
BIXSE_VALID_UNTIL="${BIXSE_VALID_UNTIL:-}"
BIXSE_CREATE_TIMEOUT="${BIXSE_CREATE_TIMEOUT:-3600}"
BIXSE_POLL_INTERVAL="${BIXSE_POLL_INTERVAL:-30}"
BIXSE_NO_WAIT="${BIXSE_NO_WAIT:-0}"
EXTRA=()

while (($#)); do
  if parse_common_flag "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --accelerator | --accelerator=*) opt_value BIXSE_ACCELERATOR "$@"; shift "$OPT_SHIFT" ;;
    --version | --version=*) opt_value BIXSE_RUNTIME_VERSION "$@"; shift "$OPT_SHIFT" ;;
    --valid-until | --valid-until=*) opt_value BIXSE_VALID_UNTIL "$@"; shift "$OPT_SHIFT" ;;
    --timeout | --timeout=*) opt_value BIXSE_CREATE_TIMEOUT "$@"; shift "$OPT_SHIFT" ;;
    --poll | --poll=*) opt_value BIXSE_POLL_INTERVAL "$@"; shift "$OPT_SHIFT" ;;
    --spot) BIXSE_SPOT=1; shift ;;
    --reserved) BIXSE_RESERVED=1; shift ;;
    --no-wait) BIXSE_NO_WAIT=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done

require_common
require BIXSE_ACCELERATOR --accelerator
if [[ $BIXSE_SPOT == 1 && $BIXSE_RESERVED == 1 ]]; then
  usage_error "--spot and --reserved exclude each other"
fi
if [[ -n $BIXSE_VALID_UNTIL && $BIXSE_QUEUED != 1 ]]; then
  usage_error "--valid-until needs --queued"
fi
[[ $BIXSE_CREATE_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "--timeout must be whole seconds, got $BIXSE_CREATE_TIMEOUT"
[[ $BIXSE_POLL_INTERVAL =~ ^[0-9]+$ ]] || usage_error "--poll must be whole seconds, got $BIXSE_POLL_INTERVAL"

if [[ -z $BIXSE_RUNTIME_VERSION ]]; then
  case "$BIXSE_ACCELERATOR" in
    v5litepod-* | v5e-*) BIXSE_RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) BIXSE_RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) BIXSE_RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) BIXSE_RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime version for accelerator $BIXSE_ACCELERATOR: pass --version or set BIXSE_RUNTIME_VERSION" ;;
  esac
fi

capacity=()
if [[ $BIXSE_SPOT == 1 ]]; then capacity=(--spot); fi
if [[ $BIXSE_RESERVED == 1 ]]; then capacity=(--reserved); fi

if [[ $BIXSE_QUEUED == 1 ]]; then
  cmd=(compute tpus queued-resources create "$BIXSE_QR_ID" "--node-id=$BIXSE_TPU_NAME"
    "--zone=$BIXSE_ZONE" "--accelerator-type=$BIXSE_ACCELERATOR"
    "--runtime-version=$BIXSE_RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"})
  if [[ -n $BIXSE_VALID_UNTIL ]]; then cmd+=("--valid-until-duration=$BIXSE_VALID_UNTIL"); fi
  ready_word=ACTIVE
else
  cmd=(compute tpus tpu-vm create "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE"
    "--accelerator-type=$BIXSE_ACCELERATOR" "--version=$BIXSE_RUNTIME_VERSION" ${capacity[@]+"${capacity[@]}"})
  ready_word=READY
fi
run_gcloud "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

if [[ $BIXSE_NO_WAIT == 1 ]]; then exit 0; fi
if is_dry_run; then
  describe_argv
  printf '+ %s   # repeated every %ss until %s, for at most %ss\n' \
    "$(quote_args "${GCLOUD_ARGV[@]}")" "$BIXSE_POLL_INTERVAL" "$ready_word" "$BIXSE_CREATE_TIMEOUT" >&2
  exit 0
fi

deadline=$((SECONDS + BIXSE_CREATE_TIMEOUT))
while true; do
  state="$(resource_state)"
  case "$(state_class "$state")" in
    ready) log "$BIXSE_TPU_NAME is $state"; exit 0 ;;
    broken) die "$BIXSE_TPU_NAME is $state while waiting for $ready_word (delete it with delete.sh and retry)" ;;
  esac
  if ((SECONDS >= deadline)); then
    die "$BIXSE_TPU_NAME still $state after ${BIXSE_CREATE_TIMEOUT}s (--timeout); it was not deleted"
  fi
  log "$BIXSE_TPU_NAME is $state; next check in ${BIXSE_POLL_INTERVAL}s"
  sleep "$BIXSE_POLL_INTERVAL"
done
