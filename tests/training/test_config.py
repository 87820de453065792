"""The training config: one head config (the library's), one data mapping, presets, overrides."""

from __future__ import annotations

import dataclasses

import pytest

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.training.config import (
    DataSettings,
    HeadSettings,
    data_config,
    head_config,
    load_train_config,
)
from cpd_mtp.training.data import DataConfig


def test_head_settings_are_the_library_config_without_the_model_sizes():
    library = {f.name: f.default for f in dataclasses.fields(CPDMTPConfig)}
    del library["hidden_size"], library["vocab_size"]
    assert {f.name: f.default for f in dataclasses.fields(HeadSettings)} == library


def test_every_head_field_is_settable_and_reaches_the_head_config():
    overrides = ["head.chunk_bytes=4096", "head.ignore_index=-1", "head.loss_impl=chunked"]
    cfg = load_train_config("tiny", overrides)
    head = head_config(cfg.head, hidden_size=32, vocab_size=300)
    assert isinstance(head, CPDMTPConfig)
    assert (head.chunk_bytes, head.ignore_index, head.loss_impl) == (4096, -1, "chunked")
    assert (head.hidden_size, head.vocab_size, head.n_future, head.rank) == (32, 300, 3, 2)


@pytest.mark.parametrize(
    "override",
    ["head.hidden_size=8", "head.expert_type=dense", "head.chunk_bytes=big", "head.nope=1"],
)
def test_bad_head_keys_and_types_are_refused_at_load(override):
    with pytest.raises(ValueError, match="bad training config"):
        load_train_config("tiny", [override])


def test_data_settings_map_every_field_onto_data_config():
    settings = {f.name for f in dataclasses.fields(DataSettings)}
    assert settings == {f.name for f in dataclasses.fields(DataConfig)} - {"progress"}
    cfg = load_train_config("tiny", ["data.cache_dir=/tmp/c", "data.text_field=content"])
    data = data_config(cfg.data, progress=False)
    assert (data.cache_dir, data.text_field, data.progress) == ("/tmp/c", "content", False)
    assert (data.vocab_size, data.block_size, data.max_files) == (300, 32, 40)


def test_unknown_preset_and_key_fail_early():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        load_train_config("nope")
    with pytest.raises(ValueError, match="bad training config"):
        load_train_config("tiny", ["run.stepz=3"])
    with pytest.raises(ValueError, match="bad training config"):
        load_train_config("tiny", ["run.steps=many"])
    with pytest.raises(ValueError, match="bad training config"):
        load_train_config("tiny", ["run.log_every=3"])  # removed: nothing read it


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.steps=many", "run.steps"),
        ("run.stepz=3", "run.stepz"),
        ("head.expert_type=dense", "head.expert_type"),
        ("optim.betas=high", "optim.betas"),
    ],
)
def test_load_errors_are_one_line_naming_the_key(override, key):
    with pytest.raises(ValueError) as info:
        load_train_config("tiny", [override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"bad training config: {key}: ")
