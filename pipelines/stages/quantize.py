"""The quantize stage: each distilled student quantized by ModelOpt and exported per format (``make quantize``).

``scripts/quantize.py``. For every ``quantize.formats`` entry, :func:`pipelines.quantization.ptq.quantize_export`
calibrates on ``quantize.calib_samples`` sequences of the run's training data and writes
``<quantize.output>/<format>/``: ModelOpt's unified Hugging Face checkpoint with the student's
tokenizer, which serving engines load and eval scores (fake-quantized, from those files).
``quantize_report.json`` holds each format's bytes, calibration and the check of its export.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipelines.core.artifacts import config_hash, read_manifest, sha256_file, write_json
from pipelines.core.errors import require
from pipelines.data.corpus import TokenWindows, check_tokenized_for
from pipelines.hf.convert import SINGLE_PROCESS, copy_tokenizer, export_to
from pipelines.model.checkpoint import DTYPES, read_architecture
from pipelines.quantization.ptq import FORMATS, check_formats, group_size, quantize_export
from pipelines.stages.base import Stage
from pipelines.stages.rules import positive_whole


def source(cfg) -> Path:
    return Path(str(cfg.quantize.source))


def quantize_inputs(cfg) -> dict:
    folder = source(cfg)
    manifest = read_manifest(folder) if folder.is_dir() else None
    require(manifest is not None and (folder / "model.yaml").exists(), f"{folder} is not a finished student "
            "(no manifest): distill it first (make distill)", "quantize.source")
    return {"source": str(folder.resolve()), "source_manifest_sha256": sha256_file(folder / "manifest.json"),
            "quantize": config_hash({k: v for k, v in OmegaConf.to_container(cfg.quantize).items()
                                     if k not in ("output", "source")}),
            "data": str(Path(str(cfg.data.output)).resolve())}


def checks(cfg, arch, layout) -> None:
    q = cfg.quantize
    # before a SLURM submission the job's GPU is not here; run() checks the device it got again
    check_formats(q.formats, torch.cuda.is_available() or OmegaConf.select(cfg, "cluster.kind") == "slurm")
    positive_whole(q.calib_samples, "quantize.calib_samples", 1, inclusive=True)
    positive_whole(q.sequence_length, "quantize.sequence_length", 2, inclusive=True)
    positive_whole(q.batch_size, "quantize.batch_size", 1, inclusive=True)
    require(str(q.export_dtype) in DTYPES, f"quantize.export_dtype {q.export_dtype} is not one of "
            f"{sorted(DTYPES)}", "quantize.export_dtype")
    if arch is not None:
        require(int(q.sequence_length) <= int(arch["max_position_embeddings"]), f"quantize.sequence_length "
                f"{q.sequence_length} exceeds the model's {arch['max_position_embeddings']} positions",
                "quantize.sequence_length")
    if arch is not None and any(FORMATS[str(f)][2] == 4 for f in q.formats):
        group_size(q.group_size, arch)
    if arch is not None and (source(cfg) / "tokenizer").is_dir():   # once the student exists
        check_tokenized_for(Path(str(cfg.data.output)), source(cfg), arch["vocab_size"], "data.tokenizer")


def calibration(cfg) -> tuple[list, object]:
    """``(calibration batches, the check batch)``: the first ``calib_samples`` training sequences,
    and one held-out batch the export is compared on: the inputs (``sequence_length`` tokens) of
    the windows every training stage reads, so conversations packed at that length line up, with
    where they begin where they are kept apart (``(tokens, starts or None)`` each)."""
    q = cfg.quantize
    length, batch = int(q.sequence_length), int(q.batch_size)
    train = TokenWindows(Path(str(cfg.data.output)), "train", length)
    require(len(train) >= int(q.calib_samples), f"the training split holds {len(train)} sequences of "
            f"{length} tokens, fewer than quantize.calib_samples={q.calib_samples}", "quantize.calib_samples")
    batches = list(train.input_batches(batch, int(q.calib_samples)))
    valid = TokenWindows(Path(str(cfg.data.output)), "valid", length)
    check = next(iter(valid.input_batches(min(batch, len(valid)), min(batch, len(valid)))))
    return batches, check


def run(cfg, layout, staging: Path, inputs: dict) -> dict:
    q = cfg.quantize
    formats = check_formats(q.formats, layout.device.type == "cuda")
    folder = source(cfg)
    arch = read_architecture(folder, "quantize.source")[0]
    started = time.perf_counter()
    hf = staging / "_hf"
    hf.mkdir()
    export_to(folder, hf, layout)
    batches, check = calibration(cfg)
    print(f"[quantize] {folder.name}: {len(formats)} formats, calibrating on {sum(t.numel() for t, _ in batches):,} "
          f"tokens of the training data", flush=True)
    report = {"source": str(folder.resolve()), "architecture": arch, "formats": {}}
    trained = (read_manifest(folder) or {}).get("quantize")   # distill.quantize: trained fake-quantized
    for fmt in formats:
        out = staging / fmt
        found = quantize_export(hf, fmt, batches, check, out, DTYPES[str(q.export_dtype)], layout,
                                group_size(q.group_size, arch) if FORMATS[fmt][2] == 4 else 128)
        copy_tokenizer(hf, out)   # the Hugging Face tokenizer files, beside the weights
        copy_tokenizer(folder / "tokenizer", out / "tokenizer")   # what eval's tokenizer checks read
        found["method"] = "QAD" if trained == fmt else "PTQ" + (f" (trained QAD {trained})" if trained else "")
        report["formats"][fmt] = found
        print(f"[quantize] {folder.name} {fmt} ({found['quant_algo']}, {found['method']}): "
              f"{found['bytes'] / 1e6:.2f} MB of weights, "
              f"mean |logit change| {found['logit_error']:.4f}, export read back within "
              f"{found['export_logit_drift']:.2g} ({found['seconds']:.1f} s)", flush=True)
    report["unquantized_bytes"] = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    shutil.rmtree(hf)
    report["seconds"] = time.perf_counter() - started
    write_json(staging / "quantize_report.json", report)
    return {"source": str(folder.resolve()), "formats": formats,
            "bytes": {f: r["bytes"] for f, r in report["formats"].items()},
            "unquantized_bytes": report["unquantized_bytes"]}


def runtime(cfg):
    from pipelines.backend import distributed

    return distributed.initialize(SINGLE_PROCESS, reuse_freed_memory=False)


STAGE = Stage(name="quantize", output=lambda cfg: Path(str(cfg.quantize.output)), inputs=quantize_inputs, run=run,
              checks=checks, source=source, runtime=runtime, per_student=True)
