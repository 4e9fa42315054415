"""Corpora, tokenizers and token windows, and the teacher-logits cache format."""
