"""Prune-then-distill pipeline for Llama-family models on megatron-core and NVIDIA ModelOpt."""

from pipelines.experiment import register_resolvers

register_resolvers()
