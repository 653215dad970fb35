#!/usr/bin/env bash
# Delete the TPU VM, or with --queued its queued resource together with the node (--force).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [--queued [--qr-id ID]]

Deletes without asking (--quiet). The gs:// workdir is untouched: a new VM resumes from it.

$COMMON_USAGE
EOF
}

while (($#)); do
  if parse_common_flag "$@"; then shift "$OPT_SHIFT"; continue; fi
  usage_error "unknown argument: $1"
done
require_common

if [[ $BIXSE_QUEUED == 1 ]]; then
  run_gcloud compute tpus queued-resources delete "$BIXSE_QR_ID" "--zone=$BIXSE_ZONE" --quiet --force
else
  run_gcloud compute tpus tpu-vm delete "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE" --quiet
fi
