"""The megatron-core GPT model: architecture, build, layer specs and checkpoints."""
