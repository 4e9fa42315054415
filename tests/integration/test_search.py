"""prune=search: a student by parameter budget, width and depth searched together (pipelines/pruning/search.py)."""

import json

import pytest
import torch
from helpers import export_cfg
from test_prune import prune_cfg

from pipelines import stages
from pipelines.core.errors import UserError
from pipelines.data.corpus import TokenWindows
from pipelines.model.build import count_parameters, exportable
from pipelines.pruning import search
from pipelines.stages import export


def search_cfg(teacher, data, output, *overrides):
    return prune_cfg(teacher, data, output, "search", *overrides)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, trained_teacher, tiny_data):
    """A search of the trained tiny teacher to 70% of its parameters, with its scores cached."""
    folder = tmp_path_factory.mktemp("search")
    cache = folder / "scores"
    manifest = stages.run("prune", search_cfg(trained_teacher, tiny_data, folder / "student",
                                             "prune.target_params=0.7", f"prune.scores_cache={cache}"))
    return folder, cache, manifest


def test_the_search_picks_the_best_scored_shape_within_the_budget(searched, trained_teacher):
    folder, _, manifest = searched
    report = manifest["report"]
    teacher_params = report["params_before"]
    budget = int(0.7 * teacher_params)
    assert report["target_params"] == budget
    assert report["params_after"] <= budget < teacher_params
    rows = report["candidates"]
    assert len(rows) == 10 and all(row["params"] <= budget for row in rows)
    # ModelOpt counts the padded vocabulary (300 -> 384 rows here) against the budget; so do we
    assert all(row["params"] < row["params_modelopt"] == search.counted({**report["config_before"],
                                                                         **row["architecture"]}) for row in rows)
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_loss"] == min(row["val_loss"] for row in rows)
    assert {k: report["config_after"][k] for k in chosen[0]["architecture"]} == chosen[0]["architecture"]
    # the later stages read the student's shape from its checkpoint
    written = json.loads((folder / "student" / "prune_report.json").read_text())
    assert written["config_after"] == manifest["config"] == report["config_after"]
    assert count_parameters(manifest["config"]) == report["params_after"]


