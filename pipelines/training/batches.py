"""Training batches: which samples a step reads, and one micro-batch of them.

Data order is a function of the step alone (step ``t`` reads samples ``[o + t·B, o + (t+1)·B)``
of the train split, ``o`` = ``distill.sample_offset``, wrapping around; ``distill.data_seed``
reads them in a seeded order; data-parallel rank ``r`` takes its ``B/dp`` slice), so a resumed
run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch

from pipelines.ops.kd_loss import TopK


def step_samples(step: int, global_batch: int, samples: int, dp_rank: int, dp: int, offset: int = 0,
                 order=None) -> list[int]:
    """Sample indices this data-parallel rank trains on at ``step`` (a function of the step alone);
    ``order``: a permutation of the run's positions (``distill.data_seed``)."""
    per_rank = global_batch // dp
    base = step * global_batch + dp_rank * per_rank
    positions = [base + j for j in range(per_rank)]
    if order is not None:
        positions = [int(order[p % len(order)]) for p in positions]
    return [(offset + p) % samples for p in positions]


def host_batch(windows, cache, indices, renormalize: bool = False) -> dict:
    """One micro-batch in host memory: tokens, labels and the cached teacher (or None), and for
    conversations their loss mask and where each begins (:class:`~pipelines.data.corpus.TokenWindows`);
    ``renormalize``: the teacher's top-k renormalised to sum to 1, its tail bucket dropped."""
    rows = torch.stack([windows[i] for i in indices])
    batch = {"tokens": rows[:, :-1], "labels": rows[:, 1:], "teacher": None}
    if windows.masked:   # conversations: the loss counts the masked-in tokens only
        batch["loss_mask"] = torch.stack([windows.loss_mask(i) for i in indices])
    if windows.isolated:   # and each attends to itself only (data.chat.packing=isolated)
        batch["starts"] = windows.stacked_starts(indices)
    if cache is not None:
        parts = [cache[i] for i in indices]
        batch["teacher"] = TopK(*(torch.stack(p) for p in zip(*parts)))
        if renormalize:
            batch["teacher"] = renormalized(batch["teacher"])
    return batch


def renormalized(teacher: TopK) -> TopK:
    """The "top-k renormalised" label (``distill.topk_tail=false``): the teacher's mass outside
    its top k is dropped and the rest scaled to 1, so no tail bucket is fitted."""
    logprobs = teacher.logprobs.float()
    logprobs = logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
    return TopK(teacher.ids, logprobs.to(teacher.logprobs.dtype), torch.full_like(teacher.tail, float("-inf")))


def make_batch(windows, cache, indices, layout) -> dict:
    """One micro-batch on ``layout``'s device."""
    return layout.place(host_batch(windows, cache, indices))
