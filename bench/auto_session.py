"""A whole `llmlabs auto` session with a scripted agent, and what it costs per experiment.

    PYTHONPATH=. python3 bench/auto_session.py --out bench/results                 # GPU: d4, 10 s budget
    PYTHONPATH=. python3 bench/auto_session.py --no-compile-cache --experiments 2  # the 'before' of the cache
    PYTHONPATH=. python3 bench/auto_session.py --train-args "--depth 2 --device cpu ..." --budget 3  # CPU dry run
    PYTHONPATH=. python3 bench/auto_session.py --gpus 0,1 --experiments 5  # two workers: 10 experiments

In a throwaway git repo made from this checkout's files (the checkout is never touched): `prepare
pystdlib` (unless --data), `auto init`, `auto baseline`, `auto loop` with a command agent that makes
one real edit of the research surface per iteration (EDITS, in order; an edit whose text a keep has
changed is skipped for the next), `auto report`. Then per run, from the harness's result files: wall
time, training seconds, and the overhead (warm-up, tail, evaluation), whose mean per experiment is
what the shared compile cache cuts. With workers (--gpus), also what the multi-GPU issue asks of them:
experiments per hour, each worker's idle fraction of the loop, seeds never used twice, and every
decision recomputed from the ledger rows before it (workers_section). Writes NAME.{log,md,tsv,png}
and NAME-findings.md into --out.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (file, old, new, description): real one-line edits of the research surface
EDITS = [
    ("llmlabs/scaling.py", '"matrix_lr": 0.02 * lr_scale', '"matrix_lr": 0.03 * lr_scale', "Muon matrix LR 0.02 -> 0.03"),
    ("llmlabs/model.py", "QK_GAIN = 1.2 ", "QK_GAIN = 1.0 ", "QK gain 1.2 -> 1.0 (plain 1/sqrt(d) attention scale)"),
    ("llmlabs/scaling.py", '"embedding_lr": 0.3 * lr_scale', '"embedding_lr": 0.45 * lr_scale', "embedding LR 0.3 -> 0.45"),
    ("llmlabs/config.py", "softcap: float = 15.0", "softcap: float = 20.0", "logit softcap 15 -> 20"),
    ("llmlabs/scaling.py", '"unembedding_lr": 0.008 * lr_scale', '"unembedding_lr": 0.012 * lr_scale',
     "unembedding LR 0.008 -> 0.012"),
    ("llmlabs/model.py", "self.resid_lambdas.copy_(1.15 - 0.10 * depth)", "self.resid_lambdas.copy_(1.0 + 0.0 * depth)",
     "residual scalars start at 1 in every layer"),
    ("llmlabs/scaling.py", '"weight_decay": 0.28 * lr_scale', '"weight_decay": 0.14 * lr_scale', "Muon weight decay halved"),
    ("llmlabs/config.py", "rope_base: float = 100_000.0", "rope_base: float = 10_000.0", "RoPE base 100k -> 10k"),
    ("llmlabs/scaling.py", '"scalar_lr": 0.5 * lr_scale', '"scalar_lr": 0.25 * lr_scale', "scalar LR 0.5 -> 0.25"),
    ("llmlabs/model.py", "VE_GATE_CHANNELS = 12 ", "VE_GATE_CHANNELS = 32 ", "value-embedding gate reads 32 channels"),
    ("llmlabs/model.py", "nn.init.normal_(self.lm_head.weight, std=0.001)", "nn.init.normal_(self.lm_head.weight, std=0.003)",
     "lm_head init std 0.001 -> 0.003"),
    ("llmlabs/scaling.py", '"matrix_lr": 0.02 * lr_scale', '"matrix_lr": 0.015 * lr_scale', "Muon matrix LR 0.02 -> 0.015"),
]
AGENT = '''import json, os, pathlib, sys
edits = json.loads(pathlib.Path(sys.argv[1]).read_text())
# workers (--gpus, passed on as argv[2]) start evenly spread over the list, worker j of n at j * len / n,
# so that at any iteration they try different edits (up to one worker per edit)
gpus, w = (sys.argv[2].split(",") if len(sys.argv) > 2 else []), os.environ["LLMLABS_AUTO_WORKER"]
j = gpus.index(w[3:]) if w.startswith("gpu") and w[3:] in gpus else 0
i = (int(os.environ["LLMLABS_AUTO_ITERATION"]) - 1 + len(edits) * j // max(len(gpus), 1)) % len(edits)
for path, old, new, what in edits[i:] + edits[:i]:
    f = pathlib.Path(path)
    if f.read_text().count(old) == 1:
        f.write_text(f.read_text().replace(old, new))
        print(what)
        break
else:
    print("no edit left")
'''


def sh(cmd, log, cwd, env):
    print(f"\n$ {' '.join(cmd)}", file=log, flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"auto_session: `{' '.join(cmd)}` failed (exit {r.returncode}); see the log")
    return time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--work", default="/tmp/llmlabs-auto-session")
    p.add_argument("--data", help="a prepared data directory (default: prepare pystdlib at vocab 8192)")
    p.add_argument("--budget", type=float, default=10.0, help="training seconds per run")
    p.add_argument("--train-args", default="--depth 4 --device cuda")
    p.add_argument("--baselines", type=int, default=5)
    p.add_argument("--experiments", type=int, default=10, help="loop iterations per worker (one experiment each)")
    p.add_argument("--no-compile-cache", action="store_true", help="each run compiles from scratch (the 'before')")
    p.add_argument("--gpus", help="GPU indices for baseline and loop workers, e.g. 0,1 (one worker per GPU)")
    p.add_argument("--loop-minutes", type=float,
                   help="start no loop iteration after this many minutes (auto loop --hours): the report is still "
                        "written when a device call's time limit is near")
    a = p.parse_args()
    py, work, out = sys.executable, Path(a.work), Path(a.out)
    shutil.rmtree(work, ignore_errors=True)
    (work / "lab").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LLMLABS_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the lab's code comes from the throwaway repo's own exports
    # LLMLABS_COMMIT first: a copy of the tree whose .git is stale (a device machine's) names the wrong one
    commit = os.environ.get("LLMLABS_COMMIT") or subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip() \
        or "unknown"
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    name = (f"auto_session-{device.replace(' ', '-')}-{commit}-"
            f"{'nocache' if a.no_compile_cache else 'cache'}-{time.strftime('%Y%m%d-%H%M%S')}")
    log = open(out / f"{name}.log", "w")
    lab = work / "lab"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True).stdout.split()
    for rel in files or ["pyproject.toml", *[str(f.relative_to(REPO)) for f in (REPO / "llmlabs").rglob("*")]]:
        src = REPO / rel
        if src.is_file() and "__pycache__" not in rel:
            (lab / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, lab / rel)
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"],
                ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "start"]):
        subprocess.run(["git", *cmd], cwd=lab, check=True, env={**env, "PYTHONPATH": ""})
    env["PYTHONPATH"] = str(lab)  # the harness itself (the runs import exports of the session's commits)
    t0 = time.time()
    data = a.data
    if not data:
        data = str(work / "data" / "pystdlib-v8192")
        sh([py, "-m", "llmlabs", "prepare", "pystdlib", "--out", data], log, lab, env)
    init = [py, "-m", "llmlabs", "auto", "init", "--tag", "bench", "--data", data, "--time-budget", str(a.budget),
            "--train-args", a.train_args, "--baselines", str(a.baselines)]
    sh(init + (["--no-compile-cache"] if a.no_compile_cache else []), log, lab, env)
    gpus = ["--gpus", a.gpus] if a.gpus else []
    sh([py, "-m", "llmlabs", "auto", "baseline", *gpus], log, lab, env)
    agent_dir = work / "agent"
    agent_dir.mkdir()
    (agent_dir / "agent.py").write_text(AGENT)
    (agent_dir / "edits.json").write_text(json.dumps(EDITS))
    loop_t0 = time.time()
    loop_s = sh([py, "-m", "llmlabs", "auto", "loop", "--agent", f"{py} {agent_dir / 'agent.py'} {agent_dir / 'edits.json'} {a.gpus or ''}".strip(),
                 "--agent-rw", str(agent_dir), "--iterations", str(a.experiments), *gpus,
                 *(["--hours", f"{a.loop_minutes / 60:.4f}"] if a.loop_minutes else [])], log, lab, env)
    sh([py, "-m", "llmlabs", "auto", "report"], log, lab, env)
    sdir = lab / ".auto" / "bench"
    table = summarize(sdir, loop_s, a) + workers_section(ledger_rows(sdir), loop_t0, loop_s)
    header = (f"<!-- {time.strftime('%Y-%m-%d')} | {device} | commit {commit} | total {time.time() - t0:.0f} s |\n"
              f"     PYTHONPATH=. python3 bench/auto_session.py --budget {a.budget:g} --train-args '{a.train_args}' "
              f"--baselines {a.baselines} --experiments {a.experiments}"
              f"{' --no-compile-cache' if a.no_compile_cache else ''}{f' --gpus {a.gpus}' if a.gpus else ''}"
              f"{f' --loop-minutes {a.loop_minutes:g}' if a.loop_minutes else ''} -->\n")
    (out / f"{name}.md").write_text(header + table + "\n" + (sdir / "report.md").read_text())
    shutil.copy(sdir / "findings.md", out / f"{name}-findings.md")
    shutil.copy(sdir / "results.tsv", out / f"{name}.tsv")
    shutil.copy(sdir / "report.png", out / f"{name}.png")
    print(table)


def ledger_rows(sdir) -> list[dict]:
    cells = [r.split("\t") for r in (sdir / "results.tsv").read_text().splitlines()]
    return [dict(zip(cells[0], r)) for r in cells[1:]]


VAL_STATUSES = ("baseline", "keep", "discard", "crash", "invalid")  # runs on the val split; test runs share seeds by design


def workers_section(rows, loop_t0, loop_s) -> str:
    """What parallel workers cost and whether they kept the bookkeeping right, from the ledger alone:
    experiments per hour in the loop; per worker the share of the loop's wall time its runs did not
    fill (the device idle: agent turns, git, waiting on the ledger); seeds never used twice on the val
    split; and every decided experiment's delta and sigma_d recomputed from the rows before it (the
    harness's own frontier, scores and noise floor), i.e. no worker decided on a stale ledger."""
    from llmlabs.auto.runner import frontier, noise, scores

    loop = [r for r in rows if r["run"] and r["status"] != "baseline" and float(r["started"]) >= loop_t0]
    busy = {}
    for r in loop:
        busy[r["worker"]] = busy.get(r["worker"], 0.0) + float(r["wall_s"])
    exps = len({r["commit"] for r in rows if r["status"] in VAL_STATUSES[1:] and float(r["started"] or 0) >= loop_t0})
    lines = ["", f"parallel workers: {exps} experiments in {loop_s:.0f} s of loop = {3600 * exps / loop_s:.1f} an hour",
             "", "| worker | runs | run seconds | idle fraction |", "|---|---|---|---|"]
    for w in sorted(busy):
        n = sum(r["worker"] == w for r in loop)
        lines.append(f"| {w} | {n} | {busy[w]:.0f} | {max(0.0, 1 - busy[w] / loop_s):.2f} |")
    seeds = [r["seed"] for r in rows if r["status"] in VAL_STATUSES and r["run"]]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    stale, i = [], 0
    while i < len(rows):  # an experiment's rows (its near-threshold repeats) are appended together
        j = i + 1
        while j < len(rows) and (rows[j]["commit"], rows[j]["description"]) == (rows[i]["commit"], rows[i]["description"]):
            j += 1
        group = rows[i:j]
        if group[0]["status"] in ("keep", "discard"):
            before = rows[:i]
            ref, (sigma, _) = scores(before, frontier(before)), noise(before)
            new = [float(r["val_bpb"]) for r in group]
            delta = sum(new) / len(new) - sum(ref) / len(ref)
            sigma_d = sigma * (1 / len(new) + 1 / len(ref)) ** 0.5
            for r in group:
                if abs(float(r["delta"]) - delta) > 1e-5 or abs(float(r["sigma"]) - sigma_d) > 1e-5:
                    stale.append(f"{r['run']} (delta {r['delta']} sigma_d {r['sigma']}; the rows before it: "
                                 f"{delta:.6f}, {sigma_d:.6f})")
        i = j
    lines += ["", f"seeds used twice on the val split: {', '.join(twice) or 'none'}",
              f"experiments decided on other rows than the ledger's before them: {', '.join(stale) or 'none'}"]
    return "\n".join(lines) + "\n"


