"""Multimodal training speed: a SigLIP2-so400m-shaped tower (random weights: the same FLOPs) feeding a
d12 LM, the whole training step (tower forward, merger, LM forward + backward, optimizer), on a GPU.

    PYTHONPATH=. python3 bench/vision_speed.py [--depth 12] [--images 64] [--image-size 384] [--caption 45]
        [--accum N] [--vision-train] [--steps 10] [--variants eager,lm,layers,all,fp8,fp8layers,fp8all] [--profile]
        [--out bench/results/vision_speed-h200.jsonl]

One row per image as `llmlabs train --vision` builds them: BOS, <|image_start|>, the 2x2-merged patch
tokens (384 px / patch 16 = 24 x 24 patches -> 144 tokens), <|image_end|>, a caption (random tokens),
3D MRoPE positions; random pixels. Variants, one process: eager; the LM compiled (what `llmlabs
train` runs); the LM and each of the tower's layers compiled (`layers`, regional compilation); the
LM and the encoder compiled whole; and, last, fp8 / fp8layers / fp8all: lm, layers and all with the
frozen tower's linears in float8 (torchao's dynamic-activation inference recipe, a scale per row; not yet
in `llmlabs train`: this measures whether it would pay). MFU stays in bf16-equivalent FLOPs.

A step is what training runs: --accum micro-batches of --images rows, then one optimizer step.
The two are timed apart (medians over --steps) and the step is accum x micro-batch + optimizer;
--accum defaults to the depth's preset batch (scaling.hyperparams_for) over the rows' tokens, as
`llmlabs train` divides it (42 at d12: the optimizer is a small part of a step, as in training).
MFU counts what the step computes, as train.py does (VisionEncoder.flops_per_image): the LM's
training FLOPs per token (model.flops_per_token: 6 per weight, attention) over every position, plus
the encoder's forward FLOPs per image, times 3 where it trains (the merger always; the tower with
--vision-train) and once where it only runs forward (a frozen tower), against the bf16 peak.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import transformers

from llmlabs.common import peak_flops
from llmlabs.config import config_for_depth
from llmlabs.model import build_model
from llmlabs.multimodal import encoder_param_groups
from llmlabs.scaling import hyperparams_for
from llmlabs.vision import VisionEncoder, VisionTower, mask_patch_targets, mrope_positions

import train_speed  # bench/ is the script's own directory, first on sys.path

VARIANTS = ("eager", "lm", "layers", "all", "fp8", "fp8layers", "fp8all")
FP8 = ("fp8", "fp8layers", "fp8all")
LAYERS = ("layers", "fp8layers")
# SigLIP2 so400m/16 (google/siglip2-so400m-patch16-384's vision config); tiny: a dry run's
TOWERS = {"so400m": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         patch_size=16),
          "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=4)}


def rows(B, grid, caption, vocab, device, seed=0):
    """idx, targets, positions, patch_mask of B rows; ids: 0 BOS, 1 image start, 2 patch, 3 image end."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    text = torch.randint(4, vocab, (B, caption + 1), generator=g)
    full = torch.cat([torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.long),
                      torch.full((B, n), 2), torch.full((B, 1), 3), text], dim=1)
    idx, targets = full[:, :-1], mask_patch_targets(full[:, 1:], 2)
    return {"idx": idx.to(device), "targets": targets.to(device), "positions": mrope_positions(idx, 2, grid).to(device),
            "patch_mask": (idx == 2).to(device)}


def tower_layers(tower):
    """The transformer layers of a SigLIP/SigLIP2 tower (encoder.layers, below vision_model in some
    transformers releases)."""
    lists = [m for name, m in tower.model.named_modules() if name.endswith("encoder.layers")]
    if len(lists) != 1:
        sys.exit(f"found {len(lists)} encoder.layers lists in the tower (transformers {transformers.__version__})")
    return list(lists[0])


