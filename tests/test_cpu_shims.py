"""The CPU shims are applied without CUDA, and none of them when CUDA is reported available."""

from conftest import run_script

PROBE = """
import torch
from pipelines import cpu_shims
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
                 "gloo_allgather_0d"):
        assert name in result.stdout


def test_shimmed_behaviour_on_cpu():
    code = """
import torch
from pipelines import cpu_shims
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
