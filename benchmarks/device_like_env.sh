#!/usr/bin/env bash
# A CPU stand-in for the GPU machine's Python stack, to find what breaks there before spending device time on it:
# Python 3.12 with torch 2.11.0 (the CUDA build; it runs on a CPU), lightning 2.6.6, torchmetrics 1.9.0, tokenizers
# 0.23.2, huggingface_hub 1.33.0, triton 3.6.0 (the versions the device tool's KINDS.md lists for nvidia-h200), plus
# the wheels of benchmarks/device_wheels.sh, then the project itself (no dependencies resolved: what the GPU machine
# lacks comes from those wheels alone). About 3 GB of downloads the first time.
#
#   bash benchmarks/device_like_env.sh                        # builds /tmp/devenv, runs the test suite in it
#   bash benchmarks/device_like_env.sh SMOKE=1 bash benchmarks/gpu_session.sh    # or any command, with that python
#
# The command runs with PYTHON and PATH pointing at the stand-in's python.
set -eu
cd "$(dirname "$0")/.."
ENV=${DEVENV:-/tmp/devenv}
# A python3.12 on PATH that runs (a pyenv shim may exist without its version selected), else pyenv's own 3.12.
PY312=$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null \
    || ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
[ -n "$PY312" ] || { echo "error: python3.12 not found (the GPU machine runs Python 3.12)"; exit 1; }
if [ ! -x "$ENV/bin/python" ]; then
    "$PY312" -m venv "$ENV"
    "$ENV/bin/pip" install -q torch==2.11.0 lightning==2.6.6 pytorch-lightning==2.6.6 torchmetrics==1.9.0 \
        tokenizers==0.23.2 huggingface_hub==1.33.0 safetensors==0.8.0 triton==3.6.0 tensorboard matplotlib pyarrow \
        pandas fsspec xxhash requests tqdm pyyaml sentencepiece pytest
    ls .whl/*.whl > /dev/null 2>&1 || bash benchmarks/device_wheels.sh
    "$ENV/bin/pip" install -q --no-index --no-deps .whl/*.whl
    "$ENV/bin/pip" install -q --no-deps -e .
fi
export PYTHON="$ENV/bin/python" PATH="$ENV/bin:$PATH"
if [ $# -eq 0 ]; then
    set -- python -m pytest -q -p no:cacheprovider
fi
env "$@"
