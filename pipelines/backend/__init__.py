"""The distributed runtime, kernels and their fallbacks, and the CPU shims under megatron-core."""
