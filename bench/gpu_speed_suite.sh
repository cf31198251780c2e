#!/usr/bin/env bash
# The speed measurements of bench/NOTES.md on one GPU, in stages sized for a lent machine's
# 10-minute calls (a cold inductor cache costs ~80 s of compile per model size):
#
#     bash bench/gpu_speed_suite.sh STAGE [OUT_DIR]      (repo root; OUT_DIR default bench/results)
#
#   check    the GPU tests (pytest -k "cuda or compile or gpu") and bench/gpu_check_attention.py:
#            every backend's outputs and gradients against float64, fullgraph compile    (~4 min)
#   d8       bench/attention_speed.py at the d8 shapes, then bench/train_speed.py --profile at d8;
#            with BASE=DIR BASE_COMMIT=SHA also the same run from an older tree in DIR,
#            e.g. one made by `git worktree add .base SHA`                                (~2-4 min)
#   sizes    bench/train_speed.py at d12 and d20                                         (~5 min)
#   train    prepare pysrc, then the 5-minute d8 `llmlabs train` and its summary block    (~7 min)
#
# Every record gets the date, device, commit and exact command: train_speed.py and
# attention_speed.py write them into their JSON lines, the logs here start with a header.
# COMMIT=<sha> names the commit where the tree has no .git (a lent machine gets a copy). Data is
# prepared on first use, which needs rustbpe (carry its wheel to a machine without it). The window
# layers run on cuDNN only where cudnn-frontend imports (pip install nvidia-cudnn-frontend, or carry
# its wheel); without it they run on flex, and the numbers are not those of bench/NOTES.md round 3.
set -euo pipefail
stage=${1:?usage: bash bench/gpu_speed_suite.sh check|d8|sizes|train [OUT_DIR]}
[[ $stage =~ ^(check|d8|sizes|train)$ ]] || { echo "unknown stage $stage: use check, d8, sizes or train" >&2; exit 2; }
mkdir -p "${2:-bench/results}"
out=$(cd "${2:-bench/results}" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LLMLABS_COMMIT=${COMMIT:-${LLMLABS_COMMIT:-}}
device=$(python3 -c "import sys, torch
torch.cuda.is_available() or sys.exit('bench/gpu_speed_suite.sh measures a CUDA GPU: torch sees none here')
print(torch.cuda.get_device_name().replace(' ', '-'))")
commit=${LLMLABS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
header() { echo "# $(date +%F) | ${device} | torch $(python3 -c 'import torch; print(torch.__version__)') | commit ${commit}"; echo "# command: $*"; }

case $stage in
check)
    tests=(tests/test_attention.py tests/test_model.py tests/test_data_loader.py tests/test_train.py)
    failed=0  # run both checks, then fail if either did
    { header python3 -m pytest -q -rs -k "cuda or compile or gpu" "${tests[@]}"
      python3 -m pytest -q -rs -k "cuda or compile or gpu" "${tests[@]}"; } 2>&1 | tee "$out/pytest_gpu-$device.log" \
        || failed=1
    { header python3 bench/gpu_check_attention.py; python3 bench/gpu_check_attention.py; } 2>&1 \
        | tee "$out/gpu_check_attention-$device.log" || failed=1
    exit $failed
    ;;
d8)
    python3 bench/attention_speed.py --out "$out/attention_speed-$device.jsonl"
    python3 bench/train_speed.py --profile --steps 15 --out "$out/train_speed-$device.jsonl" 2>&1 \
        | tee "$out/train_speed_profile_d8-$device.log"
    if [[ -n ${BASE:-} ]]; then  # the same run from an older tree, for the before/after in NOTES.md
        (cd "$BASE" && LLMLABS_COMMIT=${BASE_COMMIT:?BASE_COMMIT: the commit checked out in BASE} PYTHONPATH=. \
            python3 bench/train_speed.py --profile --steps 15 --out "$out/train_speed-$device.jsonl") 2>&1 \
            | tee "$out/train_speed_profile_d8_base-$device.log"
    fi
    ;;
sizes)
    python3 bench/train_speed.py --depth 12 --warmup 3 --steps 8 --out "$out/train_speed-$device.jsonl"
    python3 bench/train_speed.py --depth 20 --warmup 2 --steps 3 --out "$out/train_speed-$device.jsonl"
    ;;
train)
    export LLMLABS_HOME=${LLMLABS_HOME:-/tmp/llmlabs}
    run=${RUN_DIR:-/tmp/run_d8}
    { header python3 -m llmlabs prepare pysrc; python3 -m llmlabs prepare pysrc
      header python3 -m llmlabs train --data "$LLMLABS_HOME/data/pysrc-v8192" --run-dir "$run"
      python3 -m llmlabs train --data "$LLMLABS_HOME/data/pysrc-v8192" --run-dir "$run"; } 2>&1 \
        | tee "$out/train_d8_pysrc-$device.log"
    cp "$run/loss.png" "$out/train_d8_pysrc-$device-loss.png"
    ;;
esac
