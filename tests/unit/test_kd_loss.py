"""The sparse top-k KD loss against a dense reference."""

import pytest
import torch
import torch.nn.functional as F

from pipelines.ops.kd_loss import distill_loss, sparse_kl_loss, teacher_topk

V = 50


def dense_kl(student, teacher, temperature, mask=None):
    per_token = F.kl_div(torch.log_softmax(student / temperature, -1),
                         torch.log_softmax(teacher / temperature, -1), log_target=True,
                         reduction="none").sum(-1) * temperature**2
    mask = torch.ones_like(per_token) if mask is None else mask.float()
    return (per_token * mask).sum() / mask.sum()


def assert_same_loss_and_gradient(loss, leaf, reference, reference_leaf, value_tol=1e-5, atol=1e-6, rtol=1e-5):
    """``loss`` equals ``reference`` in value, and in its gradient on ``leaf`` against ``reference_leaf``'s."""
    assert abs(loss.item() - reference.item()) <= value_tol
    loss.backward()
    reference.backward()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, atol=atol, rtol=rtol)


def sample(seed=0, shape=(3, 7)):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, V, generator=generator, dtype=torch.float64) * 2,
            torch.randn(*shape, V, generator=generator, dtype=torch.float64) * 2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_full_vocab_equals_dense_kl_with_gradients(temperature):
    student, teacher = sample()
    student.requires_grad_(True)
    loss = sparse_kl_loss(student, *teacher_topk(teacher, V, temperature), temperature=temperature)
    reference_student = student.detach().clone().requires_grad_(True)
    reference = dense_kl(reference_student, teacher, temperature)
    assert_same_loss_and_gradient(loss, student, reference, reference_student)


def test_chunked_equals_unchunked_and_tail_bucket_counts():
    student, teacher = sample(1)
    targets = teacher_topk(teacher, 8)
    whole_student = student.clone().requires_grad_(True)
    chunked_student = student.clone().requires_grad_(True)
    whole = sparse_kl_loss(whole_student, *targets, chunk_tokens=10_000)
    chunked = sparse_kl_loss(chunked_student, *targets, chunk_tokens=4)
    assert abs(whole.item() - chunked.item()) <= 1e-6  # float32 sums in another order
    whole.backward()
    chunked.backward()
    assert torch.equal(whole_student.grad, chunked_student.grad)  # per-token, order-free
    assert whole.item() > 0
    # with the tail bucket the top-k loss is a lower bound of the dense KL (data processing)
    assert whole.item() <= dense_kl(student, teacher, 1.0).item() + 1e-9


def test_gradients_match_dense_kl_on_topk_entries():
    student, teacher = sample(2)
    sparse_student = student.clone().requires_grad_(True)
    dense_student = student.clone().requires_grad_(True)
    ids, logprobs, tail = teacher_topk(teacher, 10)
    sparse_kl_loss(sparse_student, ids, logprobs, tail).backward()
    dense_kl(dense_student, teacher, 1.0).backward()
    torch.testing.assert_close(sparse_student.grad.gather(-1, ids), dense_student.grad.gather(-1, ids),
                               atol=1e-7, rtol=1e-5)


def test_all_ignored_gives_zero_and_mask_selects_tokens():
    student, teacher = sample(3)
    targets = teacher_topk(teacher, V)
    zero = sparse_kl_loss(student, *targets, loss_mask=torch.zeros(3, 7))
    assert zero.item() == 0.0
    mask = torch.zeros(3, 7)
    mask[1, 2:5] = 1
    masked = sparse_kl_loss(student, *targets, loss_mask=mask)
    assert abs(masked.item() - dense_kl(student, teacher, 1.0, mask).item()) <= 1e-5


def test_bfloat16_logits_keep_their_dtype_for_gradients():
    student, teacher = sample(4)
    student = student.to(torch.bfloat16).requires_grad_(True)
    loss = sparse_kl_loss(student, *teacher_topk(teacher.float(), 16))
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16


def bucket_reference(student, teacher, k, kind, beta=0.5, temperature=1.0):
    """Autograd reference: the divergence between bucketed distributions (top-k + tail)."""
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(teacher / temperature, -1)
    ids = log_p.topk(k, -1).indices
    q_b, p_b = log_q.exp().gather(-1, ids), log_p.exp().gather(-1, ids)
    q_b = torch.cat([q_b, 1 - q_b.sum(-1, keepdim=True)], -1) if k < V else q_b
    p_b = torch.cat([p_b, 1 - p_b.sum(-1, keepdim=True)], -1) if k < V else p_b
    if kind == "forward_kl":
        per_token = (p_b * (p_b.log() - q_b.log())).sum(-1)
    elif kind == "reverse_kl":
        per_token = (q_b * (q_b.log() - p_b.log())).sum(-1)
    else:
        m = beta * p_b + (1 - beta) * q_b
        per_token = (beta * p_b * (p_b.log() - m.log()) + (1 - beta) * q_b * (q_b.log() - m.log())).sum(-1)
    return per_token.mean() * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [V, 6])
