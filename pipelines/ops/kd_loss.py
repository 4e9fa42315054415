"""Distillation losses that never hold a float32 ``[tokens, vocab]`` tensor for more than one chunk.

One fused, chunked autograd function, :func:`distill_loss`, computes

    loss = kd_weight · T² · D(teacher ‖ student at temperature T) + (1 − kd_weight) · CE(labels)

and its gradient with respect to the student's logits in the forward pass, chunk by chunk; the
backward pass only scales the stored gradient (one tensor with the logits' dtype and shape).

**The teacher** comes in one of two forms:

- :class:`TopK` (the cache): top-k token ids, their log-probabilities at ``T`` and the log of the
  remaining mass. The student's distribution is collapsed onto the same k + 1 buckets (each top-k
  id, and everything else), and the divergence is taken over buckets. With k equal to the
  vocabulary the tail is empty and this is the dense divergence.
- a dense logits tensor (the online teacher), same shape as the student's.

**Divergences** (``divergence``): ``forward_kl`` KL(p‖q) (Minitron's), ``reverse_kl`` KL(q‖p), and
``jsd``, the generalised Jensen-Shannon β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q. Each is a
sum over buckets B of a term f(log q_B, log p_B); with h_B = ∂f/∂log q_B and S = Σ_B h_B, the
gradient with respect to the (scaled) logit z_v of a softmax is ``q_v·(h_B/q_B − S)`` for v in
bucket B: ``h_v − q_v·S`` for a single top-k token.

**Cross-entropy** is the same machinery with a one-token teacher (the label, log-probability 0).

**Tensor parallelism**: megatron's output layer leaves each tensor-parallel rank
``vocab_padded / tp`` consecutive logits. With ``tp_group`` given, the softmax normaliser, the
gathered top-k log-probabilities and the per-token sums are all-reduced over the group; each rank
computes the gradient of its own slice. **Padding**: columns at or past ``vocab_size`` (megatron
pads the vocabulary) get probability 0 and no gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class TopK(NamedTuple):
    """Teacher soft labels of some tokens: ids and log-probs ``[..., k]``, tail log-mass ``[...]``."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor

    def flat(self) -> "TopK":
        k = self.ids.shape[-1]
        return TopK(self.ids.reshape(-1, k), self.logprobs.reshape(-1, k), self.tail.reshape(-1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def divergence_terms(log_q, log_p, kind: str, beta: float = 0.5):
    """Per-bucket terms ``f`` (summing to the divergence) and ``h = ∂f/∂log q``.

    Buckets where the teacher has no mass (``log_p = -inf``) contribute nothing.
    """
    valid = log_p > float("-inf")
    log_q = torch.where(valid, log_q, torch.zeros_like(log_q))
    log_p = torch.where(valid, log_p, torch.zeros_like(log_p))
    q, p = log_q.exp(), log_p.exp()
    if kind == "forward_kl":
        f, h = p * (log_p - log_q), -p
    elif kind == "reverse_kl":
        f, h = q * (log_q - log_p), q * (log_q - log_p + 1.0)
    elif kind == "jsd":
        log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta)),
                                log_q + torch.log1p(torch.tensor(-beta)))
        f = beta * p * (log_p - log_m) + (1.0 - beta) * q * (log_q - log_m)
        h = (1.0 - beta) * q * (log_q - log_m)
    else:
        raise ValueError(f"unknown divergence {kind!r}; one of {DIVERGENCES}")
    zero = torch.zeros_like(f)
    return torch.where(valid, f, zero), torch.where(valid, h, zero)


