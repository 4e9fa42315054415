"""Prune-then-distill pipeline for Llama-family models on megatron-core and NVIDIA ModelOpt."""
