"""Exports: the tokenizer's special tokens, atomic replacement, checksums, non-finite weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

from cpd_mtp.hf import export
from cpd_mtp.hf.export import EXPORT_RECORD, ExportError, save_export
from cpd_mtp.hf.modeling import CPDMTPForCausalLM
from cpd_mtp.training.tokenizer import train_bpe_tokenizer

SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def tiny_model(tokenizer, seed: int = 0) -> CPDMTPForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    base = AutoModelForCausalLM.from_config(config)
    return CPDMTPForCausalLM.from_causal_lm(base, n_future=2, rank=2, expert_type="linear")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def assert_special_tokens_match(path: Path) -> None:
    """The reloaded export's three configs carry the reloaded tokenizer's bos/eos/pad ids."""
    reloaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = CPDMTPForCausalLM.from_pretrained(path, local_files_only=True)
    generation = GenerationConfig.from_pretrained(path, local_files_only=True)
    for config in (model.config, model.config.text_config, model.generation_config, generation):
        for name in SPECIAL:
            assert getattr(config, name) == getattr(reloaded, name), (type(config), name)


# ---------------------------------------------------------------------- special tokens
def test_an_export_carries_the_tokenizers_special_tokens(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    # The Llama defaults the trunk config starts with are not this tokenizer's ids.
    assert model.generation_config.eos_token_id != tokenizer.eos_token_id
    save_export(model, tokenizer, tmp_path / "final")
    assert_special_tokens_match(tmp_path / "final")


def test_the_trainers_export_carries_the_tokenizers_special_tokens(tmp_path):
    from cpd_mtp.training.config import load_train_config
    from cpd_mtp.training.trainer import Trainer

    trainer = Trainer(load_train_config("tiny", [f"run.out_dir={tmp_path / 'run'}"]))
    try:
        trainer.export(tmp_path / "run" / "final")
    finally:
        trainer.close()
    final = tmp_path / "run" / "final"
    assert export.verify_export(final) is not None
    assert (final / "train_config.json").is_file()
    assert_special_tokens_match(final)


# ---------------------------------------------------------------------- checksums
@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_flipped_byte_is_refused_naming_the_file(tokenizer, tmp_path, victim):
    path = save_export(tiny_model(tokenizer), tokenizer, tmp_path / "final")
    data = bytearray((path / victim).read_bytes())
    data[-len(data) // 3] ^= 0x01  # inside the tensor data for the weights: parses fine
    (path / victim).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=rf"is corrupt: {victim} does not match its record"):
        CPDMTPForCausalLM.from_pretrained(path, local_files_only=True)


def test_a_missing_file_is_refused_naming_it(tokenizer, tmp_path):
    path = save_export(tiny_model(tokenizer), tokenizer, tmp_path / "final")
    (path / "generation_config.json").unlink()
    with pytest.raises(ExportError, match=r"generation_config\.json is missing"):
        CPDMTPForCausalLM.from_pretrained(str(path), local_files_only=True)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.pop("files"),
        lambda r: r.update(files=["config.json"]),
        lambda r: r["files"]["config.json"].update(bytes="12"),
        lambda r: r["files"]["config.json"].pop("sha256"),
    ],
)
def test_a_malformed_record_is_an_export_error(tokenizer, tmp_path, edit):
    path = save_export(tiny_model(tokenizer), tokenizer, tmp_path / "final")
    record = json.loads((path / EXPORT_RECORD).read_text())
    edit(record)
    (path / EXPORT_RECORD).write_text(json.dumps(record))
    with pytest.raises(ExportError, match=f"(unreadable|malformed) {EXPORT_RECORD}"):
        CPDMTPForCausalLM.from_pretrained(path, local_files_only=True)


def test_the_record_lists_every_file_of_the_export(tokenizer, tmp_path):
    path = save_export(
        tiny_model(tokenizer),
        tokenizer,
        tmp_path / "final",
        extra_files={"train_config.json": "{}"},
    )
    record = export.verify_export(path)
    on_disk = {name for name in snapshot(path) if name != EXPORT_RECORD}
    assert set(record["files"]) == on_disk
    assert {"model.safetensors", "config.json", "train_config.json"} <= on_disk


# ---------------------------------------------------------------------- atomic replacement
def fail_in_model_write(monkeypatch):
    real = CPDMTPForCausalLM.save_pretrained

    def half_written(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        Path(directory, "model.safetensors").write_bytes(b"torn")
        raise RuntimeError("killed while writing the weights")

    monkeypatch.setattr(CPDMTPForCausalLM, "save_pretrained", half_written)


def fail_in_tokenizer_write(monkeypatch, tokenizer):
    def crash(directory, *args, **kwargs):
        Path(directory, "tokenizer.json").write_text("{")
        raise OSError("killed while writing the tokenizer")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)


def fail_in_the_swap(monkeypatch):
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".final.tmp"):
            raise OSError("killed between the two renames")
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)


@pytest.mark.parametrize("where", ["model", "tokenizer", "record", "swap"])
def test_an_export_killed_midway_leaves_the_previous_one_intact(
    tokenizer, tmp_path, monkeypatch, where
):
    old_model = tiny_model(tokenizer, seed=0)
    target = save_export(old_model, tokenizer, tmp_path / "final")
    before = snapshot(target)
    if where == "model":
        fail_in_model_write(monkeypatch)
    elif where == "tokenizer":
        fail_in_tokenizer_write(monkeypatch, tokenizer)
    elif where == "record":
        monkeypatch.setattr(export, "seal", lambda *args: 1 / 0)  # the record cannot be written
    else:
        fail_in_the_swap(monkeypatch)
    with pytest.raises((RuntimeError, OSError, ZeroDivisionError)):
        save_export(tiny_model(tokenizer, seed=1), tokenizer, target)
    monkeypatch.undo()
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary left
    loaded = CPDMTPForCausalLM.from_pretrained(target, local_files_only=True)
    for name, tensor in old_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


def test_a_new_export_replaces_the_old_one_completely(tokenizer, tmp_path):
    target = tmp_path / "final"
    save_export(
        tiny_model(tokenizer, seed=0),
        tokenizer,
        target,
        extra_files={"stale.txt": "from the old export"},
    )
    new_model = tiny_model(tokenizer, seed=1)
    save_export(new_model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the backup is gone
    loaded = CPDMTPForCausalLM.from_pretrained(target, local_files_only=True)
    for name, tensor in new_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


# ---------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("with_record", [True, False])
@pytest.mark.parametrize("weight", ["trunk.layers.0.mlp.up_proj.weight", "head.weight"])
def test_a_non_finite_weight_is_refused(tokenizer, tmp_path, value, with_record, weight):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.get_parameter(weight).view(-1)[7] = value
    path = tmp_path / "final"
    if with_record:  # the checksums match: the damage was there before the export
        save_export(model, tokenizer, path)
    else:
        model.save_pretrained(path)
    with pytest.raises(ExportError, match=rf"weight {weight} loaded from .* holds NaN or inf"):
        CPDMTPForCausalLM.from_pretrained(path, local_files_only=True)
