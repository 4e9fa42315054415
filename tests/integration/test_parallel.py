"""Tensor parallelism on CPU: a TP=1 checkpoint loads at TP=2 and gives the same logits."""

import torch
from helpers import import_cfg, make_hf_llama, run_torchrun

from pipelines.model import checkpoint
from pipelines.model.build import forward_logits
from pipelines.stages import import_


def test_tp1_checkpoint_loads_at_tp2_with_same_logits(tmp_path, cpu_runtime):
    source = make_hf_llama(tmp_path / "hf", vocab_size=250)
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    tokens = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    model, _ = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    with torch.no_grad():
        reference = forward_logits(model.eval(), tokens)
    result = run_torchrun(2, "tests/workers/tp_logits.py", str(tmp_path / "ckpt"),
                          str(tmp_path / "tokens.pt"), str(tmp_path / "tp2.pt"), "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tp=2 dp=1" in result.stdout
    tp2 = torch.load(tmp_path / "tp2.pt")
    assert tp2.shape == reference.shape
    assert (tp2 - reference).abs().max().item() <= 1e-5
