"""Inference speed and memory of Hugging Face models through transformers.

:func:`measure` times every model on the same prompts in one process, the models' order
alternating between repeats (after a warm-up of each), with SDPA attention, greedy decoding and
the same settings for all:

- **prefill tokens/s**: one forward pass over a ``prompt_length`` prompt at batch 1;
- **time to first token**: ``generate`` of one new token at batch 1;
- **decode tokens/s** at batch 1 and at ``batch``: ``decode_tokens`` greedy steps with the KV
  cache after the prompt's prefill (which is not in that time), ``batch * n / t``;
- **memory**: the weights' bytes plus the KV cache at ``context`` tokens and ``batch``
  sequences (both in the serving dtype), and on a GPU what the batched decode allocated beyond
  the weights (its KV cache and activations), measured.

Each figure is the median over ``repeats`` with its spread (min and max).
"""

from __future__ import annotations

import statistics
import time

import torch

BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


def kv_cache_bytes(arch: dict, context: int, batch: int, element_bytes: int = 2) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``context`` tokens."""
    return 2 * int(arch["num_layers"]) * int(arch["num_query_groups"]) * int(arch["kv_channels"]) \
        * context * batch * element_bytes


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, device) -> float:
    _sync(device)
    started = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - started


def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, device) -> float:
    """Seconds for ``new_tokens`` greedy decode steps after a prefill of ``prompt`` (KV cache on;
    the prefill itself is not timed)."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def steps():
        nonlocal cache, token
        for _ in range(new_tokens):
            step = model(token, past_key_values=cache, use_cache=True)
            cache, token = step.past_key_values, step.logits[:, -1:].argmax(-1)

    return _timed(steps, device)


def one_round(model, prompt: torch.Tensor, batch: int, new_tokens: int, device) -> dict:
    """One timing of each figure for ``model``."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None)
    wide = prompt.expand(batch, -1).contiguous()
    with torch.inference_mode():
        prefill = _timed(lambda: model(prompt), device)
        first = _timed(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                              generation_config=config), device)
        one = decode_seconds(model, prompt, new_tokens, device)
        many = decode_seconds(model, wide, new_tokens, device)
    return {"prefill_tokens_per_s": prompt.shape[1] / prefill, "ttft_s": first,
            "decode_tokens_per_s_batch1": new_tokens / one,
            f"decode_tokens_per_s_batch{batch}": batch * new_tokens / many}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(models: dict, settings, layout, log=print) -> dict:
    """``{name: {figure: {median, min, max, n}}}`` for ``{name: loaded model}`` on ``layout``'s device
    (see the module)."""
    device = layout.device
    prompt_length, batch = int(settings.prompt_length), int(settings.batch)
    new_tokens, repeats = int(settings.decode_tokens), int(settings.repeats)
    generator = torch.Generator().manual_seed(0)
    names = list(models)
    vocab = min(m.config.vocab_size for m in models.values())
    prompt = layout.place(torch.randint(0, vocab, (1, prompt_length), generator=generator))
    for name in names:   # warm-up: kernels chosen, caches allocated
        one_round(models[name], prompt, batch, new_tokens, device)
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            rounds[name].append(one_round(models[name], prompt, batch, new_tokens, device))
        log(f"[speed] repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{n} {rounds[n][-1]['decode_tokens_per_s_batch1']:.1f} tok/s" for n in names))
    found = {}
    for name in names:
        figures = {key: summary([r[key] for r in rounds[name]]) for key in rounds[name][0]}
        if torch.device(device).type == "cuda":
            resident = torch.cuda.memory_allocated(device)   # every model's weights
            torch.cuda.reset_peak_memory_stats(device)
            one_round(models[name], prompt, batch, new_tokens, device)
            figures["measured_decode_bytes"] = torch.cuda.max_memory_allocated(device) - resident
        found[name] = figures
    return found
