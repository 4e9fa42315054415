"""The CPU shims are applied without CUDA, and none of them when CUDA is reported available."""

from helpers import run_script

PROBE = """
import torch
from pipelines.backend import cpu_shims
original = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type, torch.Tensor.cuda)
torch.cuda.is_available = lambda: {available}
applied = cpu_shims.apply()
changed = original != (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type,
                       torch.Tensor.cuda)
print("applied", sorted(applied), "changed", changed)
"""


def test_no_shim_when_cuda_is_available():
    result = run_script("-c", PROBE.format(available=True))
    assert result.returncode == 0, result.stderr
    assert "applied [] changed False" in result.stdout


def test_all_shims_without_cuda():
    result = run_script("-c", PROBE.format(available=False))
    assert result.returncode == 0, result.stderr
    assert "changed True" in result.stdout
    for name in ("current_device", "synchronize", "factory_device", "tensor_type", "tensor_cuda",
                 "gloo_allgather_0d", "gloo_one_rank"):
        assert name in result.stdout


def test_shimmed_behaviour_on_cpu():
    code = """
import torch
from pipelines.backend import cpu_shims
cpu_shims.apply()
assert torch.cuda.current_device() == "cpu"
torch.cuda.synchronize()
assert torch.zeros(2, device="cuda").device.type == "cpu"
assert torch.ones(2).type() == "torch.cuda.FloatTensor"
assert torch.ones(2).type(torch.float64).dtype == torch.float64
t = torch.ones(3)
assert t.cuda() is t
print("ok")
"""
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_one_rank_collectives_are_local_copies():
    """gloo copies a one-rank reduce-scatter or all-gather through its transport; the shim does
    not, and the results are the collectives' own (megatron's bound copies are the shimmed ones)."""
    code = """
import os, torch, torch.distributed as dist
from pipelines.backend import cpu_shims
cpu_shims.apply()
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29561"))
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core.distributed import param_and_grad_buffer as buffers
assert buffers.dist_reduce_scatter_func is dist.reduce_scatter_tensor
assert buffers.dist_all_gather_func is dist.all_gather_into_tensor
x = torch.arange(6.0)
assert dist.reduce_scatter_tensor(x, x) is None and torch.equal(x, torch.arange(6.0))
out = torch.zeros(6)
dist.all_gather_into_tensor(out, x[:6])
assert torch.equal(out, x)
out = torch.zeros(6)
work = dist.reduce_scatter_tensor(out, x * 2, async_op=True)
assert work.wait() and torch.equal(out, x * 2)
one = torch.zeros(1)
dist.all_gather_into_tensor(one, torch.tensor(5.0))  # 0-d input, as ModelOpt sends
assert one.item() == 5.0
print("ok")
"""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_script("-c", code, env={"PROBE_PORT": str(port)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
