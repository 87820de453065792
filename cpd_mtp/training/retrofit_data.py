"""A retrofit's data: the prompts, the model's own answers and their states, the batches.

The first of a retrofit's three parts (data, training, export with measurement):

1. **Prompts** (:func:`make_prompts`). For a model with a chat template, a share
   ``data.chat_share`` of the prompts are chat turns (ShareGPT's first user turns, or
   ``data.prompts``, a JSONL of your own) put through the template; the rest are code, cut
   from the corpus (``data.source``, the standard library by default). A fixed share of the
   chat turns and the corpus's validation documents are held out: never trained on, they are
   what the end-of-run measurement decodes.
2. **Answers** (``cpd_mtp.training.self_generate``): the model continues every prompt
   greedily, and the decoder keeps the trunk state of every token it fed, so the head's
   training inputs need no second pass.
3. **Batches** (:class:`ExampleBatches`): each example's last prompt position and its answer,
   right-padded; the labels are the answer's tokens (the prompt's are ``ignore_index``), so
   the loss falls on the answer only, with the states computed in the prompt's full context.

``data.distill`` ``kl`` and ``none`` train on corpus blocks instead (their trunk states cached
by ``cpd_mtp.training.state_cache``): :class:`BlockBatches`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cpd_mtp.config import IGNORE_INDEX
from cpd_mtp.training.prompts import (
    encode_chat,
    has_chat_template,
    read_prompt_file,
    sharegpt_path,
    sharegpt_prompts,
    split_prompts,
)
from cpd_mtp.training.self_generate import GeneratedExamples

__all__ = ["BlockBatches", "ExampleBatches", "Prompts", "chat_prompts", "make_prompts"]

HELD_OUT_SALT = "cpd_mtp-retrofit-held-out"


@dataclass
class Prompts:
    """A retrofit's prompts: what it generates from, and what it measures on.

    Attributes:
        train: token ids per training prompt, in generation order (chat and code mixed).
        kinds: ``"chat"`` or ``"code"`` per training prompt.
        held_out: per kind, 1-D token-id tensors never trained on (chat: through the template).
        notes: what was decided along the way, in plain words (the run prints them).
    """

    train: list[list[int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    held_out: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.kinds)


def _interleave(chat: list[Any], code: list[Any], share: float, total: int) -> list[tuple]:
    """``total`` (kind, prompt) pairs, chat at ``share`` of every stretch, in order."""
    out: list[tuple] = []
    chat_it, code_it = iter(chat), iter(code)
    taken_chat = 0
    for i in range(total):
        want_chat = math.floor((i + 1) * share) > taken_chat
        source = [("chat", chat_it), ("code", code_it)]
        if not want_chat:
            source.reverse()
        for kind, it in source:
            item = next(it, None)
            if item is not None:
                out.append((kind, item))
                taken_chat += kind == "chat"
                break
        else:
            break
    return out


def chat_prompts(
    data: Any, tokenizer: Any, *, seed: int, total: int, held: int
) -> tuple[list[list[int]], list[list[int]], list[str], bool]:
    """(training ids, held-out ids, notes, templated) of the chat side of a retrofit's data:
    ``data.prompts`` (a JSONL) or ShareGPT, through the chat template when the model has one
    and ``data.chat_share`` > 0. ``total`` and ``held``: how many of each to tokenize at most.

    Raises:
        ValueError: a JSONL error, or chat messages for a model without a chat template.
        RuntimeError: the ShareGPT file is needed, missing, and cannot be fetched.
    """
    templated = has_chat_template(tokenizer)
    notes: list[str] = []
    if data.prompts is not None:
        given = read_prompt_file(data.prompts, data.prompt_field)
        if any(not isinstance(p, str) for p in given) and not templated:
            raise ValueError(
                f"{data.prompts} holds chat messages, but the model's tokenizer has no chat "
                "template to put them through"
            )
        train, held_out = split_prompts(given, data.held_out, HELD_OUT_SALT)
        random.Random(seed).shuffle(train)
        notes.append(f"prompts: {len(given):,} from {data.prompts}")
        chat = templated and data.chat_share > 0
    elif data.chat_share > 0 and templated:
        texts = sharegpt_prompts(sharegpt_path(data.cache_dir))
        train, held_out = split_prompts(texts, data.held_out, HELD_OUT_SALT)
        random.Random(seed).shuffle(train)
        notes.append(f"chat prompts: ShareGPT's first user turns ({len(train):,} to train on)")
        chat = True
    else:
        if data.chat_share > 0:
            notes.append(
                "the model's tokenizer has no chat template: training on code prompts only "
                "(data.chat_share ignored)"
            )
        return [], [], notes, False

    def encode(prompt: Any) -> list[int]:
        return encode_chat(tokenizer, prompt) if chat else tokenizer(prompt).input_ids

    # Only as many as the run can use are tokenized (there are thousands).
    return [encode(p) for p in train[:total]], [encode(p) for p in held_out[:held]], notes, chat


def make_prompts(
    data: Any,
    tokenizer: Any,
    code_blocks: np.ndarray | None,
    held_out_code: list[str],
    *,
    seed: int,
    total: int,
    measure_prompts: int,
) -> Prompts:
    """The training and held-out prompts of a generated-data retrofit.

    Args:
        data: the config's ``data`` section (``chat_share``, ``prompts``, ``prompt_field``,
            ``held_out``, ``prompt_length``, ``cache_dir``).
        tokenizer: the model's tokenizer.
        code_blocks: (N, T) corpus training blocks (code prompts are their first
            ``data.prompt_length`` tokens), or None for none.
        held_out_code: code prompt texts from the corpus's validation documents.
        seed: orders the prompts (a function of it).
        total: how many training prompts to list at most (generation stops by time or tokens
            before it runs out).
        measure_prompts: held-out prompts kept per kind.

    Raises:
        ValueError: prompts given but unusable, or no prompt at all.
        RuntimeError: the ShareGPT file is needed, missing, and cannot be fetched.
    """
    out = Prompts()
    chat, held_chat, out.notes, templated = chat_prompts(
        data, tokenizer, seed=seed, total=total, held=4 * measure_prompts
    )
    code: list[list[int]] = []
    if code_blocks is not None and len(code_blocks):
        order = random.Random(seed).sample(range(len(code_blocks)), len(code_blocks))
        code = [code_blocks[i][: data.prompt_length].tolist() for i in order[:total]]
    if not chat and not code:
        raise ValueError("no prompt to generate from: give a corpus (--data) or prompts")
    share = (data.chat_share if code else 1.0) if chat else 0.0
    for kind, ids in _interleave(chat, code, share, total):
        out.train.append(ids)
        out.kinds.append(kind if templated or kind == "code" else "text")
    # Measurement prompts: the shortest held-out ones keep the measurement short.
    if held_chat:
        kind = "chat" if templated else "text"
        out.held_out[kind] = [torch.tensor(p) for p in sorted(held_chat, key=len)[:measure_prompts]]
    if held_out_code and share < 1.0:
        out.held_out["code"] = [
            tokenizer(t, return_tensors="pt").input_ids[0] for t in held_out_code[:measure_prompts]
        ]
    return out


# ---------------------------------------------------------------------- batches
class ExampleBatches:
    """Training batches of self-generated examples: their answers, in their own context.

    Example i becomes the positions from its last prompt token to its end: the hidden states
    the decoder kept for those tokens (the last token's, never fed, is zeros: it has no target
    left) and labels aligned with them, the answer's ids (``IGNORE_INDEX`` for the prompt
    token). A head at that first position reads x_{t+1} = the answer's first token and predicts
    the ones after it, as it will when decoding starts.

    Args:
        examples: from ``cpd_mtp.training.self_generate.generate_examples``.
        indices: which examples (default all).
        max_positions: the longest window (an answer beyond it is cut).
    """

    def __init__(
        self,
        examples: GeneratedExamples,
        indices: list[int] | None = None,
        max_positions: int = 512,
    ) -> None:
        self.examples = examples
        self.indices = list(range(len(examples))) if indices is None else list(indices)
        self.max_positions = max_positions
        self.hidden_size = examples.states[0].shape[-1] if len(examples) else 0

    def __len__(self) -> int:
        return len(self.indices)

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(hidden (T, d) float32, labels (T,) int64) of example ``self.indices[i]``."""
        j = self.indices[i]
        ids, states = self.examples.ids[j], self.examples.states[j]
        start = self.examples.prompt_lengths[j] - 1
        end = min(len(ids), start + self.max_positions)
        hidden = np.zeros((end - start, self.hidden_size), dtype=np.float32)
        fed = min(end, len(states))  # states exist for every token but the last
        hidden[: fed - start] = states[start:fed]
        labels = ids[start:end].astype(np.int64).copy()
        labels[0] = IGNORE_INDEX  # the prompt's last token: an input, not a target
        return hidden, labels

    @property
    def target_tokens(self) -> int:
        """Answer tokens (the labels that are targets)."""
        return sum(
            min(len(self.examples.ids[j]), self.examples.prompt_lengths[j] - 1 + self.max_positions)
            - self.examples.prompt_lengths[j]
            for j in self.indices
        )

    @property
    def positions_per_item(self) -> int:
        """The mean window length (what a step's positions are counted by)."""
        if not self.indices:
            return 1
        lengths = [
            min(len(self.examples.ids[j]) - self.examples.prompt_lengths[j] + 1, self.max_positions)
            for j in self.indices
        ]
        return max(1, round(sum(lengths) / len(lengths)))

    def answer_ids(self) -> list[np.ndarray]:
        """Every example's answer tokens (for the draft vocabulary)."""
        return [self.examples.ids[j][self.examples.prompt_lengths[j] :] for j in self.indices]

    def batch(self, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, T, d) float32, labels (B, T) int64), right-padded to the longest."""
        windows = [self.window(int(i)) for i in index]
        width = max(len(labels) for _, labels in windows)
        hidden = np.zeros((len(windows), width, self.hidden_size), dtype=np.float32)
        labels = np.full((len(windows), width), IGNORE_INDEX, dtype=np.int64)
        for row, (h, lab) in enumerate(windows):
            hidden[row, : len(lab)] = h
            labels[row, : len(lab)] = lab
        return torch.from_numpy(hidden).to(device), torch.from_numpy(labels).to(device)


@dataclass
class BlockBatches:
    """Trunk states and labels of corpus blocks (``data.distill`` ``kl`` / ``none``).

    ``states.hidden[i]`` is (T, d) (memory-mapped), ``labels[i]`` (T,) int64 aligned with the ids.
    """

    states: Any  # cpd_mtp.training.state_cache.TrunkStates
    labels: np.ndarray  # (N, T) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def positions_per_item(self) -> int:
        return int(self.labels.shape[1])

    def batch(self, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, T, d) float32, labels (B, T) int64) of the blocks ``index``."""
        hidden = np.asarray(self.states.hidden[index], dtype=np.float32)
        return (
            torch.from_numpy(hidden).to(device),
            torch.from_numpy(self.labels[index]).to(device),
        )
