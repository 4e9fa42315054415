"""Hugging Face interchange: the Llama weight map, safetensors streaming, GGUF and conversion."""
