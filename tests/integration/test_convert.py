"""Import/export of Hugging Face Llama checkpoints: parity, round trip, and bad input."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from helpers import export_cfg, import_cfg, make_hf_llama, run_script

from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import UserError
from pipelines.hf.safetensors_stream import SafetensorsFolder
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits
from pipelines.stages import export, import_


def hf_logits(folder, tokens):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_matches_transformers_logits(tmp_path, cpu_runtime, tie):
    source = make_hf_llama(tmp_path / "hf", tie=tie)
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    model, arch = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    tokens = torch.randint(0, 300, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = forward_logits(model.eval(), tokens)[..., : arch["vocab_size"]]
    reference = hf_logits(source, tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4


def test_bfloat16_folder_imports_and_loads_in_either_dtype(tmp_path, cpu_runtime):
    """Hugging Face folders of real models (Llama-3.1-8B) are bf16: every weight, the norms too,
    must be read as stored and load as bf16 or float32 (the local spec builds norms in float32)."""
    from transformers import LlamaForCausalLM

    source = make_hf_llama(tmp_path / "hf32")
    LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    manifest = import_.import_hf(import_cfg(tmp_path / "hf", tmp_path / "ckpt"))
    assert manifest["dtype"] == "bfloat16"
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(3))
    reference = hf_logits(tmp_path / "hf", tokens)  # the bf16 weights, computed in float32
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 0.1)):
        model, arch = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        with torch.no_grad():
            ours = forward_logits(model.eval(), tokens)[..., : arch["vocab_size"]].float()
        assert (ours - reference).abs().max().item() <= tolerance, dtype


def test_import_without_rope_scaling(tmp_path, cpu_runtime):
    source = make_hf_llama(tmp_path / "hf", rope_scaling=None, rope_theta=10000.0)
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    model, arch = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    tokens = torch.randint(0, 300, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = forward_logits(model.eval(), tokens)[..., :300]
    assert (ours - hf_logits(source, tokens)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_reimport_round_trips_bit_for_bit(tmp_path, cpu_runtime, tie):
    source = make_hf_llama(tmp_path / "hf", tie=tie)
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    export.export_hf(export_cfg(tmp_path / "ckpt", tmp_path / "exported"))
    original, exported = SafetensorsFolder(source), SafetensorsFolder(tmp_path / "exported")
    expected = set(original.keys()) - ({"lm_head.weight"} if tie else set())
    assert set(exported.keys()) == expected
    for name in exported.keys():
        assert torch.equal(original.get(name), exported.get(name)), name
    import_.import_hf(import_cfg(tmp_path / "exported", tmp_path / "ckpt2"))
    first, _ = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    second, _ = checkpoint.load_model(tmp_path / "ckpt2", cpu_runtime)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_export_loads_in_transformers_without_warnings(tmp_path, cpu_runtime):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    source = make_hf_llama(tmp_path / "hf")
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    export.export_hf(export_cfg(tmp_path / "ckpt", tmp_path / "exported"))
    logging.set_verbosity_warning()
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def test_import_is_skipped_when_done_refuses_another_checkpoint_and_force_replaces(tmp_path, cpu_runtime,
                                                                                    capsys):
    first = make_hf_llama(tmp_path / "a", seed=0)
    second = make_hf_llama(tmp_path / "b", seed=1)
    import_.import_hf(import_cfg(first, tmp_path / "ckpt"))
    import_.import_hf(import_cfg(first, tmp_path / "ckpt"))
    assert "up to date; skipping" in capsys.readouterr().out
    with pytest.raises(UserError, match="already holds a different import result.*fix: import.output"):
        import_.import_hf(import_cfg(second, tmp_path / "ckpt"))
    assert read_manifest(tmp_path / "ckpt")["source"] == str(first.resolve())
    import_.import_hf(import_cfg(second, tmp_path / "ckpt"), force=True)
    assert read_manifest(tmp_path / "ckpt")["source"] == str(second.resolve())


def _cli_error(result):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_input_gives_one_line_error(tmp_path):
    good = make_hf_llama(tmp_path / "good")
    not_llama = tmp_path / "mistral"
    shutil.copytree(good, not_llama)
    config = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    yarn = tmp_path / "yarn"
    shutil.copytree(good, yarn)
    (yarn / "config.json").write_text(json.dumps(
        {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}))
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    cases = {
        tmp_path / "missing": "is not a folder",
        not_llama: "model_type 'mistral' is not supported",
        yarn: "rope_scaling type 'yarn' is not supported",
        truncated: "is truncated",
    }
    for source, message in cases.items():
        output = tmp_path / f"out-{source.name}"
        line = _cli_error(run_script("scripts/import.py", f"import.source={source}",
                                     f"import.output={output}"))
        assert message in line and "fix: import.source" in line, line
        assert not output.exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "something.txt").write_text("keep me")
    line = _cli_error(run_script("scripts/import.py", f"import.source={good}",
                                 f"import.output={occupied}"))
    assert "fix: import.output" in line
    assert (occupied / "something.txt").read_text() == "keep me"


def test_hub_id_that_cannot_be_fetched_names_the_key(tmp_path):
    result = run_script("scripts/import.py", "import.source=no-such-org/no-such-model",
                        f"import.output={tmp_path / 'out'}", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "fix: import.source" in result.stderr, result.stderr[-2000:]


def test_export_replaces_an_older_export_of_the_same_checkpoint_and_refuses_another(tmp_path, cpu_runtime, capsys):
    """A student distilled again is exported again to the same folder; another checkpoint is refused."""
    import_.import_hf(import_cfg(make_hf_llama(tmp_path / "a", seed=0), tmp_path / "ckpt"))
    export.export_hf(export_cfg(tmp_path / "ckpt", tmp_path / "out"))
    first = read_manifest(tmp_path / "out")
    time.sleep(1.1)   # the export's inputs know the checkpoint by its path and written_at (to the second)
    import_.import_hf(import_cfg(make_hf_llama(tmp_path / "b", seed=1), tmp_path / "ckpt"), force=True)
    export.export_hf(export_cfg(tmp_path / "ckpt", tmp_path / "out"))
    assert "holds an older result made from" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out")["inputs"] != first["inputs"]
    import_.import_hf(import_cfg(make_hf_llama(tmp_path / "c", seed=2), tmp_path / "other"))
    with pytest.raises(UserError, match="already holds a different export result.*fix: export.output"):
        export.export_hf(export_cfg(tmp_path / "other", tmp_path / "out"))
