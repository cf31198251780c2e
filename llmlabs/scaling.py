"""The scaling rules: a GPTConfig -> the batch size, learning rates and weight decay the trainer
uses (`hyperparams_for`), and the parameter count scaling laws use (`scaling_params`).

The rules are nanochat's (karpathy/nanochat, scripts/base_train.py, early 2026); each says where it
comes from. Apart from config.py (the shape) because the count builds the model (model.py imports
config.py, so config.py cannot import the model back)."""
import math

import torch

from llmlabs.config import GPTConfig, config_for_depth
from llmlabs.model import GPT

# Reference point the rules below extrapolate from (nanochat base_train.py): LRs and weight decay
# were tuned at d12 with a 2**19-token batch.
REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2**19
TOKENS_PER_PARAM = 12  # nanochat's compute-optimal tokens : scaling-params ratio (its dev/LOG.md)


def scaling_params(config: GPTConfig) -> int:
    """Parameters that scaling laws count: block matrices + lm_head (nanochat found this gives the
    cleanest laws; embeddings and scalars are left out), and of an MoE only the active ones (router,
    k routed and the shared experts: GPT.active_params), so an MoE and a dense model of equal active
    parameters get the same batch, learning rates and horizon. Counted on the meta device."""
    with torch.device("meta"):
        return GPT(config).active_params()


def hyperparams_for(config: GPTConfig) -> dict:
    """Batch size, learning rates and weight decay for a config, by nanochat's rules:

    - horizon: target_tokens = 12 * scaling_params (nanochat --target-param-data-ratio 12).
    - batch: B = B_ref * (D / D_ref) ** 0.383, rounded to a power of two, with B_ref = 2**19 tokens
      and D_ref the d12 horizon ("Power Lines", arXiv 2505.13738: B_opt grows as D^0.383).
    - every LR * sqrt(B / B_ref): the square-root rule for Adam, assumed for Muon too (nanochat).
    - weight decay = 0.28 * sqrt(B / B_ref) * (D_ref / D): keeps the AdamW timescale
      B / (lr * wd * D) fixed (arXiv 2405.13698), applied to Muon as nanochat does.
    - base LRs at d12 (nanochat base_train defaults): matrix 0.02 (Muon), embedding 0.3,
      unembedding 0.008, scalars 0.5. The embedding and unembedding LRs here are for width 768:
      GPT.setup_optimizer multiplies them by (n_embd / 768) ** -0.5 (nanochat's muP-style rule),
      so pass these numbers to it unchanged.
    """
    ref = config_for_depth(REFERENCE_DEPTH, vocab_size=config.vocab_size, sequence_len=config.sequence_len,
                           head_dim=config.head_dim, window_pattern=config.window_pattern,
                           short_window=config.short_window)
    target_tokens = TOKENS_PER_PARAM * scaling_params(config)
    ref_tokens = TOKENS_PER_PARAM * scaling_params(ref)
    batch = 2 ** round(math.log2(REFERENCE_BATCH * (target_tokens / ref_tokens) ** 0.383))
    lr_scale = (batch / REFERENCE_BATCH) ** 0.5
    return {
        "total_batch_size": batch,
        "target_tokens": target_tokens,
        "matrix_lr": 0.02 * lr_scale,
        "embedding_lr": 0.3 * lr_scale,
        "unembedding_lr": 0.008 * lr_scale,
        "scalar_lr": 0.5 * lr_scale,
        "weight_decay": 0.28 * lr_scale * ref_tokens / target_tokens,
    }
