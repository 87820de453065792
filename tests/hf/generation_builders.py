"""Builders of the generation tests: a base-mode model whose drafts are accepted, its original
Hugging Face model, a word tokenizer over their vocabulary, and a recording streamer.

The models come from the decoding tests' builders (a tiny Llama trained briefly on periodic
sequences, see ``tests/decoding/decoding_builders.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "decoding"))

from decoding_builders import PAD, VOCAB, left_padded, periodic, trained_model
from test_base_mode import base_from_trained, retrofit

__all__ = [
    "PAD",
    "VOCAB",
    "RecordingStreamer",
    "accepting_pair",
    "left_padded",
    "periodic",
    "periodic_prompts",
    "trained_model",
    "word_tokenizer",
]


def accepting_pair(n_future: int = 4, rank: int = 2):
    """(original ``LlamaForCausalLM``, base-mode ``CPDMTPForCausalLM`` around a copy of it).

    The CP model's next-token logits are the original's, and its head was trained on the same
    periodic sequences, so on a periodic prompt most drafts are accepted.
    """
    original, model = retrofit(
        base_from_trained(n_future, rank), n_future, rank, head_from=trained_model(n_future, rank)
    )
    # The same generation defaults as the original: pad 0, no EOS.
    model.generation_config.pad_token_id = original.generation_config.pad_token_id
    model.generation_config.eos_token_id = original.generation_config.eos_token_id
    return original, model


def periodic_prompts(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) left-padded periodic prompts of different lengths and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    rows = periodic(batch, 12, g)
    return left_padded([rows[i, : 12 - 3 * i] for i in range(batch)])


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer over the tiny vocabulary: id 0 is "<pad>", ids 1..15 are the
    letters "a".."o" (so ids decode to plain text, and stop strings match it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": PAD, **{chr(ord("a") + i - 1): i for i in range(1, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>")
    tokenizer.padding_side = "left"
    return tokenizer


class RecordingStreamer(BaseStreamer):
    """Keeps every ``put`` (as a CPU tensor) and whether ``end`` was called."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        assert not self.ended, "put after end"
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True