class _Vocab:
    """This rank's slice of the (padded) vocabulary and the reductions over its group."""

    def __init__(self, local_size: int, vocab_size: int | None, group):
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        rank = dist.get_rank(group) if self.group is not None else 0
        self.start, self.local_size = rank * local_size, local_size
        self.real_local = (local_size if vocab_size is None
                           else max(0, min(local_size, vocab_size - self.start)))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def scaled(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Float32 ``logits / T`` with padding columns at -inf (the logits themselves, uncopied,
        when they are float32 at T = 1 without padding)."""
        if logits.dtype == torch.float32 and temperature == 1.0 and self.real_local == self.local_size:
            return logits
        scaled = logits.float() / temperature
        if self.real_local < self.local_size:
            scaled[:, self.real_local:] = float("-inf")
        return scaled

    def softmax(self, logits: torch.Tensor, temperature: float):
        """``(q, lse)``: the float32 softmax over the whole vocabulary of this rank's ``[n, V/tp]``
        logits at ``temperature`` (a new tensor, which the caller may overwrite) and the log of its
        normaliser ``[n]``, so that log q = logits / T − lse without a second ``[n, V]`` tensor."""
        return self.softmax_scaled(self.scaled(logits, temperature))

    def softmax_scaled(self, scaled: torch.Tensor):
        """:meth:`softmax` of logits already :meth:`scaled` (which a caller that needs them again
        keeps, instead of scaling twice)."""
        if self.group is None:
            # q at the row maximum is exp(max - lse) >= 1/V, and q's own maximum (softmax keeps the
            # order): lse = max - log max q, from two plain reductions (a max with its index is a
            # slower pass)
            top = scaled.amax(dim=-1, keepdim=True)
            q = torch.softmax(scaled, dim=-1)
            return q, (top - q.amax(dim=-1, keepdim=True).log()).squeeze(-1)
        top = scaled.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        q = torch.sub(scaled, top).exp_()
        total = self.sum(q.sum(-1, keepdim=True))
        return q.div_(total), (top + total.log()).squeeze(-1)

    def log_softmax(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Float32 log-softmax over the whole vocabulary of this rank's ``[n, V/tp]`` logits."""
        scaled = self.scaled(logits, temperature)
        if self.group is None:
            return torch.log_softmax(scaled, dim=-1)
        top = scaled.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        total = self.sum((scaled - top).exp().sum(-1, keepdim=True))
        return scaled - top - total.log()

    def gather_scaled(self, logits: torch.Tensor, ids: torch.Tensor, temperature: float, lse: torch.Tensor):
        """log q at global ``ids`` ([n, k], float32) on every rank, from the raw logits and the
        normaliser of :meth:`softmax`; also the local index and the mask of ids this rank holds."""
        picked, local, mine = self.gather(logits, ids)  # one rank holds each id: the sum is exact
        return picked.float() / temperature - lse[:, None], local, mine

    def gather(self, values: torch.Tensor, ids: torch.Tensor):
        """``values [n, V/tp]`` (e.g. log q) at global ``ids`` ([n, k]) on every rank; also the
        local index and the mask of ids this rank holds."""
        local = ids - self.start
        mine = (local >= 0) & (local < self.local_size)
        local = local.clamp(0, self.local_size - 1)
        picked = torch.where(mine, values.gather(-1, local), torch.zeros((), dtype=values.dtype))
        return self.sum(picked), local, mine


def _bucket_terms(log_q_ids, teacher_logprobs, teacher_tail, kind, beta):
    """Per-token divergence over the buckets of a top-k + tail teacher, and its gradient with
    respect to the scaled logits as ``q · row + (scatter of the top-k entries' corrections)``.

    ``log_q_ids [n, k]``: the student's log-probabilities at the teacher's ids. Returns
    ``(divergence [n], row [n], corrections [n, k])``: the gradient is ``q_v · row`` for every
    token v, plus ``corrections`` at the top-k ids (each a bucket of its own, ``h_v − q_v·S``
    in place of ``q_v · (h_tail / q_tail − S)``).
    """
    # entries the teacher gives no mass (sampled labels' repeats) are not buckets of their own
    counted = torch.where(teacher_logprobs > float("-inf"), log_q_ids,
                          torch.full_like(log_q_ids, float("-inf")))
    student_tail = _log1mexp(torch.logsumexp(counted, dim=-1))
    f, h = divergence_terms(torch.cat([log_q_ids, student_tail[:, None]], -1),
                            torch.cat([teacher_logprobs, teacher_tail[:, None]], -1), kind, beta)
    total_h = h.sum(-1)
    tail_q = student_tail.exp()
    tail_factor = torch.where(tail_q > 0, h[:, -1] / tail_q.clamp_min(1e-30), torch.zeros_like(tail_q))
    corrections = h[:, :-1] - log_q_ids.exp() * tail_factor[:, None]
    return f.sum(-1), tail_factor - total_h, corrections


def _dense_forward_kl(vocab: _Vocab, student_scaled, teacher, temperature: float, lse_q):
    """KL(p‖q) per token against a dense teacher, and p (the gradient is q − p).

    KL = Σ p·z_t/T − Σ p·z_s/T − lse_p + lse_q, over the real columns (padding has p = 0), from
    the student's logits as its softmax scaled them (``student_scaled``) and the teacher's, scaled
    once: the teacher's softmax and two products are the only ``[n, V]`` passes besides the
    student's, and no ``[n, V]`` tensor is made but p (and the teacher's float32 copy, for bf16).
    """
    teacher_scaled = vocab.scaled(teacher, temperature)
    p, lse_p = vocab.softmax_scaled(teacher_scaled)
    real = vocab.real_local
    p_real = p[:, :real]
    cross = (torch.linalg.vecdot(p_real, teacher_scaled[:, :real])
             - torch.linalg.vecdot(p_real, student_scaled[:, :real]))
    return vocab.sum(cross) - lse_p + lse_q, p


def _dense_grad(vocab: _Vocab, log_q, log_p, kind, beta):
    f, h = divergence_terms(log_q, log_p, kind, beta)
    loss = vocab.sum(f.sum(-1))
    total_h = vocab.sum(h.sum(-1, keepdim=True))
    return loss, h - log_q.exp() * total_h


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, chunk_fn, tokens, chunk_tokens):
        chunks = _chunks(tokens, chunk_tokens)
        grad = None
        totals = torch.zeros(3, dtype=torch.float32, device=logits.device)
        for start, end in chunks:
            chunk_totals, chunk_grad = chunk_fn(logits, start, end)
            totals += chunk_totals
            if len(chunks) == 1 and chunk_grad.dtype == logits.dtype:
                grad = chunk_grad  # the one chunk's gradient is the whole gradient: no copy
            else:
                if grad is None:
                    grad = torch.empty_like(logits)
                grad[start:end] = chunk_grad
        ctx.save_for_backward(grad)
        kd, ce = totals[1].clone(), totals[2].clone()
        ctx.mark_non_differentiable(kd, ce)
        return totals[0].clone(), kd, ce

    @staticmethod
    def backward(ctx, grad_output, _kd, _ce):
        (grad,) = ctx.saved_tensors
        # scaled in place: no second [tokens, vocab] tensor (a second backward through the same
        # graph is refused by autograd's version check on the saved tensor)
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None


