"""Operator tools: gpu-check."""
