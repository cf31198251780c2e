"""Named ops and the hand-written kernels (Triton, cuDNN) behind them. What is trained is what is
written: model.py reaches a kernel only by calling a named op of ops.py, whose reference (plain
PyTorch, the formula's one definition) is what the op means. Eager runs the reference (evaluation,
sampling, the CPU); a compiled forward may run the op's kernel instead, where the kernel is usable,
because tests hold the kernel to the reference (against float64, tests/test_model.py, on a GPU).
attention.py's `attention()` is the same kind of op: every backend, cuDNN's included, computes the
one causal (windowed) softmax attention.

To change the math, do not edit a kernel or an op: replace the op's call in model.py with your own
code. The kernel is then not used, and training, evaluation and sampling all run what you wrote.

    ops.py               relu2_mlp, rope_norm, softcap_logits, softcap_cross_entropy (and their
                         parts: norm, softcap, apply_rope), each with the kernel it dispatches to
    triton_mlp.py        ReLU^2 inside two Triton matmuls' epilogues
    triton_loss.py       lm_head's matmul, then the softcap cross-entropy and its gradient in one kernel
    triton_rope_norm.py  RoPE + QK-norm as two Triton kernels
    cudnn_attention.py   causal and sliding-window attention on cuDNN (attention.py's `cudnn` backend)"""
