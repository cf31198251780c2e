"""`llmlabs train`: the one training loop of the lab.

Every entry point (this CLI, torchrun, the autoresearch runner, sweeps) runs this same loop with a
different budget. Read it top to bottom: flags, setup, the loop (schedules, accumulation, step,
status, checkpoints), then the final evaluation and the summary block.

Budgets: training ends when the first of --time-budget / --tokens / --target-flops /
--param-data-ratio is used up. Every schedule (LR warmup and warmdown, Muon momentum ramp,
weight-decay decay) is a function of `progress`, the fraction of that budget used, so the same
schedule shape holds for a 30-second test and a 5-minute GPU run.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from llmlabs import checkpoint, core_eval, engine, flags, fp8, multimodal, plots, preflight, tracking
from llmlabs.common import LabError, atomic_write_json, compute_init, dist_info, make_dir, peak_flops, print0, seed_all

# What the main job runs when no flags are given (see README). The CPU preset is sized so that on a
# 2-core machine prepare + training + evaluation take under 5 minutes, and is budgeted in tokens (256
# steps), so the same val_bpb comes out however busy the machine is; the GPU preset is the
# autoresearch d8 experiment (5 minutes of training, seq 2048, batch 2^19 tokens, windows SSSL with
# autoresearch's S = half the context, 1024; nanochat has since moved to a quarter, GPTConfig's default),
# on the pysrc corpus (the default data on a GPU: pystdlib's 2.5M training tokens would be read ~230 times).
CPU_PRESET = dict(depth=4, aspect_ratio=32, head_dim=32, seq_len=256, window_pattern="L",
                  total_batch_size=4096, device_batch_size=16, tokens=2**20, eval_tokens=2**16,
                  # tuned on the 2-core CI machine, 60 s runs (2026-11-24): matrix LR 0.02 -> 1.776 bpb,
                  # 0.04 -> 1.723, 0.08 -> 1.805; scaling-rule LRs (made for 2^17-token batches) -> 1.794
                  matrix_lr=0.04, embedding_lr=0.6, unembedding_lr=0.016, scalar_lr=0.5, weight_decay=0.0)
GPU_PRESET = dict(depth=8, aspect_ratio=64, head_dim=128, seq_len=2048, window_pattern="SSSL", short_window=1024,
                  total_batch_size=2**19, device_batch_size=64, time_budget=300.0, eval_tokens=2**21)
# Twice the rows where they fit: half the accumulation steps, the same math, fewer and larger kernels.
# On an H200 (bench/NOTES.md rounds 5-7): d8 128 vs 64 rows 279.1 -> 275.0 ms a step, d12 64 vs 32
# -2.2%, d20 32 vs 16 5694.8 -> 5627.9 ms. Their peaks, 44.2, 45.7 and 64.1 GB, are 38-41 bytes per
# layer x row x channel x position; the rows double where 40 such bytes fit in 80% of the GPU: d8 on a
# 48 GB card keeps 64 rows, d20 on an 80 GB H100 takes 32, d26 takes 32 only on an H200. (With
# triton_mlp keeping only h the peaks fell to 36.1, 36.5 and 51.2 GB, 30-34 bytes: 40 leaves room.)
BUDGETS = ("time_budget", "tokens", "target_flops", "param_data_ratio")
ACT_BYTES = 40
MEM_FRACTION = 0.8
# a preset's fixed experiment: dropped when --depth asks for another model (then the scaling rules decide)
EXPERIMENT_KEYS = ("total_batch_size", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay")
UNTIMED_STEPS = 2        # compiled runs: steps not charged to --time-budget (torch.compile runs in them)
EAGER_UNTIMED_STEPS = 1  # eager runs: the first step's one-time costs (allocator, thread pools, kernels' first
                         # calls) are warm-up too: 9.8 s on a 2-core CPU running two runs, a 3 s budget's step
# A process that launches this loop (the autoresearch runner) may pass the write end of a pipe in this
# variable: the loop writes "timed" when the timed steps begin and "step N" after each step, and the
# launcher timestamps them with its own clock. The launcher never trusts this process's clock.
EVENTS_FD_VAR = "LLMLABS_EVENTS_FD"
MOMENTUM_RAMP = 0.3      # Muon momentum goes 0.85 -> 0.95 over this fraction of the budget
MOE_KEYS = ("moe_experts", "moe_top_k", "moe_shared", "moe_layers", "moe_expert_width", "moe_raw_gates",
            "moe_routed_scale", "moe_bias_rate", "moe_aux_loss")  # flags that are GPTConfig fields


def add_args(p):
    def preset(d):
        return ", ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                         for k, v in d.items())

    p.epilog = (f"Unset flags come from the preset for the hardware (with --depth, batch and learning rates come "
                f"from the scaling rules instead). CPU: {preset(CPU_PRESET)}. GPU: {preset(GPU_PRESET)}.")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a prepared data directory, or a prepared corpus's name (pysrc) (default: pystdlib "
                                  "on a CPU, pysrc on a GPU, prepared on first use)")
    multimodal.add_args(g)  # --vision, --vision-train, --text-frac
    g = p.add_argument_group("model (the one dial is --depth; unset values come from the CPU or GPU preset)")
    g.add_argument("--depth", type=flags.depth, help="d4..d26 or a number: width = depth x aspect ratio")
    g.add_argument("--aspect-ratio", type=flags.positive_int, help="width per layer of depth")
    g.add_argument("--head-dim", type=flags.positive_int, help="attention head size")
    g.add_argument("--n-kv-head", type=flags.positive_int, help="key/value heads for grouped-query attention (default: = heads)")
    g.add_argument("--seq-len", type=flags.positive_int, help="context length in tokens")
    g.add_argument("--window-pattern", help='sliding-window pattern over layers, e.g. "SSSL" or "L"')
    g.add_argument("--short-window", type=flags.positive_int, help="keys back an S layer attends (GPU preset 1024; else a quarter of the context)")
    g = p.add_argument_group("budget (training stops at the first one used up)")
    g.add_argument("--time-budget", type=flags.positive_float, help="seconds of training, compile and warm-up excluded")
    g.add_argument("--tokens", type=flags.positive_float, help="training tokens, e.g. 2e8")
    g.add_argument("--target-flops", type=flags.positive_float, help="training FLOPs (model FLOPs per token x tokens)")
    g.add_argument("--param-data-ratio", type=flags.positive_float, help="training tokens per model parameter (Chinchilla: 20)")
    g = p.add_argument_group("Mixture-of-Experts (llmlabs/moe.py; off unless --moe-experts)")
    g.add_argument("--moe-experts", type=flags.count, help="routed experts in each MoE layer (0: dense MLP, the default)")
    g.add_argument("--moe-top-k", type=flags.positive_int, help="routed experts per token (default 2)")
    g.add_argument("--moe-shared", type=flags.count, help="shared experts, seen by every token (default 1)")
    g.add_argument("--moe-layers", type=flags.layers, help="which layers are MoE: a slice like 1: (the default: all but the "
                                                      "first) or ::2, or indices like 2,5")
    g.add_argument("--moe-expert-width", type=flags.positive_int,
                   help="hidden width of an expert (default: active parameters per token match the dense MLP's)")
    g.add_argument("--moe-raw-gates", action="store_true", help="gate with the chosen scores as they are, not "
                                                                "normalised over the k (an ablation)")
    g.add_argument("--moe-routed-scale", type=flags.positive_float, help="multiplies the routed experts' output (default 1)")
    g.add_argument("--moe-bias-rate", type=flags.nonnegative,
                   help="balancing bias step per optimizer step (default 0.001; 0: no balancing)")
    g.add_argument("--moe-aux-loss", type=flags.nonnegative, help="weight of the sequence-level balance loss (default 0: off)")
    g = p.add_argument_group("batch and optimizer (unset values follow the depth's scaling rules)")
    g.add_argument("--total-batch-size", type=flags.positive_int, help="tokens per optimizer step, across accumulation and ranks")
    g.add_argument("--device-batch-size", type=flags.positive_int, help="rows per forward pass; lower it on out-of-memory")
    g.add_argument("--matrix-lr", type=flags.nonnegative, help="Muon learning rate for the block matrices")
    g.add_argument("--embedding-lr", type=flags.nonnegative, help="AdamW learning rate for embeddings at width 768 (x (width/768)^-0.5)")
    g.add_argument("--unembedding-lr", type=flags.nonnegative, help="AdamW learning rate for the output head at width 768 (likewise)")
    g.add_argument("--scalar-lr", type=flags.nonnegative, help="AdamW learning rate for per-layer scalars")
    g.add_argument("--weight-decay", type=flags.nonnegative, help="cautious weight decay of the Muon matrices")
    g.add_argument("--warmup-frac", type=flags.fraction, default=0.0, help="fraction of the budget spent warming up the LR")
    g.add_argument("--warmdown-frac", type=flags.fraction, default=0.5, help="fraction of the budget at the end spent decaying the LR")
    g.add_argument("--final-lr-frac", type=flags.fraction, default=0.0, help="LR at the end, as a fraction of the peak")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-tokens", type=flags.positive_int, help="validation target tokens scored for val_bpb")
    g.add_argument("--eval-every", type=flags.count, default=0, help="also evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-core-every", type=flags.count, default=0,
                   help="CORE every N steps and after the last (0: never): the first "
                        f"{core_eval.TRAIN_ITEMS} items of each task; needs `llmlabs prepare core` first")
    g.add_argument("--eval-split", choices=["val", "test", "none"], default="val",
                   help="split of the final evaluation (test: held-out confirmation runs only; none: no final "
                        "evaluation, samples or plot: the autoresearch runner scores the checkpoint in a process of "
                        "its own)")
    g.add_argument("--run-dir", help="where config, metrics, checkpoints and the summary go (default: runs/<time>-d<depth>)")
    g.add_argument("--save-every", type=flags.count, default=0,
                   help="also checkpoint every N steps (0: only at the end and on Ctrl-C); the newest "
                        f"{checkpoint.KEEP} are kept, so --resume can fall back if the newest is damaged")
    g.add_argument("--tensorboard", action="store_true", help="also log metrics to TensorBoard in RUN/tb")
    g.add_argument("--wandb", action="store_true",
                   help="also log metrics to Weights & Biases in RUN/wandb ($WANDB_PROJECT; WANDB_MODE=offline: no network)")
    g = p.add_argument_group("system")
    g.add_argument("--device", help="cpu | cuda | mps (default: best available)")
    g.add_argument("--fp8", choices=(*fp8.RECIPES, "none"), help="block matmuls in float8 (torchao; GPUs of compute "
                   "capability 8.9+); evaluation and checkpoints stay bf16 (default: fp8.RECIPE, which is None: off; "
                   "none: off whatever fp8.RECIPE says, e.g. a sweep's bf16 cells)")
    g.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA (slower; quicker start)")
    g.add_argument("--attention", choices=["auto", "fa3", "cudnn", "flash", "sdpa", "flex", "cpu"], help="force an attention backend")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights and the data order")
    g.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its newest checkpoint")


def _check_resume_flags(args):
    """--resume continues a run exactly as its config.json says: a flag that would change it is an error
    naming it (only --device, to move the run, goes with it)."""
    p = argparse.ArgumentParser()
    add_args(p)
    defaults = vars(p.parse_args([]))
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in ("resume", "device") and k in defaults and v != defaults[k]]
    if given:
        raise LabError(f"--resume {args.resume} continues the run as its config.json says, so {', '.join(given)} "
                       "would be ignored: drop them, or start a new run with them")


def run(args):
    return train(args)


def main(argv=None):
    """In-process entry for tests and other modules: main(["--tokens", "1e5", ...])."""
    import argparse

    p = argparse.ArgumentParser()
    add_args(p)
    return train(p.parse_args(argv))


def resolve_config(args, device):
    """Fill every unset flag from the preset for the hardware, then (in setup) from the depth's
    scaling rules. The result is the complete, self-describing run configuration (RUN/config.json).

    With no --depth the preset is a fixed experiment, batch and learning rates included. With --depth
    the preset only supplies the shape (aspect, head size, context, windows) and the budget; batch,
    learning rates and decay come from the scaling rules, and the device batch shrinks as the width
    grows, so activation memory stays near the preset's. Unless --device-batch-size is given, a GPU
    where the estimate says twice the rows fit takes them (ACT_BYTES)."""
    preset = dict(GPU_PRESET if device.type == "cuda" else CPU_PRESET)
    cfg = {k: v for k, v in vars(args).items() if v is not None}
    if any(k in cfg for k in BUDGETS):  # the user's budget replaces the preset's
        preset = {k: v for k, v in preset.items() if k not in BUDGETS}
    rows_given = "device_batch_size" in cfg
    if "depth" in cfg and cfg["depth"] != preset["depth"]:
        for k in EXPERIMENT_KEYS:
            preset.pop(k, None)
        if not rows_given:
            width = preset["depth"] * preset["aspect_ratio"]
            new_width = cfg["depth"] * cfg.get("aspect_ratio", preset["aspect_ratio"])
            cfg["device_batch_size"] = max(1, 2 ** math.floor(math.log2(preset["device_batch_size"] * width / new_width)))
    for k, v in preset.items():
        cfg.setdefault(k, v)
    cfg["device"] = device.type  # what --resume continues on
    recipe = cfg.get("fp8", fp8.RECIPE)  # --fp8, else the research surface's knob
    cfg["fp8"] = None if recipe == "none" else recipe
    if cfg["fp8"]:
        fp8.check(cfg["fp8"], device)
    if device.type == "cuda" and not rows_given:
        width = cfg["depth"] * cfg["aspect_ratio"]
        doubled = ACT_BYTES * cfg["depth"] * 2 * cfg["device_batch_size"] * width * cfg["seq_len"]
        if doubled <= MEM_FRACTION * preflight.gpu_memory(device):
            cfg["device_batch_size"] *= 2
    return cfg


def _model_config(cfg, vocab_size, depth=None):
    """The GPTConfig of a run config (at another depth where given): the depth dial with the run's shape."""
    from llmlabs.config import config_for_depth

    return config_for_depth(depth or cfg["depth"], vocab_size=vocab_size, sequence_len=cfg["seq_len"],
                            aspect_ratio=cfg["aspect_ratio"], head_dim=cfg["head_dim"], n_kv_head=cfg.get("n_kv_head"),
                            window_pattern=cfg["window_pattern"], short_window=cfg.get("short_window"),
                            **{k: cfg[k] for k in MOE_KEYS if cfg.get(k) is not None})


