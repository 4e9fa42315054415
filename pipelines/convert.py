"""Import a Hugging Face Llama folder into an engine checkpoint, and export one back.

Used by ``scripts/import_hf.py`` and ``scripts/export_hf.py``. Import streams: tensors are read
one at a time (``pipelines.safetensors_stream``) into an uninitialised model, so the peak memory
is about one copy of the weights (``bench/import_memory.py`` measures it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipelines import checkpoint, hf_llama, runtime
from pipelines import model as model_lib
from pipelines.artifacts import read_manifest, sha256_file, staged_folder, write_manifest
from pipelines.errors import UserError, key_prefix, require
from pipelines.safetensors_stream import SafetensorsFolder, write_sharded

SINGLE_PROCESS = OmegaConf.create({"tensor": 1, "pipeline": 1, "context": 1})


def _required_path(cfg, key: str) -> Path:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    require(value not in (None, "???", ""), f"{key} is not set", key)
    return Path(str(value)).expanduser()


def _check_output(output: Path, inputs: dict) -> bool:
    """True if ``output`` already holds exactly this result; error if it holds something else."""
    if not output.exists():
        return False
    manifest = read_manifest(output)
    if manifest is None:
        require(not any(output.iterdir()), f"output folder {output} exists and is not a "
                "checkpoint; choose another or remove it", "output")
        output.rmdir()
        return False
    if manifest.get("inputs") != inputs:
        raise UserError(f"output folder {output} already holds a different checkpoint (made from "
                        f"{manifest.get('source')}); choose another output or remove it", "output")
    return True


def _copy_tokenizer(source: Path, destination: Path) -> list[str]:
    copied = []
    for name in hf_llama.TOKENIZER_FILES + ("special_token_ids.json",):
        if (source / name).exists():
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, destination / name)
            copied.append(name)
    return copied


def import_hf(cfg) -> dict:
    """Convert ``cfg.source`` (a Hugging Face Llama folder) into the checkpoint ``cfg.output``."""
    source, output = _required_path(cfg, "source"), _required_path(cfg, "output")
    arch = hf_llama.read_config(source, int(cfg.make_vocab_size_divisible_by))
    model_lib.validate(arch)
    reader = SafetensorsFolder(source)
    missing = sorted(hf_llama.expected_hf_names(arch) - set(reader.keys()))
    require(not missing, f"{source} lacks tensors {missing[:4]}{'...' if len(missing) > 4 else ''}",
            "source")
    hf_rows: dict[str, int] = {}
    for _, _, hf_name, _, rows in hf_llama.placements(arch):
        hf_rows[hf_name] = hf_rows.get(hf_name, 0) + rows
    for hf_name, rows in hf_rows.items():
        require(reader.shape(hf_name)[0] == rows, f"{source}: {hf_name} has shape "
                f"{reader.shape(hf_name)}, config.json implies {rows} rows", "source")
    inputs = {path.name: sha256_file(path) for path in [source / "config.json", *reader.files()]}
    if _check_output(output, inputs):
        print(f"[import] {output} already holds this checkpoint; nothing to do")
        return read_manifest(output)

    layout = runtime.initialize(SINGLE_PROCESS, reuse_freed_memory=False)
    dtype = reader.get("model.norm.weight").dtype
    # Built and filled in host memory with the local spec on any node (an 8B model fits; the
    # reader fills host tensors); the checkpoint keys are the TE spec's all the same.
    config = model_lib.transformer_config(arch, dtype, host=True)
    model = model_lib.build(arch, config, initialize=False, purpose="host")
    parameters = dict(model.named_parameters())
    on_device = [name for name, parameter in parameters.items() if parameter.device.type != "cpu"]
    if on_device:
        raise RuntimeError(f"import must fill host memory, but {on_device[:2]} were built on a device")
    shapes = hf_llama.megatron_shapes(arch)
    unset = set(parameters)
    with torch.no_grad():
        for name, row, hf_name, hf_row, rows in hf_llama.placements(arch):
            parameter = parameters[name]
            require(tuple(parameter.shape) == shapes[name] and reader.shape(hf_name)[1:] ==
                    list(parameter.shape[1:]), f"{source}: {hf_name} has shape "
                    f"{reader.shape(hf_name)}, config.json implies {list(shapes[name])}", "source")
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                parameter[arch["vocab_size"]:].zero_()  # vocabulary padding
            reader.read_rows(hf_name, hf_row, parameter.data[row:row + rows])
            unset.discard(name)
    if unset:
        raise RuntimeError(f"import left parameters unset: {sorted(unset)}")

    hf = json.loads((source / "config.json").read_text())
    token_ids = {key: hf.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    manifest = {
        "stage": "import",
        "source": str(source.resolve()),
        "inputs": inputs,
        "config": arch,
        "dtype": checkpoint.dtype_name(dtype),
        "parameters": model_lib.count_parameters(arch),
    }
    with staged_folder(output, layout.is_main) as staging:
        checkpoint.save_weights(model, staging, release_model=True)
        checkpoint.write_architecture(staging, arch, dtype)
        tokenizer = staging / "tokenizer"
        manifest["tokenizer_files"] = _copy_tokenizer(source, tokenizer)
        tokenizer.mkdir(exist_ok=True)
        (tokenizer / "special_token_ids.json").write_text(json.dumps(token_ids))
        manifest["content"] = checkpoint.content_digest(staging)
        write_manifest(staging, manifest)
    print(f"[import] {source} -> {output}: {manifest['parameters']:,} parameters, {manifest['dtype']}")
    return manifest


def export_hf(cfg) -> dict:
    """Write the checkpoint ``cfg.source`` as a Hugging Face Llama folder ``cfg.output``."""
    source, output = _required_path(cfg, "source"), _required_path(cfg, "output")
    arch, _ = checkpoint.read_architecture(source)
    source_manifest = read_manifest(source)
    inputs = {"checkpoint": str(source.resolve()), "written_at": source_manifest.get("written_at")}
    if _check_output(output, inputs):
        print(f"[export] {output} already holds this export; nothing to do")
        return read_manifest(output)

    layout = runtime.initialize(SINGLE_PROCESS, reuse_freed_memory=False)
    model, arch = checkpoint.load_model(source, layout, host=True)
    dtype = model.embedding.word_embeddings.weight.dtype
    state = model.state_dict()  # the host (local) spec: no TE _extra_state

    token_ids_path = source / "tokenizer" / "special_token_ids.json"
    token_ids = json.loads(token_ids_path.read_text()) if token_ids_path.exists() else {}
    manifest = {
        "stage": "export",
        "source": str(source.resolve()),
        "inputs": inputs,
        "config": arch,
        "parameters": model_lib.count_parameters(arch),
    }
    with staged_folder(output, layout.is_main) as staging:
        write_sharded(hf_llama.to_hf(state.__getitem__, arch), staging, int(cfg.max_shard_bytes))
        hf_config = hf_llama.hf_config(arch, dtype, token_ids.get("bos_token_id"),
                                       token_ids.get("eos_token_id"))
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        _copy_tokenizer(source / "tokenizer", staging)
        (staging / "special_token_ids.json").unlink(missing_ok=True)
        write_manifest(staging, manifest)
    print(f"[export] {source} -> {output}: {manifest['parameters']:,} parameters")
    return manifest


def import_stage(cfg) -> dict:
    """The pipeline's import stage: ``cfg.import_hf``, or a random ``cfg.model`` teacher (demo).

    With ``run.random_teacher`` the teacher is a random-initialised Hugging Face Llama of the
    ``model`` config, with the prepared data's tokenizer (written once to ``run.dir/random_hf``);
    the correct stage then pre-trains it.
    """
    from pipelines.random_hf import write_random_hf

    section = cfg.import_hf
    if cfg.run.random_teacher:
        hf = Path(str(cfg.run.dir)) / "random_hf"
        data_manifest = read_manifest(Path(str(cfg.data.output)))
        require(data_manifest is not None, f"no prepared data in {cfg.data.output}; run "
                "scripts/prepare_data.py (make prepare-data) first", "data.output")
        if not (hf / "config.json").exists():
            write_random_hf(OmegaConf.create({"output": str(hf), "model": OmegaConf.to_container(cfg.model),
                                              "seed": 0, "dtype": "float32"}))
            _copy_tokenizer(Path(data_manifest["tokenizer"]), hf)
        section = OmegaConf.merge(section, {"source": str(hf)})
    require(section.source is not None, "no Hugging Face teacher to import", "run.teacher_hf")
    source = str(section.source)
    if not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        section = OmegaConf.merge(section, {"source": hub_snapshot(source)})
    with key_prefix("import_hf"):
        return import_hf(section)


def hub_snapshot(repo_id: str) -> str:
    """Download (or find in the local Hugging Face cache) the files import needs of a Hub model."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as error:  # offline, gated, missing: say which key to change
        raise UserError(f"{repo_id!r} is not a local folder and the Hugging Face Hub did not provide it "
                        f"({type(error).__name__}); download it and point at the folder",
                        "import_hf.source") from None


def export_stage(cfg) -> dict:
    """The pipeline's export stage: ``cfg.export_hf``."""
    with key_prefix("export_hf"):
        return export_hf(cfg.export_hf)
