#!/usr/bin/env bash
# Some cells of a preregistered sweep on a lent GPU machine, in one call, their records brought back:
#
#     bash bench/sweep_cells.sh SPEC CELL[,CELL...] OUT_DIR [RUNNERS]
#
# A lent machine starts bare and holds 10 minutes a call, so a sweep of 5-minute cells runs a cell or
# two a call (`llmlabs sweep run --cells`), each call preparing pysrc first (~50 s). pysrc is the
# interpreter's own sources, so it changes with what is installed: the calls of one sweep must install
# the same (`source bench/gpu_setup.sh` and nothing else; a GPU suite's lm_eval on a warm machine made
# another corpus, 2026-12-05). run.log records the corpus's data_id and tokenizer hash; DATA_ID=<the
# first call's>, or TOKENIZER=<a prefix of its tokenizer hash> for cells run before data_id existed,
# makes a later call refuse to run on another (`llmlabs sweep table` refuses to pool them); DEVICE=<a part of the
# GPU's name, e.g. H200> refuses before preparing anything on another card: cells at equal time must share one
# (`sweep table` refuses to pool them too), cells at equal tokens may mix. RUNNERS > 1 starts that many
# runners on the one sweep directory, so the named cells run side by side on the one GPU: for cells at
# equal tokens only, never for cells at equal time, whose val_bpb depends on the speed they get.
# OUT_DIR gets cells.tgz (the sweep directory's sweep.json and spec.toml, and each named cell's
# directory without its checkpoints: summary.json, metrics.jsonl, train.log, config.json, loss.png,
# samples.txt) and run.log, whose last lines are each cell's val_bpb. Back here, the calls' archives
# unpack into one sweep directory (the first call's sweep.json kept), read by `llmlabs sweep table`:
#     mkdir -p sweeps/NAME && tar xzf cells.tgz --skip-old-files -C sweeps/NAME
set -uo pipefail
spec=${1:?usage: bash bench/sweep_cells.sh SPEC CELL[,CELL...] OUT_DIR [RUNNERS]}
cells=${2:?usage: bash bench/sweep_cells.sh SPEC CELL[,CELL...] OUT_DIR [RUNNERS]}
out=${3:?usage: bash bench/sweep_cells.sh SPEC CELL[,CELL...] OUT_DIR [RUNNERS]}
runners=${4:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
sw=${SWEEP_DIR:-/tmp/sweep}
(
    read -r torch_version device < <(python3 -c 'import torch as t; print(t.__version__, t.cuda.get_device_name() if t.cuda.is_available() else "cpu")')
    echo "# $(date +%F) | $device | torch $torch_version | commit ${LLMLABS_COMMIT:-unknown}"
    echo "# command: bash bench/sweep_cells.sh $spec $cells OUT $runners"
    if [[ -n "${DEVICE:-}" && "$device" != *"$DEVICE"* ]]; then
        echo "refused: this machine's device is $device, not the sweep's $DEVICE (equal time on another card is not equal compute): no cell run"
        exit 3
    fi
    python3 -m llmlabs prepare pysrc 2>&1 | tail -4
    read -r id tok < <(python3 -c 'from llmlabs.data.shards import DataDir; d = DataDir.open("pysrc"); print(d.data_id, d.tokenizer.hash)')
    echo "data_id $id tokenizer $tok"
    if [[ -n "${DATA_ID:-}" && "$id" != "$DATA_ID" ]] || [[ -n "${TOKENIZER:-}" && "$tok" != "$TOKENIZER"* ]]; then
        echo "refused: pysrc here is data_id $id, tokenizer ${tok:0:12}, not the sweep's ${DATA_ID:-}${TOKENIZER:-} (other packages installed?): no cell run"
        exit 3
    fi
    for ((i = 1; i <= runners; i++)); do
        python3 -m llmlabs sweep run "$spec" --dir "$sw" --cells "$cells" > "$sw.runner$i.log" 2>&1 &
        sleep 3  # the first runner writes sweep.json; the others then read it
    done
    wait
    cat "$sw".runner*.log
) > "$out/run.log" 2>&1 || { tail -3 "$out/run.log"; exit 1; }
# --exclude before the operands: GNU tar applies it only to the names that follow it
(cd "$sw" && tar czf "$out/cells.tgz" --exclude=checkpoints --exclude=.claim --exclude=.lock sweep.json spec.toml \
    $(echo "$cells" | tr , '\n' | sed 's|^|cells/|'))
grep -E "val_bpb|FAILED|done" "$out/run.log" | tail -20
