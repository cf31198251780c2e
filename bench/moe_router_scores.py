"""How much of a trained MoE's routing is common to every token: router scores on validation rows.

    PYTHONPATH=. python3 bench/moe_router_scores.py RUN_DIR [RUN_DIR ...] [--rows 16] [--out FILE.md]

For each MoE layer of each run's newest checkpoint, over --rows validation rows (seed 0): each
expert's mean sigmoid score over the tokens; the spread of those means across experts (common mode:
every token prefers the same experts) against the mean spread of a token's scores around them (what
is particular to the token); the balancing bias and its correlation with the mean scores; and the
load's coefficient of variation when the k experts are chosen with the bias, as the model routes,
and without it.
"""
import argparse
import sys
from pathlib import Path

import torch

from llmlabs import checkpoint
from llmlabs.data.loader import BestFitLoader
from llmlabs.data.shards import DataDir
from llmlabs.moe import MoE, one_hot, top_k_indices


def router_inputs(model, x) -> dict:
    """{layer index: the [tokens, C] input of its MoE} for one forward of x."""
    got, hooks = {}, []
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, MoE):
            hooks.append(block.mlp.register_forward_hook(
                lambda m, inp, out, i=i: got.__setitem__(i, inp[0].reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def layer_stats(moe: MoE, h) -> dict:
    with torch.no_grad():
        chosen, _, scores = moe.route(h)  # the layer's own routing: [N, k] with the bias, [N, E] scores
    mean = scores.mean(0)

    def cv(chosen):
        load = one_hot(chosen.flatten(), moe.n_experts).sum(0).float()
        return (load.std(unbiased=False) / load.mean()).item()

    bias = moe.expert_bias.float()
    return {"mean_scores": mean.tolist(), "common": mean.std(unbiased=False).item(),
            "per_token": (scores - mean).std(1, unbiased=False).mean().item(), "bias": bias.tolist(),
            "corr": torch.corrcoef(torch.stack([mean, bias]))[0, 1].item() if bias.std() > 0 else float("nan"),
            "cv_bias": cv(chosen), "cv_raw": cv(top_k_indices(scores, moe.top_k))}


def report(run_dir, rows: int) -> list[str]:
    model, info = checkpoint.load_run(run_dir, "cpu")
    cfg = info["run_config"]
    x, _ = next(iter(BestFitLoader(DataDir.open(cfg["data"]), "val", rows, cfg["seq_len"], seed=0)))
    rate = next(b.mlp.bias_rate for b in model.blocks if isinstance(b.mlp, MoE))  # the checkpoint's model config
    lines = [f"## {run_dir} (step {info['step']}, bias rate {rate:g})", "",
             "| layer | spread of experts' mean scores | token spread around them | load CV, bias / none | "
             "corr(mean score, bias) | mean score per expert | bias per expert |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: " ".join(f"{a:.2f}" for a in v)  # noqa: E731
    for i, h in router_inputs(model, x).items():
        s = layer_stats(model.blocks[i].mlp, h)
        lines.append(f"| {i} | {s['common']:.3f} | {s['per_token']:.3f} | {s['cv_bias']:.2f} / {s['cv_raw']:.2f} | "
                     f"{s['corr']:+.2f} | {fmt(s['mean_scores'])} | {fmt(s['bias'])} |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories of MoE `llmlabs train` runs (with a checkpoint)")
    p.add_argument("--rows", type=int, default=16, help="validation rows of the run's sequence length")
    p.add_argument("--out", help="also write the tables to this file")
    args = p.parse_args(argv)
    lines = []
    for run in args.runs:
        if not (Path(run) / "checkpoints").is_dir():
            sys.exit(f"{run}: no checkpoints/ there: give the directory of an `llmlabs train` run")
        lines += report(run, args.rows)
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
