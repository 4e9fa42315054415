"""The distillation loss on a vocabulary split over 2 tensor-parallel ranks equals one rank's.

    python -m torch.distributed.run --nproc-per-node=2 tests/workers/tp_kd_loss.py
"""

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.ops.kd_loss import distill_loss, teacher_topk

layout = distributed.initialize(OmegaConf.create({"tensor": 2, "pipeline": 1}))
from megatron.core import parallel_state  # noqa: E402

generator = torch.Generator().manual_seed(0)
vocab, padded = 45, 48                                  # last rank holds 3 padding columns
student = torch.randn(2, 5, padded, generator=generator) * 2
teacher = torch.randn(2, 5, padded, generator=generator) * 2
labels = torch.randint(0, vocab, (2, 5), generator=generator)
group = parallel_state.get_tensor_model_parallel_group()
rank = parallel_state.get_tensor_model_parallel_rank()
local = slice(rank * padded // 2, (rank + 1) * padded // 2)
cases = [("topk", lambda t: teacher_topk(teacher[..., :vocab], 7, 2.0), "forward_kl"),
         ("topk-reverse", lambda t: teacher_topk(teacher[..., :vocab], 7, 2.0), "reverse_kl"),
         ("dense-jsd", lambda t: t, "jsd")]
for name, make_teacher, kind in cases:
    whole = student.clone().requires_grad_(True)
    split = student[..., local].clone().requires_grad_(True)
    ref = distill_loss(whole, labels, make_teacher(teacher), kd_weight=0.6, temperature=2.0,
                       divergence=kind, vocab_size=vocab, chunk_tokens=3)
    ours = distill_loss(split, labels, make_teacher(teacher[..., local]), kd_weight=0.6, temperature=2.0,
                        divergence=kind, vocab_size=vocab, tp_group=group, chunk_tokens=3)
    ref[0].backward()
    ours[0].backward()
    for a, b in zip(ref, ours):
        assert abs(a.item() - b.item()) <= 1e-5, (name, a.item(), b.item())
    torch.testing.assert_close(split.grad, whole.grad[..., local], atol=1e-6, rtol=1e-5)
    assert torch.all(whole.grad[..., vocab:] == 0)
dist.barrier()
print(f"rank {layout.rank}: tp kd loss match", flush=True)
distributed.shutdown()
