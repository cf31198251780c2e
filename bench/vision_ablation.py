"""Does the vision path see? Issue 22's must-show: after a short `llmlabs train --vision tiny` run on the
`shapes` captions, the caption bpb on held-out (val) images with each caption after its own image,
against the same captions after images shuffled across them (a seeded derangement: no caption keeps
its image). A model that reads the image scores its own image's caption clearly lower; one that
ignores it scores both alike. Several training seeds; each run scored once true and once shuffled.

    PYTHONPATH=. python bench/vision_ablation.py [--seeds 3] [--tokens 6e5] [--data DIR] [--save]

--save writes bench/results/vision_ablation-<device>-<commit>.{md,json} (date, device, commit,
command). Without --data, `shapes` is prepared into a temporary directory first (32 px, vocab 350)."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmlabs import checkpoint, train
from llmlabs.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
# the model and run: a d2 LM of width 128 and the tiny tower, one captioned image per 64-position row
RUN = ["--vision", "tiny", "--depth", "2", "--aspect-ratio", "64", "--head-dim", "32", "--seq-len", "64",
       "--window-pattern", "L", "--device-batch-size", "32", "--total-batch-size", "2048", "--eval-split", "none"]


def score(run_dir: Path, device: torch.device, shuffle_seeds) -> dict:
    """Caption bpb of the run's checkpoint on every val image: true pairs, then each shuffle."""
    cfg = json.loads((run_dir / "config.json").read_text())
    run = train.setup(cfg, device)  # the run as `llmlabs train` built it, then its trained weights
    ck = checkpoint.load_newest(run_dir, device)
    run.model.load_state_dict(ck["model"])
    run.mm.load_state_dict(ck["state"]["encoder"])

    def bpb(seed):
        return run.mm.evaluate(run.model, "val", batch_size=64, max_tokens=1 << 30, shuffle_seed=seed)

    true = bpb(None)
    return {"true_bpb": true["bpb"], "shuffled_bpb": statistics.mean(bpb(s)["bpb"] for s in shuffle_seeds),
            "unigram_bpb": true["unigram_bpb"], "tokens": true["tokens"], "steps": ck["step"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="training seeds (0..N-1)")
    p.add_argument("--tokens", type=float, default=6e5, help="training budget per run (rows x seq len)")
    p.add_argument("--data", help="a prepared shapes (or digits) data directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save", action="store_true", help="write bench/results/vision_ablation-<device>-<commit>.{md,json}")
    args = p.parse_args()
    device = torch.device(args.device)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(prepare("shapes", Path(tmp) / "shapes", vocab_size=350))
        rows = []
        for seed in range(args.seeds):
            run_dir = Path(tmp) / f"run{seed}"
            t = time.time()
            if train.main([*RUN, "--data", data, "--tokens", f"{args.tokens:g}", "--seed", str(seed),
                           "--device", args.device, "--run-dir", str(run_dir)]) != 0:
                sys.exit(f"training seed {seed} failed")
            row = {"seed": seed, **score(run_dir, device, shuffle_seeds=(100, 101)), "seconds": round(time.time() - t)}
            rows.append(row)
            print(f"seed {seed}: caption bpb true {row['true_bpb']:.4f}, shuffled {row['shuffled_bpb']:.4f} "
                  f"(unigram {row['unigram_bpb']:.4f}; {row['steps']} steps, {row['seconds']} s)", flush=True)
    gaps = [r["shuffled_bpb"] - r["true_bpb"] for r in rows]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    tag = f"cpu{os.cpu_count()}" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": f"{tag} ({platform.processor() or platform.machine()})",
              "commit": commit, "command": "PYTHONPATH=. python bench/vision_ablation.py " + " ".join(sys.argv[1:]),
              "train_flags": " ".join(RUN) + f" --tokens {args.tokens:g}", "rows": rows,
              "gap_mean": statistics.mean(gaps), "gap_min": min(gaps), "total_seconds": round(time.time() - t0)}
    lines = [f"# Vision ablation: caption bpb with true vs shuffled images ({result['date']}, {result['device']}, "
             f"commit {commit})", "", f"`{result['command']}`", "", f"Training: `llmlabs train {result['train_flags']}` "
             f"on `shapes` (32 px); scored on every val image's caption; shuffled = mean of 2 derangements.", "",
             "| seed | steps | true bpb | shuffled bpb | gap | unigram bpb |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['steps']} | {r['true_bpb']:.4f} | {r['shuffled_bpb']:.4f} | "
              f"{r['shuffled_bpb'] - r['true_bpb']:.4f} | {r['unigram_bpb']:.4f} |" for r in rows]
    lines += ["", f"Gap (shuffled - true): mean {result['gap_mean']:.4f} bpb, smallest {result['gap_min']:.4f}; "
              f"{result['total_seconds']} s in all."]
    print("\n".join(lines))
    if args.save:
        out = REPO / "bench" / "results" / f"vision_ablation-{tag}-{commit}"
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}.md and .json")


if __name__ == "__main__":
    main()
