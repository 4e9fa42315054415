"""Greedy generations of a model for fixed prompts (``eval.generate``), so that a person can read
every model of a run side by side in the report.

Each prompt is one user turn rendered with the run's chat template and its generation prompt
(``data.chat_template`` or the tokenizer's own), or the plain text without a template. The
megatron model decodes greedily, the whole sequence re-read each step (no KV cache: a few dozen
tokens for a handful of prompts), until the end-of-turn token or ``max_new_tokens``.
"""

from __future__ import annotations

import torch

from pipelines.model.build import forward_logits


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model sees it: a user turn with the generation prompt, or plain text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def greedy(model, ids: list[int], new_tokens: int, vocab_size: int, stop: int | None, layout) -> list[int]:
    """``new_tokens`` greedy continuations of ``ids`` (fewer when ``stop`` comes)."""
    tokens = layout.place(torch.tensor([ids], dtype=torch.int64))
    out = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = forward_logits(model, tokens)[0, -1, :vocab_size]
            token = int(logits.argmax())
            if token == stop:
                break
            out.append(token)
            tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
    return out


def generations(model, tokenizer, prompts, new_tokens: int, vocab_size: int, layout) -> list[dict]:
    """``[{prompt, text, tokens}]`` for each prompt (``tokens``: how many it generated before the
    end-of-text token or the limit)."""
    found = []
    for prompt in prompts:
        ids = greedy(model, prompt_ids(tokenizer, str(prompt)), new_tokens, vocab_size, tokenizer.eos_token_id, layout)
        found.append({"prompt": str(prompt), "text": tokenizer.decode(ids, skip_special_tokens=True),
                      "tokens": len(ids)})
    return found
