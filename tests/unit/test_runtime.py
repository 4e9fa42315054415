"""Launch environments: torchrun, SLURM and a plain process all give rank, world and master."""

from pathlib import Path

import pytest

from pipelines.backend import distributed, kernels


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[003-005,009]", "gpu003"), ("node7", "node7"), ("a[1,4],b2", "a1"), ("x-[10-12]", "x-10"),
])
def test_first_slurm_host(nodelist, first):
    assert distributed._first_slurm_host(nodelist) == first


def test_slurm_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")    # recorded, so the MASTER_* this test's call sets are undone after it
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[010-011]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert distributed._launch_environment() == (5, 16, 1)
    import os

    assert os.environ["MASTER_ADDR"] == "gpu010" and os.environ["MASTER_PORT"] == str(20000 + 4242)


def test_torchrun_environment_wins(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed._launch_environment() == (1, 2, 1)


def gloo_threads() -> int:
    """Threads of this process that torch's gloo groups keep (each group has its own)."""
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return sum("gloo" in name for name in names)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
def test_initializing_again_reuses_the_groups_and_leaks_no_threads():
    """Every in-process stage run initializes the runtime; CI's test process once held 4,600
    threads of leaked gloo groups, most of a core in the kernel."""
    from omegaconf import OmegaConf

    single = OmegaConf.create({"tensor": 1, "pipeline": 1})
    distributed.initialize(single)
    first = gloo_threads()
    assert first > 0
    for _ in range(3):
        distributed.initialize(single)
    assert gloo_threads() == first


def test_gradient_clipping_norm_reads_nothing_on_the_host(monkeypatch):
    """Without TE or apex, megatron's clipping fell back to a norm read on the host once per
    parameter tensor (a GPU synchronisation each); the runtime's replacement gives the same total
    and reads nothing."""
    import torch
    from helpers.host_reads import HostReads
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    from pipelines.backend import cpu_shims

    cpu_shims.apply()   # megatron's fallback builds its result with device="cuda"
    grads = [torch.randn(*shape, generator=torch.Generator().manual_seed(i))
             for i, shape in enumerate([(7, 5), (3,), (11, 2, 4)])]
    floats = []   # float(tensor) from Python: torch.tensor([...]) of tensors reads each so, unseen by HostReads
    to_float = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: floats.append(1) or to_float(self))
    expected, _ = megatron_utils.local_multi_tensor_l2_norm(2048 * 32, None, [grads], False)
    assert len(floats) > len(grads)   # what the replacement is for: a read per tensor, and of the total
    assert kernels.fused_grad_clipping()
    assert clip_grads.l2_norm_impl is kernels._device_l2_norm
    floats.clear()
    with HostReads() as ours:
        total, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, None, [grads], False)
    assert ours.reads == [] and floats == []
    assert total.shape == (1,) and total.dtype == torch.float32
    torch.testing.assert_close(total, expected.to(total.device), rtol=1e-6, atol=0)
    reference = torch.cat([g.flatten() for g in grads]).norm()
    torch.testing.assert_close(total[0], reference, rtol=1e-6, atol=0)


def test_gradient_clipping_scales_in_place_as_megatrons_loop():
    """The clipping's scale (megatron's fallback: a product and a copy back per tensor) is one
    in-place fused product: the same values, written into the same gradients; lists of other
    tensors still get megatron's ``dst = src * scale``."""
    import torch
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    assert kernels.fused_grad_clipping()
    assert clip_grads.multi_tensor_scale_impl is kernels._scale_in_place
    grads = [torch.randn(*shape, generator=torch.Generator().manual_seed(i))
             for i, shape in enumerate([(7, 5), (3,), (11, 2, 4)])]
    theirs = [g.clone() for g in grads]
    addresses = [g.data_ptr() for g in grads]
    megatron_utils.local_multi_tensor_scale(2048 * 32, None, [theirs, theirs], 0.37)
    clip_grads.multi_tensor_applier(clip_grads.multi_tensor_scale_impl, None, [grads, grads], 0.37)
    assert [g.data_ptr() for g in grads] == addresses
    for ours, expected in zip(grads, theirs):
        assert torch.equal(ours, expected)
    sources, targets = [g.clone() for g in grads], [torch.zeros_like(g) for g in grads]
    kernels._scale_in_place(2048 * 32, None, [sources, targets], 2.0)
    for source, target, original in zip(sources, targets, grads):
        assert torch.equal(source, original) and torch.equal(target, original * 2.0)


