"""The sparse top-k KD loss against a dense reference."""

import pytest
import torch
import torch.nn.functional as F

from pipelines.kd_loss import sparse_kl_loss, teacher_topk

V = 50


def dense_kl(student, teacher, temperature, mask=None):
    per_token = F.kl_div(torch.log_softmax(student / temperature, -1),
                         torch.log_softmax(teacher / temperature, -1), log_target=True,
                         reduction="none").sum(-1) * temperature**2
    mask = torch.ones_like(per_token) if mask is None else mask.float()
    return (per_token * mask).sum() / mask.sum()


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
    assert abs(loss.item() - reference.item()) <= 1e-5
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, reference_student.grad, atol=1e-6, rtol=1e-5)


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