def counted_weights(mask: torch.Tensor, normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
    """Each token's weight in a masked mean: the mask over ``normalizer``, or over its own count
    (see :func:`distill_loss`). No branch on the count: with no counted token every weight is 0
    (reading it would synchronise with the device each micro-batch)."""
    mask = mask.float()
    return mask / (mask.sum().clamp_min(1.0) if normalizer is None else normalizer)


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor | None = None,
                 teacher: TopK | torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                 kd_weight: float = 1.0, temperature: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, vocab_size: int | None = None, tp_group=None,
                 chunk_tokens: int = 1024, normalizer: torch.Tensor | float | None = None):
    """``(loss, kd, ce)``: the mixed loss (differentiable) and its two parts (detached).

    Shapes: ``student_logits [..., V_local]`` (this rank's vocabulary slice), ``labels [...]``,
    ``loss_mask [...]`` (1 counts, 0 ignored). Each part is a mean over the counted tokens;
    all are 0 when no token counts. ``normalizer``: divide the counted tokens' sum by this
    instead of their count (a global batch's share per micro-batch, so that micro-batches holding
    more counted tokens weigh more). ``vocab_size`` is the real vocabulary (columns past it are
    padding). ``kd_weight`` 0 needs no teacher; 1 needs no labels.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; one of {DIVERGENCES}")
    local_size = student_logits.shape[-1]
    logits = student_logits.reshape(-1, local_size)
    tokens = logits.shape[0]
    mask = torch.ones(tokens, device=logits.device) if loss_mask is None else loss_mask.reshape(-1)
    # with no counted token the loss, its parts and the gradient are 0
    weights = counted_weights(mask, normalizer)
    vocab = _Vocab(local_size, vocab_size, tp_group)
    use_kd, use_ce = kd_weight > 0, kd_weight < 1
    if use_kd and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher")
    if use_ce and labels is None:
        raise ValueError("kd_weight < 1 needs labels")
    flat_teacher = teacher.flat() if isinstance(teacher, TopK) else (
        teacher.reshape(-1, local_size) if teacher is not None else None)
    flat_labels = labels.reshape(-1) if labels is not None else None
    T = float(temperature)

    def chunk_fn(all_logits, start, end):
        """Losses of tokens [start, end) and their gradient, in as few passes over [n, V] as the
        parts allow: one softmax per temperature, scaled once (its rows' coefficients summed over
        the parts), plus sparse corrections at the teacher's ids and the labels."""
        chunk = all_logits[start:end]
        weight = weights[start:end]
        totals = torch.zeros(3, dtype=torch.float32, device=chunk.device)
        softmax: dict[float, tuple] = {}   # temperature -> (q, lse, row coefficient [n])
        sparse = []                        # (local ids, mine, corrections [n, k]) to add at the ids
        dense = None                       # ([n, V] tensor, its row coefficient [n]) to add

        def at(t, scaled=None):
            if t not in softmax:
                q, lse = vocab.softmax_scaled(vocab.scaled(chunk, t) if scaled is None else scaled)
                softmax[t] = (q, lse, torch.zeros_like(lse))
            return softmax[t]

        if use_kd:
            scale = weight * (kd_weight * T)  # d/d(logits) = (1/T) d/d(logits/T), and the loss is T²·D
            if isinstance(flat_teacher, TopK):
                q, lse, row = at(T)
                log_q_ids, local, mine = vocab.gather_scaled(chunk, flat_teacher.ids[start:end], T, lse)
                loss, bucket_row, corrections = _bucket_terms(
                    log_q_ids, flat_teacher.logprobs[start:end].float(), flat_teacher.tail[start:end].float(),
                    divergence, beta)
                row += bucket_row * scale
                sparse.append((local, mine, corrections * scale[:, None]))
            elif divergence == "forward_kl":  # h = -p, S = -1: the gradient is q - p
                student_scaled = vocab.scaled(chunk, T)
                q, lse, row = at(T, student_scaled)
                loss, p = _dense_forward_kl(vocab, student_scaled, flat_teacher[start:end], T, lse)
                del student_scaled
                row += scale
                dense = (p, -scale)
            else:
                log_q = vocab.log_softmax(chunk, T)
                log_p = vocab.log_softmax(flat_teacher[start:end], T)
                loss, g = _dense_grad(vocab, log_q, log_p, divergence, beta)
                dense = (g, scale)
            kd = (loss * weight).sum() * T * T
            totals[1] = kd
            totals[0] += kd_weight * kd
        if use_ce:  # a one-token teacher: the gradient is q - onehot(label)
            q, lse, row = at(1.0)
            log_q_label, local, mine = vocab.gather_scaled(chunk, flat_labels[start:end, None], 1.0, lse)
            ce_weight = weight * (1.0 - kd_weight)
            row += ce_weight
            sparse.append((local, mine, -ce_weight[:, None]))
            ce = -(log_q_label[:, 0] * weight).sum()
            totals[2] = ce
            totals[0] += (1.0 - kd_weight) * ce
        grad = None
        for q, _, row in softmax.values():
            q.mul_(row[:, None])
            grad = q if grad is None else grad.add_(q)
        if dense is not None:  # added scaled in one pass (addcmul): not scaled, then added
            tensor, coefficient = dense
            grad = (tensor.mul_(coefficient[:, None]) if grad is None
                    else grad.addcmul_(tensor, coefficient[:, None]))
        for local, mine, corrections in sparse:
            grad.scatter_add_(-1, local, torch.where(mine, corrections, torch.zeros((), dtype=corrections.dtype)))
        return totals, grad

    return _FusedLoss.apply(logits, chunk_fn, tokens, int(chunk_tokens))


