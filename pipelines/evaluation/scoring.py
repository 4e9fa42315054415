"""Scoring a model: log-likelihoods of choices, MMLU, the corpus task.

Forward passes are batched by length (prompts sorted, right-padded; causal attention makes the
padding invisible to the scored positions), split over data-parallel ranks, and run at any
tensor-parallel size. The eval stage (:mod:`pipelines.stages.eval`) and the architecture search
(:mod:`pipelines.pruning.search`) use them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipelines.evaluation import corpus_task, mmlu
from pipelines.model.build import local_logits
from pipelines.ops.kd_loss import token_logprobs


def loglikelihoods(forward, requests, batch_tokens: int, vocab_size: int, rank: int = 0, world: int = 1,
                   tp_group=None):
    """Log-likelihood of each continuation of each ``(context ids, [continuation ids, ...])``.

    Returns ``{request index: [score per continuation]}`` for the requests this rank scored
    (batches are dealt round-robin over ``world`` ranks). ``forward(tokens [b, s])`` returns
    logits ``[b, s, >= vocab_size]``, or this rank's vocabulary slice of them with ``tp_group``
    (the scored positions' log-softmax is then reduced over the group, never gathered).
    """

    rows = []  # (request, choice or None, input ids, positions, target ids)
    for index, (context, continuations) in enumerate(requests):
        if all(len(c) == 1 for c in continuations):
            rows.append((index, None, context, [len(context) - 1], [c[0] for c in continuations]))
        else:
            for choice, continuation in enumerate(continuations):
                sequence = context + continuation
                rows.append((index, choice, sequence[:-1],
                             list(range(len(context) - 1, len(sequence) - 1)), continuation))
    # batch whole requests (all rows of a request in one pass, so one rank scores all its choices)
    by_request: dict[int, list[int]] = {}
    for number, row in enumerate(rows):
        by_request.setdefault(row[0], []).append(number)
    units = sorted(by_request.values(), key=lambda unit: -max(len(rows[r][2]) for r in unit))
    batches, current, longest = [], [], 0
    for unit in units:
        unit_longest = max(len(rows[r][2]) for r in unit)
        longest_if_added = max(longest, unit_longest)
        if current and longest_if_added * (len(current) + len(unit)) > batch_tokens:
            batches.append(current)
            current, longest_if_added = [], unit_longest
        current += unit
        longest = longest_if_added
    if current:
        batches.append(current)
    results: dict[int, list[float]] = {}
    for batch in batches[rank::world]:
        length = max(len(rows[r][2]) for r in batch)
        tokens = torch.zeros(len(batch), length, dtype=torch.long)
        for i, r in enumerate(batch):
            tokens[i, : len(rows[r][2])] = torch.tensor(rows[r][2])
        with torch.no_grad():
            logits = forward(tokens)
        for i, r in enumerate(batch):
            index, choice, _, positions, targets = rows[r]
            scored = logits[i, positions]
            if choice is None:  # one position, every choice's single token
                ids = torch.tensor([targets], device=scored.device)
                results[index] = token_logprobs(scored, ids, vocab_size, tp_group, None)[0].tolist()
            else:  # one token of this choice per position
                ids = torch.tensor(targets, device=scored.device)[:, None]
                score = token_logprobs(scored, ids, vocab_size, tp_group, None).sum().item()
                results.setdefault(index, [0.0] * 4)[choice] = score
    return results


def load_questions(eval_cfg):
    """``(shots by subject, scored questions by subject)`` of the ``eval`` config."""
    return mmlu.load(str(eval_cfg.mmlu.source), eval_cfg.mmlu.get("path"), int(eval_cfg.shots),
                     eval_cfg.mmlu.get("subjects"), eval_cfg.get("limit"))


def mmlu_requests(eval_cfg, tokenizer_dir: Path, max_length: int, loaded=None):
    shots_by_subject, scored = loaded or load_questions(eval_cfg)
    encoder = mmlu.Encoder(tokenizer_dir, max_length)
    questions = [q for qs in scored.values() for q in qs]
    requests = [(encoder.encode(q, shots_by_subject.get(q.subject, [])), encoder.continuations)
                for q in questions]
    return questions, requests, encoder


def scores(model, requests, batch_tokens: int, vocab_size: int, layout) -> list[list[float]]:
    """The log-likelihood of every continuation of every request, scored over the data-parallel
    ranks (each rank returns all of them)."""
    from megatron.core import parallel_state

    mine = loglikelihoods(lambda t: local_logits(model, layout.place(t)), requests, batch_tokens, vocab_size,
                          parallel_state.get_data_parallel_rank(), layout.data_parallel,
                          parallel_state.get_tensor_model_parallel_group())
    gathered = [None] * layout.data_parallel
    torch.distributed.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(len(requests))]


def choose(model, requests, batch_tokens: int, vocab_size: int, layout) -> list[int]:
    """The most likely continuation of each request."""
    return [mmlu.argmax(s) for s in scores(model, requests, batch_tokens, vocab_size, layout)]


def run_corpus_task(model, eval_cfg, data: Path, vocab_size: int, layout) -> dict:
    """The corpus multiple-choice task (:mod:`pipelines.evaluation.corpus_task`)."""
    c = eval_cfg.corpus
    started = time.perf_counter()
    built = corpus_task.questions(data, int(c.questions), int(c.context_tokens), int(c.continuation_tokens),
                                  int(c.seed))
    predictions = choose(model, [(context, choices) for context, choices, _ in built],
                         int(eval_cfg.batch_tokens), vocab_size, layout)
    summary = corpus_task.summarize([p == answer for p, (_, _, answer) in zip(predictions, built)])
    return {**summary, "seconds": time.perf_counter() - started, "predictions": predictions}


def mmlu_summary(questions, loglik: list[list[float]], seconds: float, **extra) -> dict:
    """:func:`pipelines.evaluation.mmlu.summarize` of the letters ``loglik`` chooses, with the predictions and
    the log-likelihoods (either evaluator's)."""
    predictions = [mmlu.argmax(s) for s in loglik]
    summary = mmlu.summarize([q.subject for q in questions],
                             [p == q.answer for p, q in zip(predictions, questions)])
    summary.update(seconds=seconds, predictions=predictions, loglikelihoods=[[round(x, 5) for x in s] for s in loglik],
                   **extra)
    return summary


def run_mmlu(model, eval_cfg, tokenizer_dir: Path, vocab_size: int, layout, loaded=None) -> dict:
    questions, requests, encoder = mmlu_requests(eval_cfg, tokenizer_dir, int(eval_cfg.max_length), loaded)
    started = time.perf_counter()
    loglik = scores(model, requests, int(eval_cfg.batch_tokens), vocab_size, layout)
    return mmlu_summary(questions, loglik, time.perf_counter() - started, single_token_answers=encoder.single_token,
                        prompt_tokens=sum(len(r[0]) for r in requests))


