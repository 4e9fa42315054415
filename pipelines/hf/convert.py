"""Import a Hugging Face Llama folder into an engine checkpoint, and export one back.

Import streams: tensors are read one at a time (:mod:`pipelines.hf.safetensors_stream`) into an
uninitialised model, so the peak memory is about one copy of the weights
(``bench/import_memory.py`` measures it). The import and export stages
(:mod:`pipelines.stages.import_`, :mod:`pipelines.stages.export`) call these.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.core.artifacts import read_json, read_manifest, sha256_file
from pipelines.core.errors import UserError, require
from pipelines.hf import llama_map
from pipelines.hf.random_hf import write_random_hf
from pipelines.hf.safetensors_stream import SafetensorsFolder, write_sharded
from pipelines.model import build as model_lib
from pipelines.model import checkpoint

SINGLE_PROCESS = OmegaConf.create({"tensor": 1, "pipeline": 1, "context": 1})


def required_path(cfg, key: str) -> Path:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    require(value not in (None, "???", ""), f"{key} is not set", key)
    return Path(str(value)).expanduser()


def copy_tokenizer(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in llama_map.TOKENIZER_FILES + ("special_token_ids.json",):
        if (source / name).exists():
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def host_runtime(cfg):
    return distributed.initialize(SINGLE_PROCESS, reuse_freed_memory=False)


# ----------------------------------------------------------------------------- import


def import_source(cfg) -> Path:
    """The Hugging Face folder to import: ``import.source`` (a folder or a Hub id), or a random
    ``model.*`` teacher (``run.random_teacher``, the demo) with the prepared data's tokenizer,
    written once to ``run.dir/random_hf`` (the correct stage then pre-trains it)."""

    if OmegaConf.select(cfg, "run.random_teacher", default=False):
        hf = Path(str(cfg.run.dir)) / "random_hf"
        data_manifest = read_manifest(Path(str(cfg.data.output)))
        require(data_manifest is not None, f"no prepared data in {cfg.data.output}; run the prepare "
                "stage (make prepare) first", "data.output")
        if not (hf / "config.json").exists():
            write_random_hf(OmegaConf.create({"output": str(hf), "model": OmegaConf.to_container(cfg.model),
                                              "seed": 0, "dtype": "float32"}))
            copy_tokenizer(Path(data_manifest["tokenizer"]), hf)
        return hf
    value = OmegaConf.select(cfg, "import.source", throw_on_missing=False)
    require(value not in (None, "???", ""), "no Hugging Face teacher to import (import.source is not set)",
            "run.teacher_hf / import.source")
    source = str(value)
    if not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return Path(hub_snapshot(source))
    return Path(source).expanduser()


def import_inputs(cfg) -> dict:
    """The source's files by content (checked against its config.json first)."""
    source = import_source(cfg)
    arch = llama_map.read_config(source, int(cfg["import"].make_vocab_size_divisible_by), "import.source")
    model_lib.validate(arch)
    reader = SafetensorsFolder(source, "import.source")
    missing = sorted(llama_map.expected_hf_names(arch) - set(reader.keys()))
    require(not missing, f"{source} lacks tensors {missing[:4]}{'...' if len(missing) > 4 else ''}",
            "import.source")
    hf_rows: dict[str, int] = {}
    for _, _, hf_name, _, rows in llama_map.placements(arch):
        hf_rows[hf_name] = hf_rows.get(hf_name, 0) + rows
    for hf_name, rows in hf_rows.items():
        require(reader.shape(hf_name)[0] == rows, f"{source}: {hf_name} has shape "
                f"{reader.shape(hf_name)}, config.json implies {rows} rows", "import.source")
    return {path.name: sha256_file(path) for path in [source / "config.json", *reader.files()]}


