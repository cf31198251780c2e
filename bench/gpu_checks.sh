#!/usr/bin/env bash
# Three GPU measurements in one device call (each under its own timeout), logs in OUT_DIR:
#
#     source bench/gpu_setup.sh; bash bench/gpu_checks.sh OUT_DIR COMMIT
#
# 1. torchrun at one rank on NCCL: the distributed optimizer's collectives on a GPU, and the volume it
#    prints (for this job and for 8 ranks); a d8 run of 20 steps, eager.
# 2. bench/moe_speed.py --depths 8,12: MoE (8 routed top-2 + 1 shared) against dense tokens/s.
# 3. bench/engine_speed.py --depth 12 --batches 1,32: generation tokens/s with the KV cache.
set -uo pipefail
out=${1:?usage: bash bench/gpu_checks.sh OUT_DIR COMMIT}
commit=${2:?usage: bash bench/gpu_checks.sh OUT_DIR COMMIT}
export LLMLABS_COMMIT=$commit PYTHONPATH=. PYTHONUNBUFFERED=1
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')
# a small corpus, prepared in seconds: without --data a GPU run prepares pysrc first, which takes minutes
data=/tmp/gpu_checks_data
[ -f $data/manifest.json ] || python3 -m llmlabs prepare pystdlib --out $data > "$out/prepare.log" 2>&1

timeout "${NCCL_TIMEOUT:-200}" torchrun --standalone --nproc_per_node 1 -m llmlabs train --depth 8 --no-compile \
    --tokens 10485760 --eval-tokens 1048576 --run-dir /tmp/nccl1 --data $data > "$out/torchrun_nccl1-$gpu-$commit.log" 2>&1
echo "torchrun nccl exit $?"
timeout "${MOE_TIMEOUT:-240}" python3 bench/moe_speed.py --depths 8,12 --data $data --out "$out/moe_speed-$gpu-$commit.jsonl" \
    > "$out/moe_speed-$gpu-$commit.log" 2>&1
echo "moe_speed exit $?"
timeout "${ENGINE_TIMEOUT:-120}" python3 bench/engine_speed.py --depth 12 --batches 1,32 \
    --out "$out/engine_speed-$gpu-$commit.jsonl" > "$out/engine_speed-$gpu-$commit.log" 2>&1
echo "engine_speed exit $?"

grep -E "distributed MuonAdamW|val_bpb:|tok_per_sec:" "$out/torchrun_nccl1-$gpu-$commit.log"
tail -6 "$out/moe_speed-$gpu-$commit.log"
tail -4 "$out/engine_speed-$gpu-$commit.log"
