"""Conversations (data.source=chat, pipelines/data/chat.py): rendered with a chat template, the loss
on the assistant's tokens through prepare, distill and eval, packed whole; bad records refused."""

import json

import numpy as np
import pytest
import torch
from helpers import WORDS, compose, train_losses

from pipelines import stages
from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import UserError
from pipelines.data.chat import pack
from pipelines.data.corpus import TokenWindows

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WINDOW = 256


def sentence(generator, words):
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=generator).tolist())


def conversations(count=80, seed=0, short=0):
    """``short`` conversations of a few words (several fit a window), then ``count`` of one or two exchanges."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for number in range(-short, count):
        turns = [{"role": "system", "content": "be brief"}]
        for _ in range(1 + number % 2 if number >= 0 else 1):
            turns += [{"role": "user", "content": sentence(generator, 4 if number >= 0 else 1)},
                      {"role": "assistant", "content": sentence(generator, 5 if number >= 0 else 2)}]
        found.append({"messages": turns})
    return found


def write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def chat_cfg(tmp_path, tiny_data, files, *overrides):
    template = tmp_path / "chatml.jinja"   # the tiny tokenizer has none: given as a file
    template.write_text(CHATML)
    return compose("pipeline", ["data.source=chat", f"data.files=[{','.join(str(f) for f in files)}]",
                                f"data.tokenizer={tiny_data / 'tokenizer'}", "data.train_tokenizer_vocab=null",
                                f"data.chat_template={template}", f"data.chat.sequence_length={WINDOW}",
                                "data.name=chat", f"data.output={tmp_path / 'chat'}", "data.valid_fraction=0.2",
                                *overrides])


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_data):
    folder = tmp_path_factory.mktemp("chat")
    records = conversations(short=60)
    records.append({"messages": [{"role": "user", "content": sentence(torch.Generator().manual_seed(9), 300)},
                                 {"role": "assistant", "content": "no"}]})   # longer than a window: dropped
    cfg = chat_cfg(folder, tiny_data, [write(folder / "chat.jsonl", records)])
    manifest = stages.run("prepare", cfg)
    return folder / "chat", manifest, records


def test_the_mask_marks_exactly_the_assistant_turns(chat_data, tiny_data):
    from transformers import AutoTokenizer

    data, manifest, records = chat_data
    chat = manifest["chat"]
    assert chat["window"] == WINDOW and chat["train"]["too_long"] + chat["valid"]["too_long"] == 1
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    tokens = np.memmap(data / "train.bin", dtype=np.int32, mode="r")
    mask = np.memmap(data / "train.mask", dtype=np.uint8, mode="r")
    said = tokenizer.decode(tokens[mask == 1].tolist())
    answers = {m["content"] + "<|im_end|>\n" for r in records for m in r["messages"] if m["role"] == "assistant"}
    # every masked-in token belongs to an assistant turn, and the train split's turns are all there in order
    pieces = said.split("<|im_end|>\n")[:-1]
    assert pieces and all(p + "<|im_end|>\n" in answers for p in pieces)
    share = chat["train"]["loss_share"]
    assert 0.2 < share < 0.8 and chat["train"]["loss_tokens"] == int(mask.sum())


def test_packing_keeps_every_conversation_whole():
    generator = np.random.default_rng(0)
    items = [(np.arange(n, dtype=np.int32) + 1, np.ones(n, dtype=np.uint8)) for n in generator.integers(5, 40, 50)]
    items.append((np.ones(WINDOW + 5, dtype=np.int32), np.ones(WINDOW + 5, dtype=np.uint8)))   # too long: skipped
    kept = [item for item in items if len(item[0]) <= WINDOW]
    for one in (False, True):
        chunks = list(pack(items, WINDOW, 0, one=one))
        stream, starts = (np.concatenate([chunk[i] for chunk in chunks]) for i in (0, 2))
        assert len(stream) % WINDOW == 1 and len(starts) == len(stream)
        position, segments = 0, set()
        for ids, _ in kept:
            found = next(p for p in range(position, len(stream)) if stream[p] == 1 and
                         np.array_equal(stream[p:p + len(ids)], ids))
            assert found // WINDOW == (found + len(ids) - 1) // WINDOW   # inside one window's segment
            assert starts[found] == 1 and not starts[found + 1:found + len(ids)].any()   # begins there, once
            segments.add(found // WINDOW)
            position = found + len(ids)
        # one: a segment each; else packed (these items average 22 tokens: about 11 a segment)
        assert len(segments) == len(kept) if one else len(segments) < len(kept) / 5


def test_the_loss_counts_assistant_tokens_only(chat_data, tiny_teacher, tmp_path, cpu_runtime):
    """A distill run on conversations: its validation loss is the masked mean with each packed
    conversation apart, which the eval stage's loss reproduces, and which differs from the mean over
    every token and from the mean with attention crossing between conversations."""
    from pipelines.model import build as model_lib
    from pipelines.model import checkpoint

    data, _, _ = chat_data
    manifest = stages.run("distill", compose("pipeline", [
        f"distill.student={tiny_teacher}", f"distill.output={tmp_path / 'ft'}", f"data.output={data}",
        "distill.teacher=none", "distill.kd_weight=0", f"distill.sequence_length={WINDOW}", "distill.train_steps=2",
        "distill.warmup_steps=1", "distill.micro_batch_size=2", "distill.global_batch_size=2",
        "distill.eval_samples=4", "distill.eval_interval=0", "distill.save_interval=0"]))
    model, arch = checkpoint.load_model(tmp_path / "ft", cpu_runtime)
    valid = TokenWindows(data, "valid", WINDOW)
    masked = model_lib.windows_loss(model, valid, 2, 4, arch["vocab_size"])   # each conversation apart
    crossing = model_lib.lm_loss(model, valid.batches(2, 4), arch["vocab_size"], masks=valid.mask_batches(2, 4))
    whole = model_lib.lm_loss(model, valid.batches(2, 4), arch["vocab_size"])
    # the validation kept each conversation apart (here they differ by 8e-4)
    assert manifest["final"]["val_loss"] == pytest.approx(masked, abs=1e-5)
    assert abs(masked - whole) > 1e-3 and abs(masked - crossing) > 2e-4


def test_hidden_state_terms_train_on_conversations(chat_data, tiny_teacher, tmp_path):
    """distill.intermediate with a loss mask: the terms count the assistant tokens' states (the
    arithmetic: test_intermediate.py); here the wiring, [b, s] mask against [s, b, h] states."""
    data, _, _ = chat_data
    stages.run("distill", compose("pipeline", [
        f"distill.student={tiny_teacher}", f"distill.output={tmp_path / 'kd'}", f"data.output={data}",
        "distill.teacher=online", f"distill.teacher_checkpoint={tiny_teacher}", f"distill.sequence_length={WINDOW}",
        "distill.intermediate=[{student:0,teacher:1,loss:cosine}]", "distill.train_steps=2", "distill.warmup_steps=1",
        "distill.micro_batch_size=2", "distill.global_batch_size=4", "distill.eval_samples=4",
        "distill.eval_interval=0", "distill.save_interval=0", "distill.log_interval=1"]))
    hidden = train_losses(tmp_path / "kd", "hidden")
    assert len(hidden) == 2 and all(0 < h < 2 for h in hidden)


def test_quantize_calibrates_on_conversations(chat_data, trained_teacher, tmp_path):
    """The quantize stage reads the windows every training stage reads (it read one token shorter,
    which conversations packed at the window refused)."""
    data, _, _ = chat_data
    manifest = stages.run("quantize", compose("pipeline", [
        f"data.output={data}", f"quantize.source={trained_teacher}", f"quantize.output={tmp_path / 'q'}",
        "quantize.formats=[fp8]", "quantize.calib_samples=4", "quantize.batch_size=2",
        f"quantize.sequence_length={WINDOW}"]))
    assert manifest["formats"] == ["fp8"] and (tmp_path / "q" / "fp8" / "hf_quant_config.json").exists()


def test_every_stage_reads_the_packed_length_or_is_refused_before_compute(tmp_path, tiny_data):
    from pipelines.launch import preflight

    cfg = chat_cfg(tmp_path, tiny_data, [tmp_path / "none.jsonl"], "experiment=demo", "quantize.sequence_length=64")
    with pytest.raises(UserError, match=r"quantize.sequence_length=64: .*packed whole into data.chat.sequence_length"):
        preflight.check(cfg, ["quantize"])


def test_another_sequence_length_is_refused(chat_data):
    data, _, _ = chat_data
    with pytest.raises(UserError, match=r"packed whole into 256 tokens.*fix: data.chat.sequence_length"):
        TokenWindows(data, "train", 128)


BAD = [
    ({"text": "hello"}, "data.chat.messages_key"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "data.chat.roles"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "data.files"),
    ({"messages": [{"role": "user"}]}, "data.chat.role_key"),
]


@pytest.mark.parametrize("record, key", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_a_bad_record_names_its_key_and_line(tmp_path, tiny_data, record, key):
    path = write(tmp_path / "bad.jsonl", [*conversations(4), record])
    with pytest.raises(UserError, match=rf"bad.jsonl:5.*\(fix: {key}"):
        stages.run("prepare", chat_cfg(tmp_path, tiny_data, [path]))


def test_sharegpt_records_through_a_role_map(tmp_path, tiny_data):
    """ShareGPT's shape (conversations / from / value, roles human and gpt), from JSONL or a local
    Hugging Face data set, renders to the same tokens and mask as the same turns in the messages
    shape; without the map its roles are refused by name."""
    records = conversations(20)
    renamed = {"system": "system", "user": "human", "assistant": "gpt"}
    shared = [{"conversations": [{"from": renamed[m["role"]], "value": m["content"]} for m in r["messages"]]}
              for r in records]
    keys = ["data.chat.messages_key=conversations", "data.chat.role_key=from", "data.chat.content_key=value"]
    for folder in "abcd":
        (tmp_path / folder).mkdir()
    with pytest.raises(UserError, match=r"role 'human'.*data.chat.role_map.*\(fix: data.chat.roles"):
        stages.run("prepare", chat_cfg(tmp_path / "a", tiny_data, [write(tmp_path / "sg.jsonl", shared)], *keys))
    stages.run("prepare", chat_cfg(tmp_path / "b", tiny_data, [tmp_path / "sg.jsonl"], *keys,
                                   "data.chat.role_map={human: user, gpt: assistant}"))
    stages.run("prepare", chat_cfg(tmp_path / "c", tiny_data, [write(tmp_path / "m.jsonl", records)]))
    (tmp_path / "e" / "records").mkdir(parents=True)   # the same records as a local Hugging Face data set
    write(tmp_path / "e" / "records" / "train.jsonl", shared)
    stages.run("prepare", chat_cfg(tmp_path / "e", tiny_data, [], *keys, f"data.hf_name={tmp_path / 'e' / 'records'}",
                                   "data.chat.role_map={human: user, gpt: assistant}"))
    for suffix in ("bin", "mask", "starts"):
        assert (tmp_path / "b" / "chat" / f"train.{suffix}").read_bytes() == \
            (tmp_path / "c" / "chat" / f"train.{suffix}").read_bytes() == \
            (tmp_path / "e" / "chat" / f"train.{suffix}").read_bytes()
    with pytest.raises(UserError, match=r"maps to \['bot'\].*\(fix: data.chat.role_map"):
        from pipelines.launch import preflight

        preflight.check(chat_cfg(tmp_path / "d", tiny_data, [tmp_path / "sg.jsonl"], "experiment=demo",
                                 "data.chat.role_map={gpt: bot}"), ["prepare"])


def test_a_conversation_longer_than_a_segment_is_dropped_or_truncated(tmp_path, tiny_data):
    """data.chat.too_long: drop (the default, counted) or truncate (a whole segment, cut: its first
    tokens and mask as the full rendering's)."""
    from transformers import AutoTokenizer

    from pipelines.data.chat import Renderer, load_template

    records = conversations(20)
    long = {"messages": [{"role": "user", "content": "tell me"},
                         {"role": "assistant", "content": sentence(torch.Generator().manual_seed(3), 300)}]}
    path = write(tmp_path / "chat.jsonl", [long, *records])
    made = {}
    for action in ("drop", "truncate"):
        (tmp_path / action).mkdir()
        made[action] = stages.run("prepare", chat_cfg(tmp_path / action, tiny_data, [path], f"data.chat.too_long={action}"))
    split = next(s for s in ("train", "valid") if made["drop"]["chat"][s]["too_long"] == 1)
    kept = {a: made[a]["chat"][split]["conversations"] for a in made}
    assert kept["truncate"] == kept["drop"] + 1 and made["truncate"]["chat"]["too_long_action"] == "truncate"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_data / "tokenizer"))
    cfg = chat_cfg(tmp_path, tiny_data, [path])
    load_template(tokenizer, cfg.data)
    ids, mask = Renderer(tokenizer, "assistant")(long["messages"], "long")
    assert len(ids) > WINDOW
    tokens = np.memmap(tmp_path / "truncate" / "chat" / f"{split}.bin", dtype=np.int32, mode="r")
    stored = np.memmap(tmp_path / "truncate" / "chat" / f"{split}.mask", dtype=np.uint8, mode="r")
    assert np.array_equal(tokens[:WINDOW], ids[:WINDOW]) and np.array_equal(stored[:WINDOW], mask[:WINDOW])
    assert stored[:WINDOW].sum() > WINDOW / 2   # the assistant's long answer, up to the cut