def sparse_kl_loss(student_logits, topk_ids, topk_logprobs, tail_logmass, loss_mask=None,
                   temperature: float = 1.0, chunk_tokens: int = 1024, **kwargs) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` over top-k + tail buckets, mean over unmasked tokens."""
    loss, _, _ = distill_loss(student_logits, teacher=TopK(topk_ids, topk_logprobs, tail_logmass),
                              loss_mask=loss_mask, temperature=temperature, chunk_tokens=chunk_tokens,
                              **kwargs)
    return loss


def _chunks(tokens: int, chunk_tokens: int | None):
    step = int(chunk_tokens) if chunk_tokens else max(tokens, 1)
    return [(start, min(start + step, tokens)) for start in range(0, tokens, step)]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, vocab_size: int | None = None, tp_group=None,
                   chunk_tokens: int | None = 1024, temperature: float = 1.0) -> torch.Tensor:
    """Float32 log-probabilities ``[..., k]`` of the global token ``ids [..., k]`` under ``logits``.

    ``logits [..., V_local]`` is this rank's vocabulary slice (the whole vocabulary without
    ``tp_group``); only ``chunk_tokens`` tokens are in float32 at a time.
    """
    local_size, k = logits.shape[-1], ids.shape[-1]
    flat, flat_ids = logits.reshape(-1, local_size), ids.reshape(-1, k)
    vocab = _Vocab(local_size, vocab_size, tp_group)
    out = torch.empty(flat_ids.shape, dtype=torch.float32, device=logits.device)
    for start, end in _chunks(flat.shape[0], chunk_tokens):
        out[start:end] = vocab.gather(vocab.log_softmax(flat[start:end], temperature), flat_ids[start:end])[0]
    return out.reshape(ids.shape)


def teacher_sampled(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                    generator: torch.Generator | None = None, vocab_size: int | None = None,
                    tp_group=None, chunk_tokens: int | None = None) -> TopK:
    """Gemma-style sampled soft labels: ``k`` draws from the teacher at ``temperature``.

    Each distinct drawn id gets log(count / k); repeats get ``-inf`` (no mass) and the tail is
    empty, so the stored distribution is the empirical one, an unbiased estimate of the teacher's:
    the forward-KL gradient against it is unbiased. Deterministic for a given ``generator``.
    ``teacher_logits [..., V_local]`` may be a tensor-parallel slice (``tp_group``): each chunk of
    ``chunk_tokens`` tokens is gathered over the group to sample from, and every rank draws the
    same ids from the same ``generator``. Columns at or past ``vocab_size`` are never drawn.
    """
    shape, local_size = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    flat_logits = teacher_logits.reshape(-1, local_size)
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    ids_out, logprobs_out = [], []
    for start, end in _chunks(flat_logits.shape[0], chunk_tokens):
        chunk = flat_logits[start:end]
        if group is not None:
            parts = [torch.empty_like(chunk) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, chunk.contiguous(), group=group)
            chunk = torch.cat(parts, dim=-1)
        if vocab_size is not None:
            chunk = chunk[:, :vocab_size]
        # float32 logits at T = 1 are not copied (a float32 [tokens, V] chunk fewer at the peak)
        flat = torch.softmax(chunk.float() if temperature == 1.0 else chunk.float() / temperature, dim=-1)
        ids = torch.multinomial(flat, k, replacement=True, generator=generator).sort(-1).values
        del flat
        counts = (ids[:, :, None] == ids[:, None, :]).sum(-1).float()
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        ids_out.append(ids)
        logprobs_out.append(torch.where(first, (counts / k).log(), torch.full_like(counts, float("-inf"))))
    ids, logprobs = torch.cat(ids_out), torch.cat(logprobs_out)
    return TopK(ids.reshape(*shape, k), logprobs.reshape(*shape, k),
                torch.full(shape, float("-inf"), device=teacher_logits.device))


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: int | None = None,
                 tp_group=None, chunk_tokens: int | None = None) -> TopK:
    """Top-k ids, their log-probabilities at ``temperature``, and the log tail mass.

    ``teacher_logits [..., V_local]`` may be this rank's slice of a vocabulary split over
    ``tp_group``: each rank takes the top-k of its slice, chunk by chunk (``chunk_tokens`` tokens
    in float32 at a time), the normaliser is all-reduced and the k·tp candidates are gathered and
    merged, so no rank holds the full vocabulary. Columns at or past ``vocab_size`` (padding) are
    never chosen. Returns ``ids, logprobs [..., k]`` and ``tail [...]``; the same on every rank.
    """
    shape, local_size = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    flat = teacher_logits.reshape(-1, local_size)
    vocab = _Vocab(local_size, vocab_size, tp_group)
    ranks = dist.get_world_size(vocab.group) if vocab.group is not None else 1
    real_vocab = vocab_size if vocab_size is not None else local_size * ranks
    local_k = min(k, local_size)
    ids = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    logprobs = torch.empty(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    for start, end in _chunks(flat.shape[0], chunk_tokens):
        log_p = vocab.log_softmax(flat[start:end], temperature)
        values, local_ids = log_p.topk(local_k, dim=-1)
        del log_p
        candidates = local_ids + vocab.start
        if vocab.group is not None:
            all_values = [torch.empty_like(values) for _ in range(ranks)]
            all_ids = [torch.empty_like(candidates) for _ in range(ranks)]
            dist.all_gather(all_values, values.contiguous(), group=vocab.group)
            dist.all_gather(all_ids, candidates.contiguous(), group=vocab.group)
            values, candidates = torch.cat(all_values, -1), torch.cat(all_ids, -1)
        values, order = values.topk(k, dim=-1)
        logprobs[start:end], ids[start:end] = values, candidates.gather(-1, order)
    tail = _log1mexp(torch.logsumexp(logprobs, dim=-1))
    if k >= real_vocab:
        tail = torch.full_like(tail, float("-inf"))
    return TopK(ids.reshape(*shape, k), logprobs.reshape(*shape, k), tail.reshape(shape))
