"""Scoring: MMLU, the corpus task, lm-evaluation-harness, recovery statistics and sweep results."""
