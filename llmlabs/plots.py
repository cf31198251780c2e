"""The run directory's plots, drawn from metrics.jsonl after training: loss.png for every run,
expert_load.png for a Mixture-of-Experts run. Each is written to a temporary name and renamed, so
a killed run never leaves half a PNG."""
import json
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _rows(metrics_path):
    return [json.loads(r) for r in metrics_path.read_text().splitlines() if r]


def _save(fig, png_path):
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    os.replace(tmp, png_path)


def loss(metrics_path, png_path):
    """Training loss per step, with val_bpb on a second axis where the run evaluated during training."""
    rows = _rows(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
    fig, ax = _pyplot().subplots(figsize=(7, 4))
    ax.plot(*zip(*train), lw=1, label="train loss (nats/token)")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="C1", label="val_bpb")
        ax2.set_ylabel("val_bpb")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(png_path.parent.name)
    fig.tight_layout()
    _save(fig, png_path)


def expert_load(metrics_path, png_path):
    """Left: the load's spread per step (coefficient of variation over experts, mean over layers;
    the most and least loaded expert relative to the mean). Right: each expert's share of the routed
    tokens per step, averaged over the MoE layers (uniform = 1/E)."""
    rows = [r for r in _rows(metrics_path) if "moe_load" in r]
    steps = [r["step"] for r in rows]
    fig, (ax, ax2) = _pyplot().subplots(1, 2, figsize=(11, 4))
    for key, label in (("moe_load_cv", "load CV"), ("moe_load_max", "max / mean"), ("moe_load_min", "min / mean")):
        ax.plot(steps, [r[key] for r in rows], lw=1, label=label)
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title("expert load, all MoE layers")
    n_layers, n_experts = len(rows[0]["moe_load"]), len(rows[0]["moe_load"][0])
    for e in range(n_experts):
        ax2.plot(steps, [sum(layer[e] for layer in r["moe_load"]) / n_layers for r in rows], lw=1)
    ax2.axhline(1 / n_experts, color="k", ls=":", lw=1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("share of routed tokens")
    ax2.set_title(f"{n_experts} experts (dotted: uniform)")
    fig.suptitle(png_path.parent.name)
    fig.tight_layout()
    _save(fig, png_path)


def evals(evals_path, png_path):
    """Each task's score over the checkpoints' steps, from every `llmlabs eval` of the run (the latest
    score where a step was scored twice): bpb on the left, downstream scores on the right (offline
    tasks' acc_norm, CORE, each lm-eval task's headline metric)."""
    latest = {}
    for r in _rows(evals_path):
        latest[(r["task"], r["split"], r["step"])] = r
    fig, (ax, ax2) = _pyplot().subplots(1, 2, figsize=(11, 4))
    for task, split in sorted({(t, s) for t, s, _ in latest}):
        pts = sorted((step, r) for (t, s, step), r in latest.items() if (t, s) == (task, split))
        steps = [step for step, _ in pts]
        if task == "bpb":
            ax.plot(steps, [r["bpb"] for _, r in pts], "o-", label=f"{split}_bpb")
        else:  # rows written before rows had a score: offline tasks, scored by acc_norm
            ax2.plot(steps, [r.get("score", r.get("acc_norm")) for _, r in pts], "o-",
                     label=task if split == "-" else f"{task} ({split})")
    ax.set_title("bits per byte (lower is better)")
    ax2.axhline(0.25, color="k", ls=":", lw=1, label="chance (offline tasks; CORE's is 0)")
    ax2.set_title("downstream (higher is better)")
    for a in (ax, ax2):
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.suptitle(png_path.parent.name)
    fig.tight_layout()
    _save(fig, png_path)
