"""Conversations (``data.source=chat``): records of messages, rendered with the tokenizer's own chat
template, with a loss mask stored beside the tokens.

A record holds a list of messages under ``data.chat.messages_key``, each a mapping with a role
(``data.chat.role_key``, one of ``data.chat.roles`` once renamed by ``data.chat.role_map``, as
ShareGPT's ``{human: user, gpt: assistant}``) and a text (``data.chat.content_key``). The
records come from JSONL files (``data.files``), a Hugging Face dataset (``data.hf_name``), or the
built-in ``data.chat.view=austen``: a conversation-shaped view of Jane Austen's novels (each two
consecutive paragraphs, the first the user's turn, the second the assistant's), labelled as such
wherever it is used, since no package registry here ships an instruction data set.

**Rendering.** The conversation is rendered by the tokenizer's ``apply_chat_template`` (its own
template, or ``data.chat_template``: a Jinja string or a file) and tokenized as one text, then an
end-of-document token is appended. The loss mask (``data.chat.loss_on``): ``assistant`` marks
the tokens of each assistant turn, its closing marker included (what the model must learn to say
and where to stop): the tokens whose characters start between the rendering of the conversation
up to that turn with the generation prompt and its rendering up to the turn's end; ``all``
marks every token. A template whose rendering of a prefix is not
a prefix of the whole is refused, since the turns' tokens could not be found.

**Packing keeps conversations whole.** The tokens are laid out in segments of
``data.chat.sequence_length`` (the stages' sequence length, checked where the windows are read):
a conversation that does not fit in what is left of the current segment starts the next one, the
rest padded with end-of-document tokens that the mask leaves out. So no conversation is cut
between two training samples and no sample's loss reads a cut one. A conversation longer than a
segment is counted in the manifest (``too_long``) and dropped, or with
``data.chat.too_long=truncate`` cut to the segment (its tail, end of text included, lost).
``data.chat.packing``:

- ``isolated`` (the default): a sample holds as many whole conversations as fit, and each sees
  only itself: its positions start at 0 and attention stays within it (the per-document mask of
  :mod:`pipelines.ops.masks`, from where each begins: ``<split>.starts``, one byte a token). Every
  stage's model reads them so, and a conversation is scored as it would be alone. Through megatron's
  and torch's attention; transformer-engine's ignores the mask and is refused by name.
- ``one``: one conversation a sample, the rest padding: the same for any attention, TE included,
  at the cost of the padding's compute (the manifest counts it).
- ``shared``: as ``isolated``, but attention crosses from one conversation to the next (as packing
  documents does), the earlier ones context the mask never scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipelines.core.errors import UserError, require
from pipelines.data import hub

LOSS_ON = ("assistant", "all")
PACKING = ("isolated", "one", "shared")
TOO_LONG = ("drop", "truncate")


def austen_view(documents: list[str]) -> list[list[dict]]:
    """The conversation-shaped view of the Austen corpus: each two consecutive paragraphs of a
    document, the first the user's turn and the second the assistant's, after a fixed system message."""
    conversations = []
    for document in documents:
        paragraphs = [p.strip() for p in document.split("\n") if p.strip()]
        for first in range(0, len(paragraphs) - 1, 2):
            conversations.append([{"role": "system", "content": "Continue the passage."},
                                  {"role": "user", "content": paragraphs[first]},
                                  {"role": "assistant", "content": paragraphs[first + 1]}])
    return conversations


def _records(data_cfg):
    """``(where, record)`` of every record the data section names."""
    chat = data_cfg.chat
    if data_cfg.get("files"):
        for file in data_cfg.files:
            path = Path(str(file))
            require(path.exists(), f"data file {path} does not exist", "data.files")
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as error:
                        raise UserError(f"{path}:{number} is not a JSON record ({error.msg})", "data.files") from None
        return
    if data_cfg.get("hf_name"):
        dataset = hub.load_split(data_cfg, "a Hugging Face chat data set")
        hub.column(dataset, str(chat.messages_key), "data.chat.messages_key")
        for number, record in enumerate(dataset):
            yield f"{data_cfg.hf_name}[{number}]", record
        return
    raise UserError(f"data.source=chat reads data.files (JSONL), data.hf_name or data.chat.view=austen; "
                    f"none is set (view={chat.get('view')})", "data.files")


def conversation(record, where: str, chat) -> list[dict]:
    """One record's messages as ``[{role, content}]``, refused in one line naming the key when malformed."""
    key, role_key, content_key = str(chat.messages_key), str(chat.role_key), str(chat.content_key)
    roles = [str(r) for r in chat.roles]
    renamed = {str(k): str(v) for k, v in (chat.get("role_map") or {}).items()}
    require(isinstance(record, dict) and key in record, f"{where} has no '{key}' field", "data.chat.messages_key")
    messages = record[key]
    require(isinstance(messages, list) and messages, f"{where}: '{key}' is not a non-empty list of messages",
            "data.chat.messages_key")
    found = []
    for number, message in enumerate(messages):
        require(isinstance(message, dict) and role_key in message and content_key in message,
                f"{where}: message {number} lacks '{role_key}' or '{content_key}'", "data.chat.role_key")
        role, content = renamed.get(str(message[role_key]), message[role_key]), message[content_key]
        require(role in roles, f"{where}: message {number} has the role {role!r}, not one of {roles} (another "
                "data set's names, such as ShareGPT's human and gpt, map with data.chat.role_map)", "data.chat.roles")
        require(isinstance(content, str), f"{where}: message {number}'s '{content_key}' is not text",
                "data.chat.content_key")
        require(role != "assistant" or content.strip(), f"{where}: message {number} is an empty assistant turn",
                "data.files")
        found.append({"role": role, "content": content})
    return found


