#!/usr/bin/env bash
# Tokenize, here, the offline corpus for the GPU reproduction: ../shared/data/docs-corpus.txt.xz (Linux kernel and
# Python documentation, 5,624 documents, 38.5 M characters) into pre-tokenized shards with the 130m model's 32000-token
# byte-level BPE, in the git-ignored .data/docs-32k/ (~20 MB, shards + tokenizer + manifest) that a device call
# carries. On the GPU, `fit` then reads memmapped token ids: no BPE training and no tokenizing in device time, and
# no `datasets`/pyarrow on the training path there.
#
#   bash benchmarks/device_data.sh [CORPUS.txt.xz]   # then carry .data/docs-32k and stack on every arm:
#   --config configs/data/shards.yaml --data.init_args.shard_dir .data/docs-32k
set -eu
cd "$(dirname "$0")/.."
corpus=${1:-../shared/data/docs-corpus.txt.xz}
out=.data/docs-32k
python=${PYTHON:-.venv/bin/python}
[ -f "$corpus" ] || { echo "error: corpus $corpus: no such file" >&2; exit 2; }
mkdir -p .data
# Documents are separated by a line holding only <|doc|>; one JSON object per document for the local-files reader
# (kept: the manifest names it as the shards' source, and configs/data/local-files.yaml can read it too).
jsonl=.data/docs-corpus.jsonl
xz -dc "$corpus" | "$python" -c "
import json, sys
for doc in sys.stdin.read().split('\n<|doc|>\n'):
    if doc.strip():
        print(json.dumps({'text': doc.strip()}))" > "$jsonl.tmp" && mv "$jsonl.tmp" "$jsonl"
# The corpus is ordered by topic (kernel, then Python docs): the held-out share is drawn by a seeded hash of each
# document's position, so validation covers both. 2% of 5,624 documents: ~110 documents, ~0.2 M tokens.
"$python" -m dqt_lightning prepare --config configs/fp.yaml --config configs/model/130m.yaml \
    --config configs/data/shards.yaml --data.init_args.source.path "$jsonl" \
    --data.init_args.source.val_fraction 0.02 --data.init_args.shard_dir "$out"
du -sh "$out" && ls "$out"