def median_ms(fn, reps, cuda):
    """fn's median wall time in ms over reps calls, after one untimed call; the GPU synced around each."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--images", type=int, default=64, help="images (rows) per step")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--caption", type=int, default=45, help="caption tokens per row")
    p.add_argument("--vision-train", action="store_true", help="train the tower too (default frozen, as pretrained)")
    p.add_argument("--accum", type=int, help="micro-batches per optimizer step (default: the preset's batch, as train)")
    p.add_argument("--steps", type=int, default=10, help="timed micro-batches, and timed optimizer steps")
    p.add_argument("--profile", action="store_true", help="print the costliest CUDA kernels of 3 micro-batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="eager,lm,layers",
                   help="eager | lm (LM compiled) | layers (LM and each tower layer compiled) | all (LM and encoder "
                        "compiled) | fp8, fp8layers, fp8all (as lm, layers, all, the frozen tower's linears in "
                        "float8); fp8 ones last, they convert the tower")
    p.add_argument("--tower", choices=TOWERS, default="so400m")
    p.add_argument("--device", default="cuda", help="cuda; cpu: a dry run of the script (eager, no MFU)")
    p.add_argument("--out")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    variants = a.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants {','.join(bad)}: choose from {', '.join(VARIANTS)}")
    fp8_first = next((i for i, v in enumerate(variants) if v in FP8), len(variants))
    if fp8_first < len(variants) and (a.vision_train or not cuda or any(v not in FP8 for v in variants[fp8_first:])):
        p.error("the fp8 variants need --device cuda, a frozen tower (no --vision-train), and to come last")
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/vision_speed.py measures a CUDA GPU: torch sees none here (--device cpu: a dry run)")
    shape = TOWERS[a.tower]
    tower = VisionTower.from_config(num_patches=(a.image_size // shape["patch_size"]) ** 2,
                                    trainable=a.vision_train, **shape)
    grid_side = a.image_size // shape["patch_size"] // 2
    T = 1 + 1 + grid_side**2 + 1 + a.caption
    mcfg = config_for_depth(a.depth, vocab_size=8192, sequence_len=T, window_pattern="L")
    model = build_model(mcfg, device)
    encoder = VisionEncoder(tower, mcfg.n_embd, a.image_size).to(device)
    hp = hyperparams_for(mcfg)
    opt = model.setup_optimizer(matrix_lr=hp["matrix_lr"], embedding_lr=hp["embedding_lr"],
                                unembedding_lr=hp["unembedding_lr"], scalar_lr=hp["scalar_lr"],
                                weight_decay=hp["weight_decay"],
                                extra_groups=encoder_param_groups(encoder, hp["matrix_lr"], hp["weight_decay"]))
    batch = rows(a.images, encoder.merged_grid, a.caption, mcfg.vocab_size, device)
    pixels = torch.randint(0, 256, (a.images, a.image_size, a.image_size, 3), dtype=torch.uint8, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    tower_fwd, merger_fwd = encoder.flops_per_image()
    micro_flops = (model.flops_per_token() * a.images * T
                   + a.images * (tower_fwd * (3 if a.vision_train else 1) + 3 * merger_fwd))
    accum = a.accum or max(1, hp["total_batch_size"] // (a.images * T))
    peak = peak_flops(device)
    print(f"tower {sum(q.numel() for q in tower.parameters()) / 1e6:.0f}M params, {tower_fwd / 1e9:.1f} GFLOP forward "
          f"per image; merger {merger_fwd / 1e9:.2f} GFLOP; LM d{a.depth} {model.num_params()['total'] / 1e6:.0f}M "
          f"params, {T} positions a row; {micro_flops / 1e12:.2f} TFLOP a micro-batch, {accum} a step", flush=True)

    results = []
    tower_fp8 = False
    for variant in variants:
        if variant in FP8 and not tower_fp8:
            # torchao's FP8 inference recipe (weights cast once, activations per call, a scale per row):
            # the frozen tower is 70% of a micro-batch and near 36% of the bf16 peak (vision_speed at 38a10df)
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

            quantize_(tower.model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            tower_fp8 = True
        lm = torch.compile(model, fullgraph=True) if variant != "eager" and cuda else model
        # fullgraph: a graph break (transformers releases differ: a per-image loop, a mask's .item())
        # would fragment the tower into pieces that compile to nothing faster; the variant says why instead
        enc = torch.compile(encoder, fullgraph=True) if variant in ("all", "fp8all") and cuda else encoder
        # regional compilation: each of the tower's layers compiled in place, the same code for all 27,
        # so one layer's compile serves every layer (the whole tower's fullgraph compile outran a
        # 200 s call at fb0eb45); embeddings, the last norm and the merger stay eager
        layers = tower_layers(tower) if variant in LAYERS and cuda else []
        for layer in layers:
            layer.compile(fullgraph=True, dynamic=False)

        def micro():
            with autocast:
                feats = enc(pixels).flatten(0, 1)
                loss = lm(batch["idx"], batch["targets"], positions=batch["positions"], patch_mask=batch["patch_mask"],
                          patch_embeds=feats)
            (loss / accum).backward()

        t0 = time.time()
        for _ in range(a.warmup):
            micro()
            opt.step()
            opt.zero_grad(set_to_none=True)
        warm = time.time() - t0
        # the optimizer timed with gradients in place (micro's, accumulated): without them it skips
        micro_ms, opt_ms = median_ms(micro, a.steps, cuda), median_ms(opt.step, a.steps, cuda)
        opt.zero_grad(set_to_none=True)
        if a.profile and cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    micro()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=80))
        with torch.no_grad(), autocast:
            enc_ms = median_ms(lambda: enc(pixels), 5, cuda)
        dt = (accum * micro_ms + opt_ms) / 1e3
        res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu", "commit": train_speed._commit(),
               "command": "PYTHONPATH=. python3 " + " ".join(sys.argv), "torch": torch.__version__,
               "transformers": transformers.__version__, "variant": variant, "depth": a.depth,
               "images": a.images, "image_size": a.image_size, "positions": T, "vision_train": a.vision_train,
               "accum": accum, "micro_ms": round(micro_ms, 1), "optimizer_ms": round(opt_ms, 1),
               "step_ms": round(1e3 * dt, 1), "images_per_s": round(accum * a.images / dt, 1),
               "tok_per_s": round(accum * a.images * T / dt),
               "mfu": round(100 * accum * micro_flops / dt / peak, 2) if peak else None,
               "encoder_forward_ms": round(enc_ms, 1), "warmup_s": round(warm, 1),
               "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
        results.append(res)
        print(json.dumps(res), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")
        for layer in layers:
            layer._compiled_call_impl = None  # back to eager for the next variant
        torch._dynamo.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    print(f"\n{'variant':>8} {'micro ms':>8} {'optim ms':>8} {'images/s':>9} {'tokens/s':>10} {'MFU %':>6} "
          f"{'encoder fwd ms':>14} {'peak GB':>7}")
    for r in results:
        print(f"{r['variant']:>8} {r['micro_ms']:>8} {r['optimizer_ms']:>8} {r['images_per_s']:>9} {r['tok_per_s']:>10,} "
              f"{str(r['mfu']):>6} {r['encoder_forward_ms']:>14} {str(r['peak_mem_gb']):>7}")


if __name__ == "__main__":
    main()
