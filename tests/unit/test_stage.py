"""The stage runner's stamps: a run folder copied or moved elsewhere stays up to date."""

import dataclasses
import shutil

import pytest
from omegaconf import OmegaConf

from pipelines.core.artifacts import read_manifest, write_manifest
from pipelines.core.errors import UserError
from pipelines.stages.base import Stage, run, up_to_date


def counting_stage(calls: list) -> Stage:
    """A host-only stage whose inputs name a folder of the run, one of another run and one outside."""
    def work(cfg, layout, folder, inputs):
        calls.append(inputs)
        (folder / "out.txt").write_text("done")
        return {"source": inputs["student"]}

    return Stage(name="toy", output=lambda cfg: f"{cfg.run.dir}/toy", runtime=None, run=work,
                 inputs=lambda cfg: {"student": f"{cfg.run.dir}/prune_depth", "teacher": f"{cfg.paths.runs}/other/import",
                                     "data": cfg.data, "settings": {"lr": 1e-3, "hub": "HuggingFaceTB/SmolLM2-135M"}})


def config(runs, data) -> OmegaConf:
    return OmegaConf.create({"paths": {"runs": str(runs)}, "run": {"dir": "${paths.runs}/demo"}, "data": str(data)})


def test_a_copied_run_is_up_to_date_and_the_stage_gets_real_paths(tmp_path):
    calls = []
    stage = counting_stage(calls)
    first = run(stage, config(tmp_path / "runs", tmp_path / "data"))
    assert calls == [{"student": f"{tmp_path}/runs/demo/prune_depth", "teacher": f"{tmp_path}/runs/other/import",
                      "data": f"{tmp_path}/data", "settings": {"lr": 1e-3, "hub": "HuggingFaceTB/SmolLM2-135M"}}]
    assert first["inputs"]["student"] == "${run.dir}/prune_depth"
    assert first["inputs"]["teacher"] == "${paths.runs}/other/import"
    assert first["inputs"]["data"] == f"{tmp_path}/data"             # outside the runs: as it is
    assert first["inputs"]["settings"]["hub"] == "HuggingFaceTB/SmolLM2-135M"
    shutil.copytree(tmp_path / "runs", tmp_path / "moved")
    again = run(stage, config(tmp_path / "moved", tmp_path / "data"))
    assert len(calls) == 1 and again["inputs"] == first["inputs"]    # up to date where it was copied
    run(stage, config(tmp_path / "moved", tmp_path / "data2"))
    assert len(calls) == 2                                           # what lies outside still counts


def test_up_to_date_is_the_check_run_makes(tmp_path):
    """What the launcher asks before it starts a stage's process: the output when run would skip."""
    calls, read = [], []
    stage = counting_stage(calls)
    stage = dataclasses.replace(stage, inputs=lambda cfg, inputs=stage.inputs: read.append(1) or inputs(cfg))
    cfg = config(tmp_path / "runs", tmp_path / "data")
    assert up_to_date(stage, cfg) is None and read == []                # nothing there: the inputs are not read
    run(stage, cfg)
    assert up_to_date(stage, cfg) == tmp_path / "runs" / "demo" / "toy"
    assert up_to_date(stage, config(tmp_path / "runs", tmp_path / "data2")) is None       # other inputs
    forced = OmegaConf.merge(cfg, {"force": True})
    assert up_to_date(stage, forced) is None
    run(stage, forced)
    assert len(calls) == 2                                              # and run agrees: force reruns


def test_a_stamp_of_real_paths_written_before_is_still_up_to_date(tmp_path):
    calls = []
    stage = counting_stage(calls)
    cfg = config(tmp_path / "runs", tmp_path / "data")
    folder = tmp_path / "runs" / "demo" / "toy"
    folder.mkdir(parents=True)
    write_manifest(folder, {"stage": "toy", "inputs": stage.inputs(cfg), "source": "x"})
    assert run(stage, cfg)["source"] == "x" and calls == []
    assert read_manifest(folder)["inputs"]["student"] == f"{tmp_path}/runs/demo/prune_depth"   # left as it was


def test_a_moved_run_replaces_its_own_older_result_of_a_hand_named_output(tmp_path):
    """export's case: replaces=False refuses a folder holding another result, but one made from
    the same origin (the student distilled again) is replaced, also after the run was moved."""
    calls = []

    def work(cfg, layout, folder, inputs):
        calls.append(inputs)
        return {"source": inputs["checkpoint"]}

    stage = Stage(name="toy", output=lambda cfg: f"{cfg.run.dir}/exported", runtime=None, run=work, replaces=False,
                  inputs=lambda cfg: {"checkpoint": f"{cfg.run.dir}/distill_depth", "data": cfg.data},
                  origin=lambda cfg: f"{cfg.run.dir}/distill_depth")
    first = run(stage, config(tmp_path / "runs", tmp_path / "data"))
    assert first["source"] == "${run.dir}/distill_depth"
    shutil.copytree(tmp_path / "runs", tmp_path / "moved")
    again = run(stage, config(tmp_path / "moved", tmp_path / "data2"))   # distilled again: a new result
    assert len(calls) == 2 and again["inputs"]["data"] == f"{tmp_path}/data2"
    other = dataclasses.replace(stage, origin=lambda cfg: f"{cfg.run.dir}/distill_width")
    with pytest.raises(UserError, match="already holds a different toy result"):
        run(other, config(tmp_path / "moved", tmp_path / "data3"))


def test_distill_keys_added_later_stay_out_of_the_stamp_while_off():
    """distill.quantize and distill.intermediate came after runs were stamped: at their off values
    a run stamped without them is still up to date; set, they are part of the stamp."""
    from helpers import compose

    from pipelines.training.plan import result_settings

    d = compose("pipeline", ["experiment=demo"]).distill
    assert "quantize" not in result_settings(d) and "intermediate" not in result_settings(d)
    assert "train_steps" in result_settings(d) and "output" not in result_settings(d)
    d = compose("pipeline", ["experiment=demo", "distill.quantize=fp8", "distill.teacher=online",
                             "distill.intermediate=[{student:0,teacher:0}]"]).distill
    assert result_settings(d)["quantize"] == "fp8"
    assert result_settings(d)["intermediate"] == [{"student": 0, "teacher": 0}]


def test_chat_keys_added_later_leave_prepared_data_up_to_date_at_their_off_values():
    """data.chat.role_map and data.chat.too_long came after conversations were first prepared: at
    null and drop, prepare's inputs are those of a config without them (no rerun); set, they count."""
    from helpers import compose

    from pipelines.stages.prepare import prepare_inputs

    cfg = compose("pipeline", ["experiment=smollm2_135m_chat"])
    before = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.set_struct(before, False)
    del before.data.chat["role_map"], before.data.chat["too_long"]
    assert prepare_inputs(cfg) == prepare_inputs(before)
    for key, value in (("role_map", "{human: user}"), ("too_long", "truncate")):
        changed = compose("pipeline", ["experiment=smollm2_135m_chat", f"data.chat.{key}={value}"])
        assert prepare_inputs(changed) != prepare_inputs(cfg)