def test_no_template_and_an_empty_mask_are_refused(tmp_path, tiny_data):
    path = write(tmp_path / "chat.jsonl", conversations(20))
    with pytest.raises(UserError, match=r"no chat template.*\(fix: data.chat_template"):
        stages.run("prepare", chat_cfg(tmp_path, tiny_data, [path], "data.chat_template=null"))
    users = [{"messages": [m for m in r["messages"] if m["role"] != "assistant"]} for r in conversations(20)]
    with pytest.raises(UserError, match=r"leaves no token.*\(fix: data.chat.loss_on"):
        stages.run("prepare", chat_cfg(tmp_path, tiny_data, [write(tmp_path / "users.jsonl", users)]))
    assert read_manifest(tmp_path / "chat") is None


def test_the_cache_holds_the_assistant_tokens_labels_only(chat_data, trained_teacher, tmp_path, cpu_runtime):
    """The logits cache of conversations stores the labels the loss counts and no others: its
    bytes shrink by the prompt share, and what it gives back there is the teacher's own top-k;
    a distill run from it trains on finite losses."""
    from pipelines.data.logits_cache import LogitsCache
    from pipelines.model import checkpoint
    from pipelines.model.build import local_logits
    from pipelines.ops.kd_loss import teacher_topk

    data, prepared, _ = chat_data
    cache = tmp_path / "logits"
    manifest = stages.run("logits", compose("pipeline", [
        f"logits.teacher={trained_teacher}", f"logits.output={cache}", f"data.output={data}", "logits.mode=topk",
        "logits.k=8", "logits.value_dtype=float32", "logits.samples_per_shard=4", f"logits.sequence_length={WINDOW}",
        "logits.batch_size=4"]))
    windows = TokenWindows(data, "train", WINDOW)
    counted = int(windows.mask_counts(manifest["samples"]).sum())
    assert manifest["masked"] and manifest["loss_tokens"] == counted
    full = manifest["sample_bytes"] / WINDOW
    assert manifest["bytes_per_token"] == pytest.approx(full * counted / (manifest["samples"] * WINDOW), rel=0.02)
    read = LogitsCache(cache, windows=windows)
    model, arch = checkpoint.load_model(trained_teacher, cpu_runtime)
    model.eval()
    for sample in (0, manifest["samples"] - 1):   # the first sample of the first shard, the last of the last
        with torch.no_grad():
            ids, logprobs, _ = teacher_topk(local_logits(model, windows[sample][None, :-1], windows.starts(sample)[None]),
                                            8, vocab_size=arch["vocab_size"])
        where = windows.loss_mask(sample).bool()
        got_ids, got_logprobs, _ = read[sample]
        assert torch.equal(got_ids[where], ids[0][where])
        assert torch.allclose(got_logprobs[where], logprobs[0][where], atol=1e-5)
    distilled = stages.run("distill", compose("pipeline", [
        f"distill.student={trained_teacher}", f"distill.output={tmp_path / 'kd'}", f"data.output={data}",
        f"distill.cache={cache}", f"distill.sequence_length={WINDOW}", "distill.train_steps=2", "distill.warmup_steps=1",
        "distill.micro_batch_size=2", "distill.global_batch_size=2", "distill.eval_samples=4",
        "distill.eval_interval=0", "distill.save_interval=0"]))
    assert all(torch.isfinite(torch.tensor(v)) for v in distilled["final"].values() if isinstance(v, float))


