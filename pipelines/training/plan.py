"""What a training stage reads, checked before any compute: :class:`Plan`.

Paths, sizes, the teacher's compatibility with the student (vocabulary, tokenizer) and the
cache's with the data; its ``inputs`` decide whether the stage is up to date.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import require
from pipelines.data.corpus import TokenWindows, check_tokenized_for, tokenizer_hash
from pipelines.data.logits_cache import LogitsCache
from pipelines.model import checkpoint
from pipelines.training import intermediate

# Keys that do not change the trained weights: changing one never restarts or blocks a resume
# (e.g. a smaller chunk_tokens after an out-of-memory error, a save_interval on requeue). The
# cache and output paths are not settings: the cache's content is in the inputs (its manifest).
NOT_RESULT_KEYS = ("output", "cache", "log_interval", "verify_cache", "chunk_tokens", "save_interval",
                   "eval_interval", "eval_samples", "eval_topk", "keep_checkpoints", "keep_final_checkpoint",
                   "recompute")
# Keys added after runs were stamped: at these values (off) they stay out of the stamp, so a run
# finished or interrupted before they existed is still up to date, or resumes.
LEFT_OUT_WHEN_OFF = {"quantize": None, "intermediate": []}


def result_settings(d) -> dict:
    """The section's keys that change the trained weights, as its stamp records them."""
    settings = OmegaConf.to_container(d, resolve=True)
    return {k: v for k, v in settings.items() if k not in NOT_RESULT_KEYS
            and not (k in LEFT_OUT_WHEN_OFF and v == LEFT_OUT_WHEN_OFF[k])}



class Plan:
    """What a training stage reads, checked before any compute: paths, sizes, the teacher's
    compatibility; its ``inputs`` decide whether the stage is up to date."""

    def __init__(self, cfg, data_parallel: int, section: str = "distill"):
        d = cfg[section]
        self.section = section
        self.cfg, self.d = cfg, d
        self.student, self.output = Path(str(d.student)), Path(str(d.output))
        require(self.student.is_dir() and read_manifest(self.student) is not None,
                f"student checkpoint {self.student} does not exist or is incomplete", f"{self.section}.student")
        self.arch, self.stored_dtype = checkpoint.read_architecture(self.student)
        self.data = Path(str(cfg.data.output))
        data_inputs = (read_manifest(self.data) or {}).get("inputs")
        self.teacher_kind = str(d.teacher)
        self.kd_weight = float(d.kd_weight)
        self.sequence_length = int(d.sequence_length)
        self.global_batch, self.micro_batch = int(d.global_batch_size), int(d.micro_batch_size)
        # divisible: checks() stops the stage before any compute otherwise
        self.microbatches = max(1, self.global_batch // (self.micro_batch * data_parallel))
        self.steps = int(d.train_steps)
        self.offset = int(d.get("sample_offset") or 0)
        self.renormalize = not bool(d.get("topk_tail", True))
        self.order = None   # position -> sample, within this run's own samples
        if d.get("data_seed") is not None:
            self.order = np.random.default_rng(int(d.data_seed)).permutation(self.steps * self.global_batch)
        check_tokenized_for(self.data, self.student, self.arch["vocab_size"], "data.tokenizer")
        self.windows = TokenWindows(self.data, "train", self.sequence_length)
        self.valid = TokenWindows(self.data, "valid", self.sequence_length)
        self.samples = len(self.windows)
        # conversations: each train sample's counted labels (the loss's normalizer per global batch)
        self.mask_counts = self.windows.mask_counts(self.samples) if self.windows.masked else None
        self.teacher_path = Path(str(d.teacher_checkpoint)) if d.get("teacher_checkpoint") else None
        self.cache = None
        if self.teacher_kind == "online":
            if self.teacher_path is None and OmegaConf.select(cfg, "run.teacher"):
                self.teacher_path = Path(str(cfg.run.teacher))   # the run's teacher (corrected when it is)
            require(self.teacher_path is not None, f"{section}.teacher=online needs the teacher checkpoint",
                    f"{self.section}.teacher_checkpoint")
            require(int(cfg.parallel.pipeline) == 1, "the online teacher runs with pipeline parallel "
                    "size 1 (cache the teacher's logits for pipeline-parallel students)", "parallel.pipeline")
        if self.teacher_kind == "cache":
            require(d.get("cache"), f"{section}.teacher=cache needs the teacher-logits folder", f"{self.section}.cache")
            expected = {"data_inputs": data_inputs,
                        "sequence_length": self.sequence_length, "temperature": float(d.temperature),
                        "tokenizer": tokenizer_hash(self.student)}
            self.cache = LogitsCache(Path(str(d.cache)), expected, verify=bool(d.verify_cache), windows=self.windows)
            reads = min(self.samples, self.offset + self.steps * self.global_batch)  # wraps over the data only
            require(len(self.cache) >= reads, f"the teacher-logits cache {d.cache} holds {len(self.cache)} "
                    f"samples and this run reads up to {reads} (sample_offset + train_steps x global_batch_size, "
                    "at most the data's); raise logits.samples and rerun make logits (finished shards are kept)",
                    "logits.samples")
            if self.teacher_path is None:
                manifest = self.cache.manifest  # caches written before content identities name the path there
                self.teacher_path = Path(manifest.get("teacher_path") or manifest["identity"]["teacher"])
        if self.teacher_path is not None:
            require(self.teacher_path.is_dir(), f"teacher checkpoint {self.teacher_path} does not exist",
                    f"{self.section}.teacher_checkpoint")
            self.teacher_arch, _ = checkpoint.read_architecture(self.teacher_path)
            require(self.teacher_arch["vocab_size"] == self.arch["vocab_size"],
                    f"teacher vocabulary {self.teacher_arch['vocab_size']} != student vocabulary "
                    f"{self.arch['vocab_size']}: distillation needs the same tokenizer",
                    f"{self.section}.teacher_checkpoint")
            ours, theirs = tokenizer_hash(self.student), tokenizer_hash(self.teacher_path)
            require(ours == theirs, f"teacher tokenizer ({self.teacher_path}/tokenizer) differs from the "
                    f"student's ({self.student}/tokenizer)", f"{self.section}.teacher_checkpoint")
        self.intermediate = []
        if d.get("intermediate"):   # checked as config by pipelines.stages.rules (teacher online, PP 1)
            self.intermediate = intermediate.pairs(d, section, self.student, self.arch, self.teacher_arch)
        self.inputs = {"student": str(self.student.resolve()),
                       "student_written_at": read_manifest(self.student).get("written_at"),
                       "teacher": str(self.teacher_path.resolve()) if self.teacher_path else None,
                       "cache": self.cache.manifest.get("written_at") if self.cache else None,
                       "data_inputs": data_inputs,
                       "settings": result_settings(d)}