def test_divergences_match_autograd_reference(kind, k):
    student, teacher = sample(5)
    ours = student.clone().requires_grad_(True)
    reference_student = student.clone().requires_grad_(True)
    loss, kd, ce = distill_loss(ours, teacher=teacher_topk(teacher, k, 2.0), temperature=2.0,
                                divergence=kind, beta=0.3, chunk_tokens=5)
    reference = bucket_reference(reference_student, teacher, k, kind, beta=0.3, temperature=2.0)
    assert abs(loss.item() - reference.item()) <= 1e-5 and kd.item() == loss.item() and ce.item() == 0
    loss.backward()
    reference.backward()
    torch.testing.assert_close(ours.grad, reference_student.grad, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_dense_teacher_equals_full_topk(kind):
    student, teacher = sample(6)
    dense_student = student.clone().requires_grad_(True)
    topk_student = student.clone().requires_grad_(True)
    dense, _, _ = distill_loss(dense_student, teacher=teacher, divergence=kind, temperature=1.5)
    topk, _, _ = distill_loss(topk_student, teacher=teacher_topk(teacher, V, 1.5), divergence=kind,
                              temperature=1.5)
    assert_same_loss_and_gradient(dense, dense_student, topk, topk_student)


def test_mix_with_cross_entropy_and_padding_columns_ignored():
    student, teacher = sample(7)
    labels = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([student, torch.full((3, 7, 14), 5.0, dtype=student.dtype)], -1)
    padded.requires_grad_(True)
    loss, kd, ce = distill_loss(padded, labels, teacher_topk(teacher, 8), kd_weight=0.25, vocab_size=V)
    reference_student = student.clone().requires_grad_(True)
    reference_ce = F.cross_entropy(reference_student.flatten(0, 1), labels.flatten())
    reference_kd = bucket_reference(reference_student, teacher, 8, "forward_kl")
    reference = 0.25 * reference_kd + 0.75 * reference_ce
    assert abs(ce.item() - reference_ce.item()) <= 1e-5 and abs(kd.item() - reference_kd.item()) <= 1e-5
    assert abs(loss.item() - reference.item()) <= 1e-5
    loss.backward()
    reference.backward()
    assert torch.all(padded.grad[..., V:] == 0)
    torch.testing.assert_close(padded.grad[..., :V], reference_student.grad, atol=1e-6, rtol=1e-4)


def test_online_teacher_in_bfloat16_with_padding_and_cross_entropy():
    """The online path as a GPU runs it: bf16 logits of student and teacher, padding columns that
    hold garbage, T = 2, mixed with CE, in two chunks; against a float64 autograd reference."""
    student, teacher = sample(8)
    labels = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    garbage = torch.full((3, 7, 14), 7.0, dtype=torch.float64)
    padded = torch.cat([student, garbage], -1).to(torch.bfloat16).requires_grad_(True)
    padded_teacher = torch.cat([teacher, -garbage], -1).to(torch.bfloat16)
    loss, kd, ce = distill_loss(padded, labels, padded_teacher, kd_weight=0.6, temperature=2.0, vocab_size=V,
                                chunk_tokens=11)
    reference_student = padded.detach()[..., :V].double().requires_grad_(True)
    reference_kd = dense_kl(reference_student, padded_teacher[..., :V].double(), 2.0)
    reference_ce = F.cross_entropy(reference_student.flatten(0, 1), labels.flatten())
    reference = 0.6 * reference_kd + 0.4 * reference_ce
    assert abs(kd.item() - reference_kd.item()) <= 1e-5 and abs(ce.item() - reference_ce.item()) <= 1e-5
    assert abs(loss.item() - reference.item()) <= 1e-5
    loss.backward()
    reference.backward()
    assert padded.grad.dtype == torch.bfloat16 and torch.all(padded.grad[..., V:] == 0)
    torch.testing.assert_close(padded.grad[..., :V].double(), reference_student.grad, atol=2e-4, rtol=1e-2)


def test_tensor_parallel_vocab_split_matches_one_rank():
    from helpers import REPO, run_torchrun

    result = run_torchrun(2, str(REPO / "tests" / "workers" / "tp_kd_loss.py"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tp kd loss match" in result.stdout


def test_sampled_soft_labels_are_unbiased():
    from pipelines.ops.kd_loss import teacher_sampled

    student, teacher = sample(8, shape=(1, 1))
    student, teacher = student.float(), teacher.float()
    generator = torch.Generator().manual_seed(0)
    draws = 400
    labels = teacher_sampled(teacher.expand(draws, 1, V), 16, 1.0, generator)
    estimate = torch.zeros(V)
    estimate.scatter_add_(0, labels.ids.flatten(), labels.logprobs.exp().flatten())
    estimate /= draws
    torch.testing.assert_close(estimate, torch.softmax(teacher.flatten(), -1), atol=0.02, rtol=0)
    # the averaged sampled-label gradient approaches the dense forward-KL gradient
    sampled_student = student.expand(draws, 1, V).clone().requires_grad_(True)
    sparse_kl_loss(sampled_student, *labels).backward()
    dense_student = student.clone().requires_grad_(True)
    dense_kl(dense_student, teacher, 1.0).backward()
    torch.testing.assert_close(sampled_student.grad.sum(0), dense_student.grad[0], atol=0.02, rtol=0)
    again = teacher_sampled(teacher.expand(draws, 1, V), 16, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(again.ids, labels.ids)


def test_renormalized_top_k_is_the_kl_to_the_teacher_restricted_to_its_top_k():
    """distill.topk_tail=false: the loss and gradient equal the dense forward KL to the teacher's
    distribution with everything outside its top k set to zero and the rest scaled to 1."""
    from pipelines.training.batches import renormalized

    student, teacher = sample(4)
    k = 8
    labels = renormalized(teacher_topk(teacher, k, 1.0))
    assert torch.allclose(labels.logprobs.exp().sum(-1), torch.ones(3, 7, dtype=labels.logprobs.dtype))
    assert torch.isneginf(labels.tail).all()
    student.requires_grad_(True)
    loss = sparse_kl_loss(student, *labels)
    kept = torch.full_like(teacher, float("-inf")).scatter(-1, labels.ids, teacher.gather(-1, labels.ids))
    p = torch.softmax(kept, -1)
    reference_student = student.detach().clone().requires_grad_(True)
    log_q = torch.log_softmax(reference_student, -1)
    reference = (p * (torch.where(p > 0, p.log(), torch.zeros_like(p)) - log_q)).sum(-1).mean()
    assert_same_loss_and_gradient(loss, student, reference, reference_student, value_tol=1e-6, atol=1e-7)


@pytest.mark.parametrize("teacher_kind, kd_weight, temperature, divergence", [
    ("sampled", 1.0, 1.0, "forward_kl"), ("sampled", 0.7, 2.0, "forward_kl"), ("online", 1.0, 1.0, "forward_kl"),
    ("online", 0.7, 2.0, "forward_kl"), ("online", 1.0, 1.0, "jsd"), ("none", 0.0, 1.0, "forward_kl")])
def test_the_loss_reads_nothing_on_the_host(teacher_kind, kd_weight, temperature, divergence):
    """No value is read on the host in the loss, forward or backward (on a GPU, each such read
    would wait for the whole queued step, once per micro-batch); a masked-out batch gives zeros
    without a branch on its count."""
    from helpers.host_reads import HostReads

    from pipelines.ops.kd_loss import teacher_sampled

    student, teacher_logits = sample(6, shape=(2, 9))
    labels = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    teacher = {"sampled": teacher_sampled(teacher_logits.float(), 8, generator=torch.Generator().manual_seed(2)),
               "online": teacher_logits, "none": None}[teacher_kind]
    for mask in (torch.ones(2, 9), torch.zeros(2, 9)):
        logits = student.clone().requires_grad_(True)
        with HostReads() as reads:
            loss, kd, ce = distill_loss(logits, labels, teacher, loss_mask=mask, kd_weight=kd_weight,
                                        temperature=temperature, divergence=divergence, chunk_tokens=7)
            loss.backward()
        assert reads.reads == [], reads.reads
        if mask.sum() == 0:
            assert loss.item() == kd.item() == ce.item() == 0.0
            assert logits.grad.abs().max().item() == 0.0
        else:
            assert loss.item() > 0.0


def test_a_host_read_is_caught():
    """The detector above sees what it is for: ``.item()``, ``if tensor``, a boolean index."""
    from helpers.host_reads import HostReads

    x = torch.arange(4.0)
    with HostReads() as reads:
        x.sum().item()
        bool(x[0] > 1)
        x[x > 1].sum()
        x.nonzero()
    assert reads.reads == ["_local_scalar_dense", "_local_scalar_dense", "index (boolean mask)", "nonzero"]