def summarize(sdir, loop_s, a) -> str:
    rows = ledger_rows(sdir)
    lines = ["| run | status | val_bpb | wall s | warm-up s | training s | tail s | eval s |", "|---|---|---|---|---|---|---|---|"]
    over = {"baseline": [], "experiment": []}
    order = []  # every scored run's overhead in ledger order: the first one compiled with an empty cache
    for r in rows:
        if not r["run"]:
            lines.append(f"| (none) | {r['status']} | | | | | | | ")
            continue
        ph = json.loads((sdir / "runs" / r["run"] / "result.json").read_text())["phases"]
        lines.append(f"| {r['run']} | {r['status']} | {r['val_bpb']} | {r['wall_s']} | {ph.get('warm_s', '')} | "
                     f"{ph.get('train_s', '')} | {ph.get('tail_s', '')} | {ph.get('eval_s', '')} |")
        if ph.get("eval_s"):
            over["baseline" if r["status"] == "baseline" else "experiment"].append(float(r["wall_s"]) - ph["train_s"])
            order.append(float(r["wall_s"]) - ph["train_s"])
    exps = sum(1 for r in rows if r["status"] != "baseline")
    lines += ["", "overhead per run (wall - training seconds, by the harness's clock): "
              + "; ".join(f"{k} mean {statistics.fmean(v):.1f} s over {len(v)}" for k, v in over.items() if v),
              f"first run (compile cache {'none' if a.no_compile_cache else 'empty'}): {order[0]:.1f} s; the runs after "
              f"it: mean {statistics.fmean(order[1:]):.1f} s" if len(order) > 1 else "",
              f"loop: {a.experiments} iterations, {exps} experiments in {loop_s:.0f} s "
              f"({loop_s / max(exps, 1):.1f} s per experiment with a {a.budget:g} s budget, agent turns included)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