def import_checkpoint(cfg, layout, staging: Path, inputs: dict) -> dict:
    """Convert the Hugging Face Llama folder :func:`import_source` into the checkpoint ``staging``."""
    source = import_source(cfg)
    arch = llama_map.read_config(source, int(cfg["import"].make_vocab_size_divisible_by), "import.source")
    reader = SafetensorsFolder(source)
    dtype = reader.get("model.norm.weight").dtype
    # Built and filled in host memory with the local spec on any node (an 8B model fits; the
    # reader fills host tensors); the checkpoint keys are the TE spec's all the same.
    config = model_lib.transformer_config(arch, dtype, device="cpu")
    model = model_lib.build(arch, config, initialize=False, purpose="host")
    parameters = dict(model.named_parameters())
    on_device = [name for name, parameter in parameters.items() if parameter.device.type != "cpu"]
    if on_device:
        raise RuntimeError(f"import must fill host memory, but {on_device[:2]} were built on a device")
    shapes = llama_map.megatron_shapes(arch)
    unset = set(parameters)
    with torch.no_grad():
        for name, row, hf_name, hf_row, rows in llama_map.placements(arch):
            parameter = parameters[name]
            require(tuple(parameter.shape) == shapes[name] and reader.shape(hf_name)[1:] ==
                    list(parameter.shape[1:]), f"{source}: {hf_name} has shape "
                    f"{reader.shape(hf_name)}, config.json implies {list(shapes[name])}", "import.source")
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                parameter[arch["vocab_size"]:].zero_()  # vocabulary padding
            reader.read_rows(hf_name, hf_row, parameter.data[row:row + rows])
            unset.discard(name)
    if unset:
        raise RuntimeError(f"import left parameters unset: {sorted(unset)}")

    hf = read_json(source / "config.json", "import.source")
    token_ids = {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    fields = {"source": str(source.resolve()), "config": arch, "dtype": checkpoint.dtype_name(dtype),
              "parameters": model_lib.count_parameters(arch)}
    if layout.is_main:
        checkpoint.save_weights(model, staging, release_model=True)
        checkpoint.write_architecture(staging, arch, dtype)
        tokenizer = staging / "tokenizer"
        fields["tokenizer_files"] = copy_tokenizer(source, tokenizer)
        tokenizer.mkdir(exist_ok=True)
        (tokenizer / "special_token_ids.json").write_text(json.dumps(token_ids))
        fields["content"] = checkpoint.content_digest(staging)
    print(f"[import] {source} -> {cfg['import'].output}: {fields['parameters']:,} parameters, {fields['dtype']}")
    return fields


# ----------------------------------------------------------------------------- export


def export_inputs(cfg) -> dict:
    source = required_path(cfg, "export.source")
    checkpoint.read_architecture(source, "export.source")
    return {"checkpoint": str(source.resolve()), "written_at": read_manifest(source).get("written_at")}


def export_checkpoint(cfg, layout, staging: Path, inputs: dict) -> dict:
    """Write the checkpoint ``export.source`` as a Hugging Face Llama folder ``staging``."""
    section = cfg["export"]
    source = required_path(cfg, "export.source")
    model, arch = checkpoint.load_model(source, layout, host=True)
    dtype = model.embedding.word_embeddings.weight.dtype
    state = model.state_dict()  # the host (local) spec: no TE _extra_state
    token_ids_path = source / "tokenizer" / "special_token_ids.json"
    token_ids = json.loads(token_ids_path.read_text()) if token_ids_path.exists() else {}
    fields = {"source": str(source.resolve()), "config": arch, "parameters": model_lib.count_parameters(arch)}
    if layout.is_main:
        write_sharded(llama_map.to_hf(state.__getitem__, arch), staging, int(section.max_shard_bytes))
        hf_config = llama_map.hf_config(arch, dtype, token_ids.get("bos_token_id"), token_ids.get("eos_token_id"))
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        copy_tokenizer(source / "tokenizer", staging)
        (staging / "special_token_ids.json").unlink(missing_ok=True)
    print(f"[export] {source} -> {section.output}: {fields['parameters']:,} parameters")
    return fields


def export_to(source: Path, output: Path, layout, max_shard_bytes: int = 4 * 2**30) -> dict:
    """:func:`export_checkpoint` of ``source`` into the existing folder ``output``, outside the
    export stage (a stage's scratch copy: the harness's, quantize's and speed's input)."""
    section = {"source": str(source), "output": str(output), "max_shard_bytes": int(max_shard_bytes)}
    return export_checkpoint(OmegaConf.create({"export": section}), layout, output, {})


def hub_snapshot(repo_id: str) -> str:
    """Download (or find in the local Hugging Face cache) the files import needs of a Hub model."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as error:  # offline, gated, missing: say which key to change
        raise UserError(f"{repo_id!r} is not a local folder and the Hugging Face Hub did not provide it "
                        f"({type(error).__name__}); download it and point at the folder",
                        "import.source") from None