def train(args):
    with ExitStack() as held:  # the run directory's lock, taken in _train, lasts until the run returns
        return _train(args, held)


def _train(args, held):
    t_start = time.time()
    from llmlabs import attention

    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.exists():
            raise LabError(f"--resume {run_dir}: no config.json there; give a run directory of `llmlabs train`")
        cfg = json.loads(cfg_path.read_text())
        _check_resume_flags(args)
        if cfg.get("moe_experts") and (saved := checkpoint.saved_model_config(run_dir)):
            for k in MOE_KEYS:  # an MoE run begun before config.json named every knob: the checkpoint's
                if k in saved:  # values, not today's defaults (GPTConfig.moe_bias_rate has changed)
                    cfg.setdefault(k, saved[k])
        device, rank, _, world = compute_init(args.device or cfg.get("device"))
        if not args.device and cfg.get("device"):
            print0(f"resuming on {device.type}, the run's own device (--device moves it)")
        if cfg.get("fp8") and (why := fp8.unsupported(device)):  # the checkpoint's weights are bf16/fp32
            print0(f"the run trained with --fp8 {cfg['fp8']}, but {why}: continuing in bf16")
            cfg["fp8"] = None
        cfg["device"] = device.type
    else:
        device, rank, _, world = compute_init(args.device)
        cfg = resolve_config(args, device)
        run_dir = Path(cfg.get("run_dir") or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-d{cfg['depth']}")
    core_tasks = core_eval.load_tasks() if cfg.get("eval_core_every") else None  # no bundle: refused before any write
    core = None
    if rank == 0:  # two runs writing one directory would interleave their checkpoints and metrics
        make_dir(run_dir, "--resume" if args.resume else "--run-dir")
        held.enter_context(checkpoint.lock_run(run_dir))
    if cfg.get("attention"):
        attention.set_backend(cfg["attention"])

    run = setup(cfg, device, rank, world)
    data, mcfg, model, optimizer, loader, mm = run.data, run.mcfg, run.model, run.optimizer, run.loader, run.mm
    counts, flops_per_token, accum = run.counts, run.flops_per_token, run.accum
    B, T = cfg["device_batch_size"], cfg["seq_len"]
    budget_tokens = _token_budget(cfg, counts, flops_per_token)
    if budget_tokens is None and "time_budget" not in cfg:
        raise LabError("no budget: give --time-budget, --tokens, --target-flops or --param-data-ratio")
    if budget_tokens and (warning := preflight.passes_warning(budget_tokens, data, "this budget")):
        print0(warning)
    # a time budget's tokens are projected after 10 timed steps or a tenth of the budget, whichever comes first
    passes_checked = budget_tokens is not None

    # ---- run directory and resume
    if not args.resume:
        if checkpoint.candidates(run_dir):
            raise LabError(f"{run_dir} already holds a run: pass --resume {run_dir} to continue it, or another --run-dir")
    cfg["run_dir"] = str(run_dir)
    step, tokens_done, timed_tokens, train_time = 0, 0, 0, 0.0
    if args.resume:
        ck = checkpoint.load_newest(run_dir, device)
        if ck is None:
            raise LabError(f"--resume {run_dir}: no checkpoint in it (checkpoints/ empty or missing); start a new run instead")
        if ck["state"]["tokenizer_hash"] != data.tokenizer.hash:
            raise LabError(f"--resume {run_dir}: its tokenizer differs from the one of {data.path}: resume with the "
                           "run's own data directory")
        model.load_state_dict(ck["model"])
        if mm:
            mm.load_state_dict(ck["state"]["encoder"])
        optimizer.load_state_dict(ck["optimizer"])
        loader.load_state_dict(ck["state"]["loader"])
        checkpoint.set_rng_state(ck["rng"])
        step, tokens_done = ck["step"], ck["state"]["tokens_done"]
        timed_tokens, train_time = ck["state"]["timed_tokens"], ck["state"]["train_time"]
        print0(f"resumed {run_dir} at step {step} ({tokens_done / 1e6:.2f}M tokens)")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg)
        data.tokenizer.save(run_dir / "tokenizer.json")  # sample/eval work even if the data dir moves
    metrics_path = run_dir / "metrics.jsonl"
    log = tracking.Metrics(run_dir, cfg, step if args.resume else None) if rank == 0 else None  # rank 0 writes

    use_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()
    compiled = use_cuda and not cfg.get("no_compile")
    lm = torch.compile(model, fullgraph=True) if compiled else model
    fwd = mm.loss_fn(lm) if mm else lm  # a vision run: the encoder eager (compiling it gained nothing, vision_speed)
    untimed_steps = UNTIMED_STEPS if compiled else EAGER_UNTIMED_STEPS
    peak = peak_flops(device)
    print0(f"data: {data.path} (data_id {data.data_id}; {data.num_tokens('train'):,} train tokens)")
    print0(f"model: depth {cfg['depth']}, width {mcfg.n_embd}, {mcfg.n_head} heads, {counts['total'] / 1e6:.1f}M params, "
           f"{flops_per_token / 1e6:.1f} MFLOP/token{' (LM + vision encoder)' if mm else ''}; batch {cfg['total_batch_size']} tokens = {B} x {T} x "
           f"{world} ranks x {accum} accum; attention {attention.describe(device, head_dim=mcfg.head_dim)}")
    print0(f"optimizer: Muon matrix lr {cfg['matrix_lr']:.4g}; AdamW embedding {cfg['embedding_lr']:.4g}, unembedding "
           f"{cfg['unembedding_lr']:.4g}, scalars {cfg['scalar_lr']:.4g}; weight decay {cfg['weight_decay']:.4g}" +
           ("" if run.lr_batch in (None, cfg["total_batch_size"]) else f" (the scaling rules' for a {run.lr_batch:,}-token"
            f" batch, not this run's {cfg['total_batch_size']:,}; --matrix-lr and the others set them)"))
    if run.fp8_layers:
        print0(fp8.describe(peak, cfg["fp8"], run.fp8_layers))
    if run.distributed:
        print0(f"distributed MuonAdamW over {world} rank(s): {optimizer.comm_bytes_per_step() / 2**20:.1f} MiB sent per "
               f"rank per step, {optimizer.comm_bytes_per_step(8) / 2**20:.1f} MiB at 8 ranks (gradients reduce-scattered, "
               "weights all-gathered)")

    def progress():
        fracs = [tokens_done / budget_tokens] if budget_tokens else []
        if "time_budget" in cfg:
            fracs.append(train_time / cfg["time_budget"])
        return max(fracs)

    def save_state():
        state = {"loader": loader.state_dict(), "tokens_done": tokens_done, "train_time": train_time,
                 "timed_tokens": timed_tokens, **({"encoder": mm.state_dict()} if mm else {}),
                 "model_config": vars(mcfg), "run_config": cfg, "tokenizer_hash": data.tokenizer.hash}
        opt_state = optimizer.state_dict()  # with several ranks a collective: every rank gathers its share
        return checkpoint.save(run_dir, step, model, opt_state, state) if rank == 0 else None

    stop = {"sigint": False}
    prev_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(sigint=True))
    last_status = 0.0
    events = _event_pipe()
    try:
        # ---- the loop
        if step >= untimed_steps:
            events("timed")
        while progress() < 1.0:
            p = progress()
            _set_schedules(optimizer, p, cfg)
            t0 = time.time()  # the previous step ended in a host sync, so this clock is honest
            try:
                loss, moe_stats = train_step(fwd, model, optimizer, loader, accum, autocast, world)
            except torch.cuda.OutOfMemoryError:
                raise LabError(f"CUDA out of memory at --device-batch-size {B} (depth {cfg['depth']}, seq {T}): "
                               f"lower --device-batch-size (accumulation keeps the total batch)") from None
            loss_val = loss.item()  # the one host sync per step
            dt = time.time() - t0
            if not math.isfinite(loss_val):
                good = checkpoint.latest(run_dir)
                raise LabError(f"loss became {loss_val} at step {step + 1}: stopped; last good checkpoint "
                               f"{good or 'none (use --save-every)'}; lower the learning rates or check the last change")
            step += 1
            events(f"step {step}")
            if step == untimed_steps:
                events("timed")
            tokens_done += cfg["total_batch_size"]
            if step > untimed_steps:
                train_time += dt
                timed_tokens += cfg["total_batch_size"]
            tok_s = cfg["total_batch_size"] / dt
            if not passes_checked and train_time > 0 and (step >= untimed_steps + 10
                                                           or train_time >= 0.1 * cfg["time_budget"]):
                passes_checked = True
                projected = timed_tokens / train_time * cfg["time_budget"]
                if warning := preflight.passes_warning(projected, data, f"--time-budget {cfg['time_budget']:g} s at "
                                              f"{timed_tokens / train_time / 1e3:.0f}K tokens/s"):
                    print0(("\n" if sys.stdout.isatty() else "") + warning)  # below a status line drawn with \r
            mfu = 100 * flops_per_token * tok_s / (peak * world) if peak else None  # no known peak: CPU
            row = {"step": step, "loss": loss_val, "lr_mult": optimizer.param_groups[0]["lr"] /
                   optimizer.param_groups[0]["initial_lr"], "tok_per_sec": tok_s, "mfu": mfu,
                   "progress": progress(), "train_time": train_time, "tokens": tokens_done, **moe_stats}
            if log:
                log.write(row)
            if time.time() - last_status > (0.5 if sys.stdout.isatty() else 10) or progress() >= 1:
                last_status = time.time()
                _status(step, row)
            if cfg.get("eval_every") and step % cfg["eval_every"] == 0:
                ev = _evaluate(model, data, "val", cfg, device, autocast, mm)
                print0(f"\nstep {step}: val_bpb {ev['bpb']:.4f}")
                if log:
                    log.write({"step": step, "val_bpb": ev["bpb"], **_modalities(ev, "val")})
            if core_tasks and (step % cfg["eval_core_every"] == 0 or progress() >= 1):
                core = core_eval.evaluate_core(model, data.tokenizer, device, core_tasks, autocast=autocast,
                                               max_items=core_eval.TRAIN_ITEMS)["core"]
                print0(f"\nstep {step}: CORE {core:.4f}")
                if log:
                    log.write({"step": step, "core": core})
            if world > 1:  # Ctrl-C reaches the ranks at different steps: stop together, or the save's collectives hang
                flag = torch.tensor([float(stop["sigint"])], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop["sigint"] = bool(flag.item())
            if stop["sigint"]:
                path = save_state()
                print0(f"\ninterrupted at step {step}: checkpoint {path}; continue with "
                       f"`llmlabs train --resume {run_dir}`")
                return 130
            if cfg.get("save_every") and step % cfg["save_every"] == 0:
                save_state()
    except BaseException:
        if sys.stdout.isatty():  # end the status line drawn with \r, so the error starts a line of its own
            print0(flush=True)
        raise
    finally:
        signal.signal(signal.SIGINT, prev_handler)
    print0()

    # ---- final evaluation, samples, summary
    path = save_state()
    events("saved")
    if cfg["eval_split"] != "none":  # the seconds after the last step, said as they come
        print0(f"saved {path}; scoring {cfg['eval_split']}_bpb on {cfg['eval_tokens']:,} tokens ...", flush=True)
    try:
        res = None if cfg["eval_split"] == "none" else _evaluate(model, data, cfg["eval_split"], cfg, device, autocast, mm)
    except KeyboardInterrupt:  # the SIGINT handler is gone by now, but the training is already saved
        print0(f"\ninterrupted in the final evaluation: training is done and saved in {path}; "
               f"`llmlabs eval {run_dir}` gives its score")
        return 130
    tok_per_sec = timed_tokens / train_time if train_time > 0 else 0.0
    summary = {
        **({f"{cfg['eval_split']}_bpb": round(res["bpb"], 6), "unigram_bpb": round(res["unigram_bpb"], 6)}
           if res else {}),
        **(_modalities(res, cfg["eval_split"]) if res else {}),
        "training_seconds": round(train_time, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if use_cuda else 0.0,
        "mfu_percent": round(100 * flops_per_token * tok_per_sec / (peak * world), 2) if peak else None,
        "total_tokens_M": round(tokens_done / 1e6, 2),
        "data_passes": round(mm.passes(tokens_done, T) if mm else tokens_done / max(data.num_tokens("train"), 1), 2),
        "num_steps": step,
        "num_params_M": round(counts["total"] / 1e6, 2),
        **({"active_params_M": round(model.active_params() / 1e6, 2), "moe": _describe_moe(mcfg)}
           if mcfg.moe_experts else {}),
        "depth": cfg["depth"],
        "tok_per_sec": round(tok_per_sec),
        **({"eval_tokens": res["tokens"]} if res else {}),
        **({"core": round(core, 6)} if core is not None else {}),
        "attention": ",".join(f"{k}={v}" for k, v in attention.describe().items()),
        "device": torch.cuda.get_device_name(device) if use_cuda else device.type,
        "seed": cfg["seed"],
        "data_id": data.data_id,  # what it read: sweep table / fit refuse to pool cells of different data
        "run_dir": str(run_dir),  # where config, metrics, checkpoints, samples and the plot are
    }
    if rank == 0 and res:  # --eval-split none: the launcher scores the run; no time spent on extras
        print0(f"{cfg['eval_split']}_bpb {res['bpb']:.4f}; writing {'' if mm else 'samples.txt and '}loss.png ...",
               flush=True)
        if not mm:  # captioning an image is `llmlabs sample --image`'s job (not built yet)
            engine.write_samples(model, data, run_dir / "samples.txt")
        plots.loss(metrics_path, run_dir / "loss.png")
        if mcfg.moe_experts:
            plots.expert_load(metrics_path, run_dir / "expert_load.png")
    if rank == 0:
        atomic_write_json(run_dir / "summary.json", summary)
        log.close(summary)
    print0("---")
    for k, v in summary.items():
        print0(f"{k + ':':<18}{'n/a' if v is None else v}")
    if run.distributed:  # leave together: a rank exiting while rank 0 still writes samples aborts in gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def setup(cfg, device, rank=0, world=1):
    """Everything a training step needs, from a resolved config: the data directory, the model sized
    by the depth dial, the scaling-rule hyperparameters (filled into cfg where unset), the optimizer
    and the train loader. Shared with bench/train_speed.py, so the benchmark times this very step."""
    from llmlabs.scaling import hyperparams_for
    from llmlabs.data.loader import BestFitLoader
    from llmlabs.model import build_model

    seed_all(cfg["seed"])  # the same on every rank: replicas start identical; ranks differ in data only
    data = _open_data(cfg.get("data"), device)  # prepared once, never re-tokenized here
    cfg["data"] = str(data.path)
    mcfg = _model_config(cfg, data.tokenizer.vocab_size)
    if mcfg.moe_experts:  # config.json names every MoE knob, the unset ones at the defaults this run used
        for k in MOE_KEYS:
            cfg.setdefault(k, getattr(mcfg, k))
    rules, lr_given = hyperparams_for(mcfg), "matrix_lr" in cfg
    for k, v in rules.items():
        cfg.setdefault(k, v)
    T = cfg["seq_len"]
    # a forward pass never holds more rows than one optimizer step needs
    B = cfg["device_batch_size"] = min(cfg["device_batch_size"], max(1, cfg["total_batch_size"] // (T * world)))
    if cfg["total_batch_size"] % (step := B * T * world):
        near = max(step, round(cfg["total_batch_size"] / step) * step)
        raise LabError(f"a batch of {cfg['total_batch_size']:,} tokens (--total-batch-size, or without it the preset's or "
                       f"the scaling rules') is not a multiple of device batch x seq len x ranks = {B} x {T} x {world}: "
                       f"pass --total-batch-size {near} (the nearest multiple) or a --seq-len that divides it")
    preflight.check_memory(mcfg, B, device, lambda d: _model_config(cfg, mcfg.vocab_size, d))
    model = build_model(mcfg, device)
    fp8_layers = fp8.convert(model, cfg["fp8"]) if cfg.get("fp8") else []  # before compile and the optimizer
    mm = multimodal.setup(cfg, data, model, B, device, rank, world)  # None: a text run
    distributed = world > 1 or dist_info()[0]  # under torchrun even at one rank: its collectives run (NCCL check)
    optimizer = model.setup_optimizer(matrix_lr=cfg["matrix_lr"], embedding_lr=cfg["embedding_lr"],
                                      unembedding_lr=cfg["unembedding_lr"], scalar_lr=cfg["scalar_lr"],
                                      weight_decay=cfg["weight_decay"], distributed=distributed,
                                      extra_groups=mm.param_groups(cfg) if mm else ())
    loader = mm.loader if mm else BestFitLoader(data, "train", B, T, seed=cfg["seed"], rank=rank, world_size=world,
                                                device=device)
    return SimpleNamespace(data=data, mcfg=mcfg, model=model, optimizer=optimizer, loader=loader, mm=mm,
                           distributed=distributed, fp8_layers=fp8_layers,
                           lr_batch=None if lr_given else rules["total_batch_size"],  # the batch the LRs were made for
                           accum=cfg["total_batch_size"] // (B * T * world), counts=model.num_params(),
                           flops_per_token=model.flops_per_token() + (mm.flops_per_token() if mm else 0))


def train_step(fwd, model, optimizer, loader, accum, autocast, world=1):
    """One optimizer step over `accum` micro-batches; returns the mean loss as a device tensor (no
    host sync here: the caller decides when to read it) and, for an MoE model, the step's expert
    load statistics (after which the balancing biases move: model.balance_experts). With several
    ranks the optimizer (DistMuonAdamW) averages the gradients; the trainer sends nothing itself."""
    loss_sum = torch.zeros((), device=model.lm_head.weight.device)
    for _ in range(accum):
        x, y = next(loader)
        with autocast:
            loss = fwd(x, y)
        (loss / accum).backward()
        loss_sum += loss.detach()
    optimizer.step()  # with several ranks DistMuonAdamW, which averages the gradients over them
    optimizer.zero_grad(set_to_none=True)  # every group's: a vision encoder's too
    loader.prefetch()  # the next step's first batch, packed while the GPU runs the queued step
    if world > 1:  # the loss of the whole batch, as one process would log it (gloo has no AVG)
        torch.distributed.all_reduce(loss_sum)
    return loss_sum / (accum * world), model.balance_experts()


def _event_pipe():
    """events(text): one line to the launcher's pipe (EVENTS_FD_VAR), or nothing without one."""
    fd = os.environ.get(EVENTS_FD_VAR)
    if not fd:
        return lambda text: None
    pipe = os.fdopen(int(fd), "w", buffering=1)
    return lambda text: pipe.write(text + "\n")


def _open_data(path, device):
    """--data, else the offline default corpus for the device, prepared on first use: the Python
    standard library on a CPU, and on a GPU, whose budget reads far more tokens, stdlib + site-packages."""
    from llmlabs.data.prepare import default_data_dir, prepare
    from llmlabs.data.shards import DataDir

    if path:
        return DataDir.open(path)
    source = "pysrc" if device.type == "cuda" else "pystdlib"
    default = default_data_dir(source, 8192)
    if not (default / "manifest.json").exists():
        print0(f"no --data given and {default} is not prepared yet: preparing the offline default corpus {source} "
               "(once)")
        prepare(source, vocab_size=8192)
    return DataDir.open(default)


def _token_budget(cfg, counts, flops_per_token):
    options = []
    if cfg.get("tokens"):
        options.append(cfg["tokens"])
    if cfg.get("target_flops"):
        options.append(cfg["target_flops"] / flops_per_token)
    if cfg.get("param_data_ratio"):
        options.append(cfg["param_data_ratio"] * counts["total"])
    if any(o <= 0 for o in options) or cfg.get("time_budget", 1) <= 0:
        raise LabError("budgets must be positive")
    return min(options) if options else None


def lr_multiplier(p, warmup, warmdown, final):
    """Trapezoid on budget progress p in [0, 1]: linear warmup, flat, linear warmdown to `final`."""
    if warmup > 0 and p < warmup:
        return max(p, 1e-3) / warmup
    if p <= 1 - warmdown:
        return 1.0
    return final + (1 - final) * max(0.0, 1 - p) / warmdown


def _set_schedules(optimizer, p, cfg):
    lrm = lr_multiplier(p, cfg["warmup_frac"], cfg["warmdown_frac"], cfg["final_lr_frac"])
    ramp = min(p / MOMENTUM_RAMP, 1.0)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = 0.85 + 0.10 * ramp
            group["weight_decay"] = cfg["weight_decay"] * (1 - p)  # decays to 0 with the budget


def _evaluate(model, data, split, cfg, device, autocast, mm=None):
    from llmlabs.evaluate import evaluate_bpb

    autocast = autocast if device.type == "cuda" else None
    if mm:
        return mm.evaluate(model, split, batch_size=cfg["device_batch_size"], max_tokens=cfg["eval_tokens"],
                           autocast=autocast)
    return evaluate_bpb(model, data, split, batch_size=cfg["device_batch_size"], seq_len=cfg["seq_len"],
                        max_tokens=cfg["eval_tokens"], device=device, autocast=autocast)


def _modalities(res, split) -> dict:
    """Per-modality bpb for metrics and the summary (a vision run's caption_bpb and text_bpb), keyed by split."""
    return {f"{split}_{k}": round(res[k], 6) for k in ("caption_bpb", "text_bpb") if k in res}


def _status(step, row):
    """One status line. The ETA extrapolates the timed steps only: wall time since the start would
    count torch.compile's first steps and promise a run many times its budget."""
    p, spent = row["progress"], row["train_time"]
    # the last step of a time budget ends past 100%: nothing is left, not a negative wait
    eta = f"{spent * max(1 - p, 0) / p:5.0f}s" if spent > 0 and p > 0 else "    ?"
    line = (f"step {step:5d} | {100 * p:5.1f}% | loss {row['loss']:.4f} | {row['tok_per_sec'] / 1e3:8.1f}K tok/s | "
            f"MFU {'   n/a' if row['mfu'] is None else format(row['mfu'], '5.1f') + '%'} | ETA {eta}")
    print0(("\r" + line) if sys.stdout.isatty() else line, end="" if sys.stdout.isatty() else "\n", flush=True)


def _describe_moe(mcfg) -> str:
    layers = mcfg.moe_layer_ids()
    return (f"{mcfg.moe_experts} experts top-{mcfg.moe_top_k} + {mcfg.moe_shared} shared, width "
            f"{mcfg.expert_width()}, {len(layers)} of {mcfg.n_layer} layers, dropless")
