#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it has no network): jsonargparse, datasets and torchao with the
# packages of theirs it does not have either, for its Python 3.12 on x86_64, into the git-ignored .whl/ that a device
# call carries. Its stack (torch 2.11, lightning 2.6.6, numpy, pyarrow, fsspec, huggingface_hub, ...) stays as it is;
# torchao 0.16 is the release known to load on its torch 2.11.
#
#   bash benchmarks/device_wheels.sh          # then name .whl in the device call's carry
set -eu
cd "$(dirname "$0")/.."
grep -qx /.whl/ .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.whl/ >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    jsonargparse docstring-parser typeshed-client datasets dill multiprocess torchao==0.16.0
ls .whl
