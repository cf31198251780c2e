#!/usr/bin/env bash
# The MoE measurements the CPU sessions left for a GPU, in one device call (each under its own
# timeout, the most wanted first), logs in OUT_DIR:
#
#     source bench/gpu_setup.sh; bash bench/moe_gpu_round.sh OUT_DIR COMMIT
#
# 1. bench/moe_speed.py at d8 after the load has evened (--warmup 40: steps 41-50; the default
#    --warmup 4 times steps 5-14, the most uneven), the weight gradient whole and in 4 pieces, and the
#    routing's old torch.topk: sets moe.WGRAD_PIECES and times top_k_indices and the one-hot counts.
# 2. Two 40 s d8 MoE runs, balancing bias rate 1e-3 (DeepSeek-V3's, the default but from 62b04e7 to
#    e1e9cdb) and 1e-2, each step's load in its metrics; bench/moe_load_table.py over both.
# Run once, at 96a6456 (bench/results/*-h200-96a6456*): it set WGRAD_PIECES = 4.
# About 4 + 2 x 2 minutes: a 10-minute call holds it, with the timeouts below.
set -uo pipefail
out=${1:?usage: bash bench/moe_gpu_round.sh OUT_DIR COMMIT}
commit=${2:?usage: bash bench/moe_gpu_round.sh OUT_DIR COMMIT}
export LLMLABS_COMMIT=$commit PYTHONPATH=. PYTHONUNBUFFERED=1
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')
data=/tmp/moe_round_data  # pystdlib: seconds to prepare (a GPU run without --data would prepare pysrc)
[ -f $data/manifest.json ] || python3 -m llmlabs prepare pystdlib --out $data > "$out/prepare.log" 2>&1

timeout "${SPEED_TIMEOUT:-300}" python3 bench/moe_speed.py --depths 8 --warmup 40 --pieces 0,4 --torch-topk --data $data \
    --out "$out/moe_speed_balanced-$gpu-$commit.jsonl" > "$out/moe_speed_balanced-$gpu-$commit.log" 2>&1
echo "moe_speed exit $?"
for rate in 0.001 0.01; do
    timeout "${RUN_TIMEOUT:-130}" python3 -m llmlabs train --data $data --moe-experts 8 --moe-top-k 2 --moe-shared 1 \
        --moe-bias-rate $rate --time-budget 40 --eval-split none --run-dir "/tmp/moe40_$rate" \
        > "$out/moe_d8_40s_rate$rate-$gpu-$commit.log" 2>&1
    echo "40 s run at rate $rate exit $?"
    cp "/tmp/moe40_$rate/metrics.jsonl" "$out/moe_d8_40s_rate$rate-$gpu-$commit-metrics.jsonl" 2>/dev/null
done
python3 bench/moe_load_table.py /tmp/moe40_0.001 /tmp/moe40_0.01 --out "$out/moe_d8_40s_load-$gpu-$commit.md"
tail -8 "$out/moe_speed_balanced-$gpu-$commit.log"
