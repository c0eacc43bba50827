# Sourced by the device-call scripts (gpu_session.sh, gpu_reproduce.sh), with $PYTHON and $OUT set.
# 1. Install the wheels the call carried in .whl (benchmarks/device_wheels.sh made them: jsonargparse, datasets,
#    torchao, ..., which the GPU machine lacks) under /tmp/site, and put them and this checkout on PYTHONPATH.
#    Where $PYTHON imports all three already (this project's .venv, say), or without .whl, nothing is installed.
# 2. Write $OUT/env.txt: date, GPU, torch and the versions the wheels meet there, commit.
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 && ! $PYTHON -c "import jsonargparse, datasets, torchao" 2>/dev/null
then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: installing the carried wheels under .whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; git log -1 --oneline
  # The versions the carried wheels meet there (datasets needs a recent pyarrow, fsspec and huggingface_hub).
  $PYTHON -c "from importlib import metadata as m
for p in 'lightning torchmetrics triton torchao jsonargparse datasets pyarrow fsspec huggingface_hub tokenizers'.split():
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'missing')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
