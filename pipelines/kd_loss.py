"""Sparse forward-KL distillation loss against a teacher's top-k tokens plus a tail bucket.

The teacher's distribution at temperature ``T`` is stored per token as its top-k token ids, their
log-probabilities, and the log of the remaining mass (the *tail*). The student's distribution is
collapsed onto the same k + 1 buckets (its probability of each top-k id, and of everything
else), and the loss is ``T² · KL(teacher ‖ student)`` over those buckets, averaged over the
tokens that are not ignored. With k equal to the vocabulary the tail is empty and this is the
dense KL.

Memory: :func:`sparse_kl_loss` walks the tokens in chunks and computes each chunk's gradient in
the forward pass (a custom autograd function), so no float32 ``[tokens, vocab]`` tensor exists
for more than one chunk at a time; the gradient has the logits' own dtype and shape.

Not yet: a tensor-parallel vocabulary split (each rank holding ``vocab / tp`` logits); this
function expects the full vocabulary on every rank.
"""

from __future__ import annotations

import torch


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _chunk_loss_and_grad(logits, topk_ids, topk_logprobs, tail_logmass, temperature):
    """Per-token loss [n] and d(loss)/d(logits) [n, V] for one chunk (float32 inside)."""
    scaled = logits.float() / temperature
    log_q = torch.log_softmax(scaled, dim=-1)                       # [n, V]
    q = log_q.exp()
    student_topk = log_q.gather(-1, topk_ids)                       # [n, k]
    student_tail = _log1mexp(torch.logsumexp(student_topk, dim=-1))  # [n]
    p_topk = topk_logprobs.float().exp()
    p_tail = tail_logmass.float().exp()
    tail_term = torch.where(p_tail > 0, p_tail * (tail_logmass.float() - student_tail),
                            torch.zeros_like(p_tail))
    loss = (p_topk * (topk_logprobs.float() - student_topk)).sum(-1) + tail_term
    # d/dz_v of T²·KL = T·(q_v − p_bucket(v)·q_v/q_bucket(v)); top-k: T·(q_v − p_v); tail: T·q_v·(1 − p_tail/q_tail)
    tail_ratio = torch.where(p_tail > 0, p_tail / student_tail.exp().clamp_min(1e-30),
                             torch.zeros_like(p_tail))
    grad = q * (1.0 - tail_ratio).unsqueeze(-1)
    grad.scatter_(-1, topk_ids, q.gather(-1, topk_ids) - p_topk)
    return loss * temperature**2, grad * temperature


class _SparseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk_ids, topk_logprobs, tail_logmass, weights, temperature, chunk_tokens):
        grad = torch.empty_like(logits)
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, logits.shape[0], chunk_tokens):
            end = start + chunk_tokens
            loss, chunk_grad = _chunk_loss_and_grad(logits[start:end], topk_ids[start:end],
                                                    topk_logprobs[start:end], tail_logmass[start:end],
                                                    temperature)
            weight = weights[start:end].float()
            total += (loss * weight).sum()
            grad[start:end] = (chunk_grad * weight.unsqueeze(-1)).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None


def sparse_kl_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   tail_logmass: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   temperature: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` over top-k + tail buckets, mean over unmasked tokens.

    Shapes: ``student_logits [..., V]``; ``topk_ids`` (int64) and ``topk_logprobs`` ``[..., k]``
    (teacher log-probabilities at ``temperature``); ``tail_logmass [...]`` (log of the teacher
    mass outside the top-k, ``-inf`` when none); ``loss_mask [...]`` (1 = counts, 0 = ignored).
    Returns a 0-d float32 tensor; 0 when every token is ignored.
    """
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    k = topk_ids.shape[-1]
    mask = (torch.ones(logits.shape[0], device=logits.device) if loss_mask is None
            else loss_mask.reshape(-1).float())
    count = mask.sum()
    if count == 0:
        return (student_logits.sum() * 0.0).float()
    weights = mask / count
    return _SparseKL.apply(logits, topk_ids.reshape(-1, k), topk_logprobs.reshape(-1, k),
                           tail_logmass.reshape(-1), weights, float(temperature), int(chunk_tokens))


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """Top-k ids, their log-probabilities at ``temperature``, and the log tail mass."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    topk_logprobs, topk_ids = log_p.topk(k, dim=-1)
    tail = _log1mexp(torch.logsumexp(topk_logprobs, dim=-1))
    if k == teacher_logits.shape[-1]:
        tail = torch.full_like(tail, float("-inf"))
    return topk_ids, topk_logprobs, tail
