"""Hand-written kernels (Triton, cuDNN) that the research surface reaches only through named ops."""