def test_megatrons_torch_adam_runs_fused_with_the_same_update():
    """megatron's torch Adam fallback switched to torch's fused kernel gives the update of the
    unfused loop (float rounding apart), keeps its step counts on the parameters' device, and
    switches again a resumed state whose counts were loaded on the host in float64."""
    from types import SimpleNamespace

    import torch

    def make():
        params = [torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(i)))
                  for i, shape in enumerate([(7, 5), (3,), (11, 2, 4)])]
        return params, torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)

    (plain_params, plain), (fused_params, fused) = make(), make()
    wrapper = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=fused)])
    assert kernels.torch_adams(wrapper) == [fused]
    assert kernels.fused_torch_adam(wrapper) == 1
    assert all(group["fused"] for group in fused.param_groups)
    for step in range(3):
        for params, optimizer in ((plain_params, plain), (fused_params, fused)):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            optimizer.step()
    assert not torch.equal(plain_params[0], make()[0][0])   # the steps moved the parameters
    for a, b in zip(plain_params, fused_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    steps = [fused.state[p]["step"] for p in fused_params]
    assert all(s.device == p.device and s.dtype == torch.float32 and float(s) == 3.0
               for s, p in zip(steps, fused_params))
    for p in fused_params:   # as a checkpoint load leaves them: host tensors, another dtype
        fused.state[p]["step"] = torch.tensor(3.0, dtype=torch.float64)
    fused.param_groups[0]["fused"] = None
    kernels.fused_torch_adam(wrapper)
    assert fused.param_groups[0]["fused"] and all(fused.state[p]["step"].dtype == torch.float32 for p in fused_params)
    fused.step()   # the fused kernel accepts the restored state


def test_the_weight_gradient_kernel_adds_into_the_buffer():
    """Where apex's ``fused_weight_gradient_mlp_cuda`` is missing, megatron's linear layers get
    torch's: ``main_grad += grad_output^T · input`` in place, inside the GEMM for inputs in the
    buffer's dtype; 16-bit inputs into a float32 buffer add their product taken in 16 bits (the
    rounding of megatron's path without the fusion)."""
    import importlib.util

    import torch
    from megatron.core.tensor_parallel import layers

    if importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None:
        assert kernels.gradient_accumulation_fusion() == "apex"
        pytest.skip("apex's kernel is installed: megatron uses it, and torch's is not put in place")
    assert kernels.gradient_accumulation_fusion() == "torch"
    assert layers._grad_accum_fusion_available and layers.fused_weight_gradient_mlp_cuda is kernels._TorchWeightGradient
    generator = torch.Generator().manual_seed(0)
    inputs, grad_output = torch.randn(12, 5, generator=generator), torch.randn(12, 3, generator=generator)
    start = torch.randn(3, 5, generator=generator)
    main_grad = start.clone()
    address = main_grad.data_ptr()
    layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(inputs, grad_output, main_grad)
    assert main_grad.data_ptr() == address
    torch.testing.assert_close(main_grad, start + grad_output.t() @ inputs, rtol=1e-6, atol=1e-6)
    low, low_grad = inputs.bfloat16(), grad_output.bfloat16()
    main_grad = start.clone()
    layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(low, low_grad, main_grad)
    assert main_grad.dtype == torch.float32 and torch.equal(main_grad, start + (low_grad.t() @ low).float())
    half_buffer = start.bfloat16()
    layers.fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(low, low_grad, half_buffer)
    torch.testing.assert_close(half_buffer.float(), start + grad_output.t() @ inputs, rtol=0.05, atol=0.1)
