#!/usr/bin/env bash
# The whole test suite on a lent GPU machine, within one 10-minute device call:
#
#     source bench/gpu_setup.sh; bash bench/gpu_suite.sh OUT_DIR COMMIT
#
# Needs pytest-xdist, execnet and tensorboard (+ its dependencies) carried as wheels in .whl/ beside
# gpu_setup.sh's (pip download --no-deps ... pytest-xdist execnet tensorboard tensorboard-data-server
# absl-py grpcio markdown protobuf werkzeug markupsafe). Each worker's torch gets OMP_NUM_THREADS
# threads: 12 workers of 16 threads each on 16 cores (2026-12-03, 606a9da) oversubscribed the CPUs
# and the run reached only ~75% in 380 s. -v prints every test's outcome as it ends, so a run cut
# by the timeout still names its failures, and bench/instafail.py prints each one's traceback as it
# happens; the short summary (-rfE) follows when it completes. --dist worksteal: idle workers take
# queued tests from busy ones, so a few minute-long tests at the end do not leave the rest idle.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR COMMIT}
commit=${2:?usage: bash bench/gpu_suite.sh OUT_DIR COMMIT}
workers=${WORKERS:-6}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
log="$out/pytest_all-$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())')-$commit.log"
{
    echo "# $(date +%F) | $(python3 -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)') | commit $commit"
    echo "# command: OMP_NUM_THREADS=$OMP_NUM_THREADS python3 -m pytest -v -n $workers --dist worksteal --tb=short -rfEs --durations=15 -p instafail"
    PYTHONPATH=bench:${PYTHONPATH:-} timeout "${SUITE_TIMEOUT:-480}" python3 -m pytest -v -n "$workers" --dist worksteal --tb=short -rfEs \
        --durations=15 -p no:cacheprovider -p instafail
    echo "# exit status $?"
} > "$log" 2>&1
grep -E "FAILED|ERROR|passed|failed|exit status" "$log" | tail -30