def read_conversations(data_cfg, documents_of_view=None) -> list[tuple[str, list[dict]]]:
    """``(where, messages)`` of every conversation; ``documents_of_view``: the view's corpus reader."""
    chat = data_cfg.chat
    if chat.get("view"):
        require(str(chat.view) == "austen", f"data.chat.view={chat.view}: the only view is austen", "data.chat.view")
        return [(f"austen view [{n}]", c) for n, c in enumerate(austen_view(documents_of_view()))]
    return [(where, conversation(record, where, chat)) for where, record in _records(data_cfg)]


def load_template(tokenizer, data_cfg) -> None:
    """Give ``tokenizer`` ``data.chat_template`` (a Jinja string, or a file holding one); refuse a
    tokenizer without a template of its own when none is given."""
    given = data_cfg.get("chat_template")
    if given:
        path = Path(str(given))
        tokenizer.chat_template = path.read_text() if len(str(given)) < 4096 and path.is_file() else str(given)
    require(getattr(tokenizer, "chat_template", None), f"the tokenizer in {data_cfg.tokenizer} has no chat "
            "template; give one (a Jinja string or file)", "data.chat_template")


class Renderer:
    """Conversations to ``(ids, mask)`` with a tokenizer's chat template (see the module)."""

    def __init__(self, tokenizer, loss_on: str):
        require(loss_on in LOSS_ON, f"data.chat.loss_on={loss_on} is not one of {LOSS_ON}", "data.chat.loss_on")
        self.tokenizer, self.loss_on = tokenizer, loss_on

    def _text(self, messages, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def __call__(self, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
        text = self._text(messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids) + 1, dtype=np.uint8)
        if self.loss_on == "all":
            mask[1:len(ids)] = 1
        else:   # the tokens that start inside an assistant turn's characters
            for number, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                head = self._text(messages[:number], generation_prompt=True) if number else ""
                upto = self._text(messages[:number + 1])
                require(text.startswith(head) and text.startswith(upto) and len(head) <= len(upto),
                        f"{where}: the chat template's rendering of the first {number + 1} messages is not a "
                        "prefix of the whole conversation, so the assistant's tokens cannot be found; use a template "
                        "that renders turn by turn", "data.chat_template")
                mask[:len(ids)][(starts >= len(head)) & (starts < len(upto))] = 1
        mask[0] = 0   # a conversation's first token is never a label: nothing of it comes before
        eos = self.tokenizer.eos_token_id
        return np.asarray([*ids, eos], dtype=np.int32), mask


def pack(items, window: int, pad: int, one: bool = False):
    """Lay ``(ids, mask)`` items out in segments of ``window`` tokens, none cut (see the module);
    ``one``: one item a segment. Yields ``(ids, mask, starts)`` chunks to write in order, ``starts``
    1 at the first token of each item and of each run of padding; items longer than a segment are
    skipped (the caller counts them)."""
    def padding(count: int):
        starts = np.zeros(count, dtype=np.uint8)
        starts[:1] = 1
        return np.full(count, pad, dtype=np.int32), np.zeros(count, dtype=np.uint8), starts

    used = 0
    for ids, mask in items:
        if len(ids) > window:
            continue
        if used and (one or used + len(ids) > window):
            yield padding(window - used)
            used = 0
        starts = np.zeros(len(ids), dtype=np.uint8)
        starts[0] = 1
        yield ids, mask, starts
        used = (used + len(ids)) % window
    # the last segment padded whole, plus the one token a window reads past its segment
    yield padding((window - used) % window + 1)
