"""Tensor operations: the distillation losses, attention, RoPE, SwiGLU and the embedding gradient."""
