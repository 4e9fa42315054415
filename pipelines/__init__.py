"""Prune-then-distill pipeline for Llama-family models on megatron-core and NVIDIA ModelOpt."""

from pipelines.core.experiment import register_resolvers

register_resolvers()