def test_eval_scores_assistant_tokens_and_answers_the_prompts(chat_data, tiny_data, trained_teacher, tmp_path):
    """The eval stage on conversations: the validation loss over assistant tokens, and greedy answers
    to eval.generate's prompts through the chat template, which the report lists side by side."""
    data, _, _ = chat_data
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    run = tmp_path / "runs" / "chat"
    overrides = [f"eval.model={trained_teacher}", f"eval.output={run / 'eval' / 'teacher'}", f"data.output={data}",
                 "data.source=chat", f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.chat_template={template}",
                 "eval.mmlu.enabled=false", "eval.corpus.enabled=false", "eval.val_samples=4",
                 f"eval.sequence_length={WINDOW}", "eval.generate.prompts=[the letter,her sister]",
                 "eval.generate.max_new_tokens=6"]
    stages.run("eval", compose("pipeline", overrides))
    results = json.loads((run / "eval" / "teacher" / "results.json").read_text())
    assert results["val_tokens"] == "assistant"
    assert [g["prompt"] for g in results["generations"]] == ["the letter", "her sister"]
    assert all(isinstance(g["text"], str) for g in results["generations"])
    stages.run("report", compose("pipeline", [f"paths.runs={tmp_path / 'runs'}", "run.name=chat"]))
    text = (run / "report.md").read_text()
    assert "validation loss (assistant tokens)" in text and "## Generations" in text and "**the letter**" in text
