#!/usr/bin/env bash
# The autoresearch demo on one GPU (~9 minutes on an H100): prepare pystdlib, `auto init`,
# `auto baseline --repeats 3`, two `auto run`s of real edits to the research surface, `auto report`.
# Copies the report's PNG and table (and the ledger and this log) into $OUT.
#
#   PYTHONPATH=. bash bench/auto_demo.sh                 # OUT defaults to bench/results
#   DATA=/path/to/prepared BUDGET=60 bash bench/auto_demo.sh
#   TRAIN_ARGS="--depth 2 --device cpu ..." BUDGET=5 bash bench/auto_demo.sh   # a CPU dry run
#
# Needs git, and rustbpe for `prepare` unless DATA names a prepared directory (carry one along).
# It works in a throwaway git repo made from this checkout's files under $WORK, so the checkout
# (which need not be a git repo on the GPU machine) is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=${PY:-python3}
OUT=${OUT:-$SRC/bench/results}
BUDGET=${BUDGET:-40}  # 5 runs x (budget + ~30-60 s compile/eval/start-up) must fit ~9 minutes
TRAIN_ARGS=${TRAIN_ARGS:---device cuda}
WORK=${WORK:-/tmp/llmlabs-auto-demo}
export LLMLABS_HOME=${LLMLABS_HOME:-$WORK/home} PYTHONUNBUFFERED=1
COMMIT=${LLMLABS_COMMIT:-$(git -C "$SRC" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
NAME=auto_demo_$(echo "$DEVICE" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')_$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/$NAME.log") 2>&1
T0=$(date +%s)
phase() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

# edit FILE OLD NEW: a real edit that fails loudly when the code no longer looks as expected
edit() {
  "$PY" - "$@" <<'EOF'
import sys
path, old, new = sys.argv[1:4]
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"auto_demo: expected exactly one {old!r} in {path}, found {text.count(old)}: update the demo's edits")
open(path, "w").write(text.replace(old, new))
EOF
}

phase "setup: $DEVICE, a throwaway repo of commit $COMMIT"
rm -rf "$WORK/lab" && mkdir -p "$WORK/lab"
if git -C "$SRC" rev-parse 2>/dev/null; then
  git -C "$SRC" ls-files -co --exclude-standard -z | (cd "$SRC" && xargs -0 cp --parents -t "$WORK/lab")
else
  cp -r "$SRC/llmlabs" "$SRC/pyproject.toml" "$WORK/lab/"
fi
find "$WORK/lab" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK/lab"
git init -q -b main && git add -A && git -c user.name=demo -c user.email=demo@localhost commit -qm "demo start"

DATA_GIVEN=${DATA:-}
if [ -z "${DATA:-}" ]; then
  phase "prepare pystdlib (vocab 8192)"
  "$PY" -c "import rustbpe" 2>/dev/null || { echo "auto_demo: rustbpe is missing: carry its wheel, or set DATA to a prepared directory"; exit 2; }
  DATA=$WORK/data/pystdlib-v8192
  "$PY" -m llmlabs prepare pystdlib --out "$DATA"
fi

phase "auto init: branch auto/demo, fingerprint, ${BUDGET} s budget per run (GPU preset: d8, seq 2048, 2^19 tokens/step)"
"$PY" -m llmlabs auto init --tag demo --data "$DATA" --time-budget "$BUDGET" --train-args "$TRAIN_ARGS"

phase "auto baseline --repeats 3: the noise between seeds of the unchanged code"
"$PY" -m llmlabs auto baseline --repeats 3 --tag demo

cd .auto/demo/main
phase "run 1: Muon learning rate 0.02 -> 0.03 (llmlabs/config.py)"
edit llmlabs/config.py '"matrix_lr": 0.02 * lr_scale' '"matrix_lr": 0.03 * lr_scale'
"$PY" -m llmlabs auto run -m "Muon matrix LR 0.02 -> 0.03"

phase "run 2: QK gain 1.2 -> 1.0, i.e. plain 1/sqrt(d) attention scale (llmlabs/model.py)"
edit llmlabs/model.py 'QK_GAIN = 1.2 ' 'QK_GAIN = 1.0 '
"$PY" -m llmlabs auto run -m "QK gain 1.2 -> 1.0"
cd "$WORK/lab"

phase "auto report"
"$PY" -m llmlabs auto report --tag demo
S=.auto/demo
{ echo "<!-- $(date -u +%Y-%m-%d) | $DEVICE | commit $COMMIT | total $(( $(date +%s) - T0 )) s |"
  echo "     ${DATA_GIVEN:+DATA=$DATA_GIVEN }BUDGET=$BUDGET TRAIN_ARGS='$TRAIN_ARGS' bash bench/auto_demo.sh -->"
  cat "$S/report.md"; } > "$OUT/$NAME.md"
cp "$S/report.png" "$OUT/$NAME.png"
cp "$S/results.tsv" "$OUT/${NAME}_results.tsv"
phase "done: $OUT/$NAME.{png,md,log} and ${NAME}_results.tsv"
cut -f1-11 "$S/results.tsv"
