#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md from an H100/H200, as one device call (run it with timeout_s 600): each stage
# under its own time limit (80 + 200 + 90 + 150 + 60 s, 9.7 minutes at most), its log and tables written under $OUT as it
# goes (six files: a call brings back eight at most), so a stage that runs out of time costs only itself. A
# session is lent 15 minutes of device time in all, start-up included; see docs/results.md, "On a GPU".
#
#   bash benchmarks/gpu_session.sh               # on the GPU machine (carry .whl, see below)
#   SMOKE=1 bash benchmarks/gpu_session.sh       # the same stages at tiny sizes, to check the script on a CPU
#   STAGES="update bench134m" bash benchmarks/gpu_session.sh    # some stages only
#
# The GPU machine lacks jsonargparse, datasets and torchao: download their wheels here first (bash
# benchmarks/device_wheels.sh, into the git-ignored .whl/), and name .whl in the call's carry; this script installs
# them when present (benchmarks/device_env.sh). `bash benchmarks/device_like_env.sh SMOKE=1 bash
# benchmarks/gpu_session.sh` tries it, here, on a stand-in of the GPU machine's Python stack (torch 2.11).
set -u
OUT=${OUT:-/tmp/gpu-session}
SMOKE=${SMOKE:-0}
STAGES=${STAGES:-"update bench134m memory1b lean7b fp8"}
PYTHON=${PYTHON:-python3}
. benchmarks/device_env.sh  # the carried wheels; $OUT/env.txt

# stage NAME SECONDS COMMAND...: runs COMMAND with its output appended to $OUT/stages.log (one log for all stages:
# a call brings back eight files at most), stopped after SECONDS.
stage() {
    local name=$1 limit=$2
    shift 2
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local log="$OUT/stages.log" first
    touch "$log"
    first=$(($(wc -l < "$log") + 1))
    echo "== $name (at most ${limit}s): $*" | tee -a "$log"
    local started=$SECONDS
    timeout "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started))s" | tee -a "$log"
    tail -n +"$first" "$log" | grep -E '^\||^error|^bench: ' | tail -n 30
}

if [ "$SMOKE" = 1 ]; then
    SIZE=(--size tiny --vocab-size 512 --batch-size 2 --seq-len 64 --steps 1 --warmup 1)
    BIG=(--size tiny --vocab-size 512 --batch-size 1 --seq-len 64 --steps 1 --warmup 1)
    SHAPES=(64x64 64x192)
    SEVEN=(--size tiny --vocab-size 512 --batch-size 1 --seq-len 64 --steps 1 --warmup 1)
    FIT_STEPS=2
else
    # The published peer shapes: LLaMA 134M, vocab 32000, batch 8 x 2048; LLaMA 1.36B at batch 1 x 2048.
    SIZE=(--size 130m --vocab-size 32000 --batch-size 8 --seq-len 2048 --steps 5 --warmup 2)
    BIG=(--size 1b --vocab-size 32000 --batch-size 1 --seq-len 2048 --steps 3 --warmup 2)
    SHAPES=(768x768 768x2048 2048x5632)
    # LLaMA-7B at the published 7B memory figures' sequence 256 and micro-batch 1.
    SEVEN=(--size 7b --vocab-size 32000 --batch-size 1 --seq-len 256 --steps 2 --warmup 1)
    FIT_STEPS=30
fi

# 1. One layer's update: the fused kernel as Triton against the usual path.
stage update 80 $PYTHON -m dqt_lightning.tools.updatebench --shapes "${SHAPES[@]}"
# 2. The throughput targets at 134M, torchao's recipes beside ours. Recipes in the order of what the targets
#    need, since a stage stopped at its limit keeps only the recipes done (bench rewrites its --out file after each).
stage bench134m 200 $PYTHON -m dqt_lightning bench "${SIZE[@]}" --precision bf16-mixed --recipes fp dqt-8-fused \
    dqt-1.58-fused ste torchao-int8 dqt-8 dqt-1.58 dqt-1.58-fused-int8mm dqt-8-fused-int8mm dqt-1.58-lean-fused \
    torchao-bitnet --out "$OUT/bench134m.md" --plot "$OUT/bench134m.png"
# 3. The memory targets at 1.36B: peak against the bf16 baseline, bytes per quantized parameter.
stage memory1b 90 $PYTHON -m dqt_lightning bench "${BIG[@]}" --precision bf16-mixed --recipes fp \
    dqt-1.58-lean-fused dqt-8-fused dqt-1.58-fused --out "$OUT/memory1b.md"
# 4. The 7B lean steps beside the published 7B allocator peaks at sequence 256, batch 1 (GaLore 8-bit 22.7 GB,
#    Q-GaLore 15.1 GB, APOLLO-Mini "within 11 GB"): configs/recipes/lean.yaml and lean-factored.yaml, as bench recipes.
stage lean7b 150 $PYTHON -m dqt_lightning bench "${SEVEN[@]}" --precision bf16-mixed --recipes \
    dqt-1.58-lean-fused-ckpt dqt-1.58-packed-inbwd-factored-ckpt --out "$OUT/lean7b.md"
# 5. The fp8 overlay's first run on FP8 hardware: a few steps of the tiny model in each mode (on a CPU, and on a GPU
#    older than compute capability 8.9, each must stop at once with one error line instead).
fp8_runs() {
    local config
    for config in fp ternary bitnet; do
        $PYTHON -m dqt_lightning fit --config configs/$config.yaml --config configs/precision/fp8.yaml \
            --trainer.max_steps $FIT_STEPS --trainer.val_check_interval $FIT_STEPS --trainer.limit_val_batches 2 \
            --trainer.default_root_dir "/tmp/fp8-runs/$config-$$" --trainer.logger false
        echo "== fp8 $config: exit $?"
    done
}
export -f fp8_runs
export PYTHON FIT_STEPS
stage fp8 60 bash -c fp8_runs
ls -la "$OUT"
