"""Depth and width pruning of the tiny model."""

import pytest
import torch
from helpers import compose, export_cfg

from pipelines import stages
from pipelines.core.errors import UserError
from pipelines.hf.safetensors_stream import SafetensorsFolder
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits
from pipelines.stages import export

COMMON = ["prune.calib_samples=16", "prune.eval_samples=8", "prune.sequence_length=64",
          "prune.batch_size=4"]


def prune_cfg(teacher, data, output, mode, *overrides):
    return compose("pipeline", [f"prune={mode}", f"prune.source={teacher}", f"prune.output={output}",
                             f"data.output={data}", *COMMON, *overrides])


def tokens():
    return torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(5))


def test_explicit_drop_layers_equals_model_without_them(tmp_path, tiny_teacher, tiny_data, cpu_runtime):
    from transformers import LlamaForCausalLM

    stages.run("prune", prune_cfg(tiny_teacher, tiny_data, tmp_path / "depth", "depth", "prune.drop_layers=[1,2]"))
    model, arch = checkpoint.load_model(tmp_path / "depth", cpu_runtime)
    assert arch["num_layers"] == 2
    with torch.no_grad():
        ours = forward_logits(model.eval(), tokens())[..., :300]
    reference = LlamaForCausalLM.from_pretrained(tiny_teacher.parent / "random_hf").eval()
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (0, 3)])
    reference.config.num_hidden_layers = 2
    with torch.no_grad():
        expected = reference(tokens(), use_cache=False).logits
    assert (ours - expected).abs().max().item() <= 1e-5
    export.export_hf(export_cfg(tmp_path / "depth", tmp_path / "depth_hf"))
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "depth_hf")
    assert exported.config.num_hidden_layers == 2


def test_depth_criteria_score_every_block_reproducibly(tmp_path, trained_teacher, tiny_data,
                                                      cpu_runtime):
    from pipelines.data.corpus import TokenWindows

    reports = [stages.run("prune", prune_cfg(trained_teacher, tiny_data, tmp_path / f"d{i}", "depth",
                                   "prune.target_num_layers=2", f"prune.criterion={criterion}"))["report"]
               for i, criterion in enumerate(["loss", "loss", "block_influence"])]
    assert reports[0]["importance"] == reports[1]["importance"]
    assert list(reports[0]["importance"]) == ["0-1", "1-2", "2-3"]
    chosen = "{}-{}".format(reports[0]["removed"]["layers"][0], reports[0]["removed"]["layers"][-1])
    assert reports[0]["importance"][chosen] == min(reports[0]["importance"].values())
    assert reports[0]["val_loss_pruned"] == pytest.approx(reports[0]["importance"][chosen], rel=1e-6)
    assert len(reports[2]["importance"]) == 3
    # Independently, in plain transformers on the exported teacher: drop each block, score it.
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    export.export_hf(export_cfg(trained_teacher, tmp_path / "teacher_hf"))
    valid = list(TokenWindows(tiny_data, "valid", 64).batches(4, 8))
    losses = {}
    for first in range(3):
        model = LlamaForCausalLM.from_pretrained(tmp_path / "teacher_hf").eval()
        model.model.layers = torch.nn.ModuleList(layer for number, layer in enumerate(model.model.layers)
                                                 if number not in (first, first + 1))
        model.config.num_hidden_layers = len(model.model.layers)
        with torch.no_grad():
            total = sum(F.cross_entropy(model(batch[:, :-1], use_cache=False).logits.flatten(0, 1),
                                        batch[:, 1:].flatten(), reduction="sum").item() for batch in valid)
        losses[f"{first}-{first + 1}"] = total / sum(batch[:, 1:].numel() for batch in valid)
    for block, loss in losses.items():
        assert loss == pytest.approx(reports[0]["importance"][block], abs=1e-4), block
    assert min(losses, key=losses.get) == chosen
    assert losses[chosen] > reports[0]["val_loss_teacher"]  # a trained teacher loses something


def test_width_to_the_same_shape_keeps_logits(tmp_path, tiny_teacher, tiny_data, cpu_runtime):
    stages.run("prune", prune_cfg(tiny_teacher, tiny_data, tmp_path / "same", "width",
                        "prune.target.hidden_size=64", "prune.target.ffn_hidden_size=192",
                        "prune.target.num_attention_heads=4"))
    teacher, _ = checkpoint.load_model(tiny_teacher, cpu_runtime)
    pruned, _ = checkpoint.load_model(tmp_path / "same", cpu_runtime)
    with torch.no_grad():
        difference = forward_logits(teacher.eval(), tokens()) - forward_logits(pruned.eval(), tokens())
    assert difference.abs().max().item() <= 1e-5


def test_width_prune_reuses_cached_scores(tmp_path, tiny_teacher, tiny_data):
    """The cache's content decides the result: with its scores negated (the ranking reversed), a
    second prune with the same cache keeps other channels; recomputing would repeat the first."""
    from transformers import LlamaForCausalLM

    targets = ["prune.target.hidden_size=48", "prune.target.ffn_hidden_size=96",
               "prune.target.num_attention_heads=2", f"prune.scores_cache={tmp_path / 'scores'}"]
    stages.run("prune", prune_cfg(tiny_teacher, tiny_data, tmp_path / "w1", "width", *targets))
    scores_file = tmp_path / "scores" / "scores0.pth"
    scores = torch.load(scores_file, weights_only=False)

    def negate(value):
        if isinstance(value, dict):
            return {key: negate(item) for key, item in value.items()}
        if isinstance(value, list):
            return [negate(item) for item in value]
        return -value if isinstance(value, torch.Tensor) else value

    torch.save(negate(scores), scores_file)
    stages.run("prune", prune_cfg(tiny_teacher, tiny_data, tmp_path / "w2", "width", *targets))
    for name in ("w1", "w2"):
        export.export_hf(export_cfg(tmp_path / name, tmp_path / f"{name}_hf"))
    first, second = SafetensorsFolder(tmp_path / "w1_hf"), SafetensorsFolder(tmp_path / "w2_hf")
    mlp = "model.layers.0.mlp.down_proj.weight"
    assert first.shape(mlp) == second.shape(mlp) and not torch.equal(first.get(mlp), second.get(mlp))
    config = LlamaForCausalLM.from_pretrained(tmp_path / "w1_hf").config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (48, 96, 2)


@pytest.mark.parametrize("mode,override,key", [
    ("width", "prune.target.hidden_size=128", "prune.target.hidden_size"),
    ("width", "prune.target.num_attention_heads=3", "prune.target.num_attention_heads"),
    ("depth", "prune.target_num_layers=4", "prune.target_num_layers"),
    ("depth", "prune.drop_layers=[7]", "prune.drop_layers"),
])
def test_bad_targets_name_the_key(tmp_path, tiny_teacher, tiny_data, mode, override, key):
    with pytest.raises(UserError, match=f"fix: {key}"):
        stages.run("prune", prune_cfg(tiny_teacher, tiny_data, tmp_path / "bad", mode, override))
    assert not (tmp_path / "bad").exists()