def test_the_recorded_score_is_the_loss_of_that_shape_pruned_by_hand(searched, trained_teacher, tiny_data, tmp_path):
    """Width-prune the teacher by hand to the chosen shape, export it, and compute the validation
    loss with plain transformers: it equals the loss the search recorded for that candidate."""
    from transformers import AutoModelForCausalLM

    _, _, manifest = searched
    chosen = next(row for row in manifest["report"]["candidates"] if row["chosen"])
    shape = chosen["architecture"]
    assert shape["num_layers"] == 4   # the tiny teacher's 4 layers: 20% depth pruning keeps them all
    stages.run("prune", prune_cfg(trained_teacher, tiny_data, tmp_path / "by_hand", "width",
                                 f"prune.target.hidden_size={shape['hidden_size']}",
                                 f"prune.target.ffn_hidden_size={shape['ffn_hidden_size']}",
                                 f"prune.target.num_attention_heads={shape['num_attention_heads']}"))
    export.export_hf(export_cfg(tmp_path / "by_hand", tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in TokenWindows(tiny_data, "valid", 64).batches(4, 8):   # prune.eval_samples, sequence_length
            logits = model(batch[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += batch[:, 1:].numel()
    assert total / count == pytest.approx(chosen["val_loss"], abs=1e-4)
    # and a worse-scored candidate is a different shape with a higher loss
    others = [row for row in manifest["report"]["candidates"] if not row["chosen"]]
    assert all(row["architecture"] != shape and row["val_loss"] >= chosen["val_loss"] for row in others)


def test_another_budget_reuses_the_importance_scores(searched, trained_teacher, tiny_data, tmp_path, monkeypatch):
    """The second search never runs the calibration forward loop: ModelOpt restores the
    activations and layer scores from the cache (the forward loop would raise here)."""
    from pipelines.pruning import methods

    folder, cache, first = searched
    real = methods.minitron

    def no_calibration(model, arch, constraints, divisors, calib_batches, scores_path, search_config=None):
        def refuse():
            raise AssertionError("the calibration data was read again")
        return real(model, arch, constraints, divisors, refuse, scores_path, search_config)

    monkeypatch.setattr(methods, "minitron", no_calibration)
    second = stages.run("prune", search_cfg(trained_teacher, tiny_data, tmp_path / "smaller",
                                           "prune.target_params=0.6", f"prune.scores_cache={cache}"))
    assert second["report"]["params_after"] <= int(0.6 * first["report"]["params_before"])
    assert second["report"]["params_after"] < first["report"]["params_after"]


@pytest.mark.parametrize("override, key", [
    ("prune.target_params=1.0", "prune.target_params"),          # the teacher's own size
    ("prune.target_params=5000000", "prune.target_params"),      # above it
    ("prune.target_params=0.2", "prune.target_params"),          # below every shape within the limits
    ("prune.search.score=perplexity", "prune.search.score"),
    ("prune.search.max_width_pruning=1", "prune.search.max_width_pruning"),
    ("prune.search.hparams_to_skip=[heads]", "prune.search.hparams_to_skip"),
    ("+run.stage_parallel.prune={tensor:2}", "run.stage_parallel.prune"),
])
def test_bad_search_settings_name_the_key_before_any_compute(override, key, tmp_path, trained_teacher, tiny_data):
    from helpers import compose

    from pipelines.launch import preflight

    cfg = compose("pipeline", ["experiment=demo", "prune=search", "run.students=[search]", override,
                               "cluster.processes=2" if "tensor" in override else "prune.batch_size=4"])
    with pytest.raises(UserError, match=rf"\(fix: {key}"):
        preflight.check(cfg, ["prune"])
    if "tensor" in override:
        return   # one process here runs at tensor parallel size 1: the launcher's check is the one that counts
    with pytest.raises(UserError, match=rf"\(fix: {key}"):
        stages.run("prune", search_cfg(trained_teacher, tiny_data, tmp_path / "bad", override))
    assert not (tmp_path / "bad").exists()


def test_the_grid_is_modelopts():
    """Our enumeration of the search space (used before any compute) matches ModelOpt's own
    filtering of the same choices."""
    from modelopt.torch.prune.plugins.mcore_minitron import MCoreMinitronSearcher
    from omegaconf import OmegaConf

    teacher = {"num_layers": 30, "hidden_size": 576, "ffn_hidden_size": 1536, "num_attention_heads": 9,
               "num_query_groups": 3, "kv_channels": 64, "vocab_size": 49152, "tie_word_embeddings": True}
    settings = OmegaConf.create({"max_width_pruning": 0.4, "max_depth_pruning": 0.2,
                                 "hparams_to_skip": ["num_attention_heads"], "hidden_size_divisor": None,
                                 "ffn_hidden_size_divisor": None, "num_layers_divisor": 1})
    steps = search.divisors(teacher, settings)
    assert steps["hidden_size_divisor"] == 36 and steps["ffn_hidden_size_divisor"] == 64
    space = {"hidden_size": [c for c in range(1, 577) if c % 36 == 0],
             "ffn_hidden_size": [c for c in range(1, 1537) if c % 64 == 0],
             "num_attention_heads": [3, 6, 9], "num_layers": list(range(1, 31))}
    theirs = MCoreMinitronSearcher._generate_search_space_combos(space, 0.4, 0.2, ["num_attention_heads"])
    ours = search.grid(teacher, settings)
    assert [{k: s[k] for k in ("hidden_size", "ffn_hidden_size", "num_layers")} for s in ours] == theirs
    assert all(exportable(s) for s in ours) and {s["hidden_size"] for s in ours} >= {504, 576}
