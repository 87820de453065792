"""The drafter-only export: the head of a retrofit, without the base model it drafts for.

``save_drafter`` writes the head's own tensors, the config, the tokenizer and the base's
identity; ``from_pretrained`` loads the recorded base (an HF folder or a GGUF file) or the one
given as ``base_model=``, checks its fingerprint and attaches the head. The reference is the
merged export of the same model (``save_export``): the same logits, the same greedy tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_llama_config
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cpd_mtp.hf import export
from cpd_mtp.hf.export import (
    DRAFTER_RECORD,
    DRAFTER_WEIGHTS,
    drafter_fingerprint,
    save_drafter,
    save_export,
)
from cpd_mtp.hf.loading import load_causal_lm
from cpd_mtp.hf.modeling import CPDMTPForCausalLM
from cpd_mtp.training.tokenizer import train_bpe_tokenizer

DRAFT_VOCAB = 64


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def save_base(folder: Path, tokenizer, seed: int, tied: bool = False) -> Path:
    """A random 2-layer Llama and its tokenizer as a Hugging Face folder: a stand-in base."""
    torch.manual_seed(seed)
    config = build_tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def retrofit(base, n_future: int = 3, rank: int = 2, draft_vocab: int = DRAFT_VOCAB, seed=0):
    """A base-mode model around ``base`` with a head moved away from its initialisation."""
    model = CPDMTPForCausalLM.from_causal_lm(
        base,
        n_future=n_future,
        rank=rank,
        next_token="base",
        freeze_trunk=True,
        draft_vocab_size=draft_vocab,
        expert_init_noise=0.1,
        balance_coef=0.02,  # not the default: the stored config must carry every field
    )
    g = torch.Generator().manual_seed(seed)
    vocab = model.head.config.vocab_size
    model.head.set_draft_vocab(torch.randperm(vocab, generator=g)[:draft_vocab])
    with torch.no_grad():
        for param in (*model.head.gate.parameters(), *model.head.experts.parameters()):
            noise = torch.randn(param.shape, generator=g, dtype=torch.float32)
            param.add_(0.1 * noise.to(param.dtype))
    return model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory, tokenizer):
    """A base folder, the retrofit of it, and its merged and drafter-only exports."""
    root = tmp_path_factory.mktemp("drafter")
    folder = save_base(root / "base", tokenizer, seed=0, tied=request.param)
    base, base_tokenizer = load_causal_lm(folder, progress=False)
    model = retrofit(base)
    save_export(model, base_tokenizer, root / "merged")
    save_drafter(model, base_tokenizer, root / "drafter", base_source=str(folder), progress=False)
    return SimpleNamespace(
        root=root,
        folder=folder,
        model=model,
        merged=root / "merged",
        drafter=root / "drafter",
        tied=request.param,
    )


def head_tensors(model: CPDMTPForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.head.state_dict().items() if k != "weight"}


def prompts(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))


def greedy(model: CPDMTPForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=12, do_sample=False, draft_tree="chain", context_drafts=False
        )


# ---------------------------------------------------------------------- what it holds
def test_the_drafter_export_holds_only_the_head(exported):
    model, drafter = exported.model, exported.drafter
    with safe_open(str(drafter / DRAFTER_WEIGHTS), "pt") as weights:
        keys = set(weights.keys())
    assert keys == {f"head.{k}" for k in head_tensors(model)}
    assert {"head.gate.weight", "head.gate.bias", "head.draft_ids"} <= keys
    assert not any(k.startswith("trunk.") or k == "head.weight" for k in keys)
    weight_files = [
        p.name for p in drafter.iterdir() if "safetensors" in p.name or ".bin" in p.name
    ]
    assert weight_files == [DRAFTER_WEIGHTS]

    # Its size is the head's bytes plus the safetensors header; the merged export is the model.
    head_bytes = sum(t.numel() * t.element_size() for t in head_tensors(model).values())
    size = (drafter / DRAFTER_WEIGHTS).stat().st_size
    assert head_bytes <= size <= head_bytes + 4096
    assert size * 4 < (exported.merged / "model.safetensors").stat().st_size

    # The full head config, the base's identity, and a record verify_export checks.
    config = json.loads((drafter / "config.json").read_text())
    assert config["head_config"] == model.head.config.to_dict()
    assert config["head_config"]["balance_coef"] == 0.02 and config["freeze_trunk"] is True
    record = json.loads((drafter / DRAFTER_RECORD).read_text())
    assert record["base_source"] == str(exported.folder)
    assert record["base_fingerprint"] == drafter_fingerprint(model)
    base, _ = load_causal_lm(exported.folder, progress=False)
    assert record["base_fingerprint"] == drafter_fingerprint(base)
    listed = set(export.verify_export(drafter)["files"])
    assert {DRAFTER_RECORD, DRAFTER_WEIGHTS, "config.json", "tokenizer.json"} <= listed


# ---------------------------------------------------------------------- loading it
def test_it_decodes_exactly_as_the_merged_export(exported):
    merged = CPDMTPForCausalLM.from_pretrained(exported.merged).eval()
    drafter = CPDMTPForCausalLM.from_pretrained(exported.drafter, local_files_only=True)
    auto = AutoModelForCausalLM.from_pretrained(exported.drafter)  # after `import cpd_mtp`
    ids = prompts(merged.config.text_config.vocab_size)
    want_tokens = greedy(merged, ids)
    with torch.no_grad():
        want_logits = merged(ids).logits
    for loaded in (drafter, auto):
        assert type(loaded) is CPDMTPForCausalLM and not loaded.training
        assert loaded.config.head_config == merged.config.head_config
        assert loaded.config.tie_word_embeddings == exported.tied
        for name, tensor in head_tensors(merged).items():
            assert torch.equal(loaded.head.state_dict()[name], tensor), name
        assert not any(p.requires_grad for p in loaded.trunk.parameters())
        assert loaded.generation_config.to_dict() == merged.generation_config.to_dict()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want_logits)
        assert torch.equal(greedy(loaded, ids), want_tokens)


def test_another_copy_of_the_base_and_another_dtype(exported, tmp_path):
    copy = shutil.copytree(exported.folder, tmp_path / "copy")
    merged = CPDMTPForCausalLM.from_pretrained(exported.merged).eval()
    ids = prompts(merged.config.text_config.vocab_size)
    with torch.no_grad():
        want = merged(ids).logits
    copy_model, _ = load_causal_lm(copy, progress=False)
    bare = shutil.copytree(exported.folder, tmp_path / "bare")  # the export has the tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    assert load_causal_lm(bare, progress=False, tokenizer=False)[1] is None
    for base_model in (copy, str(copy), copy_model, bare):
        loaded = CPDMTPForCausalLM.from_pretrained(exported.drafter, base_model=base_model)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
    # The fingerprint is taken in bfloat16: a bfloat16 load of the same base matches it.
    half = CPDMTPForCausalLM.from_pretrained(exported.drafter, dtype=torch.bfloat16)
    assert half.head.weight.dtype == half.head.gate.weight.dtype == torch.bfloat16
    old = CPDMTPForCausalLM.from_pretrained(exported.drafter, torch_dtype="bfloat16")
    assert old.head.gate.weight.dtype == torch.bfloat16
    for name, tensor in head_tensors(merged).items():
        assert torch.equal(half.head.state_dict()[name], tensor.to(half.head.state_dict()[name]))


def test_a_foreign_base_is_refused_in_one_line(exported, tokenizer, tmp_path):
    other = save_base(tmp_path / "other", tokenizer, seed=1, tied=exported.tied)
    want = json.loads((exported.drafter / DRAFTER_RECORD).read_text())["base_fingerprint"]
    other_model, _ = load_causal_lm(other, progress=False)
    for base_model in (other, other_model):
        with pytest.raises(ValueError, match="fingerprint") as caught:
            CPDMTPForCausalLM.from_pretrained(exported.drafter, base_model=base_model)
        message = str(caught.value)
        assert "\n" not in message
        assert want[:12] in message and drafter_fingerprint(other_model)[:12] in message
        assert "base_model=" in message
    with pytest.raises(ValueError, match="fingerprint"):  # the Auto class passes it through
        AutoModelForCausalLM.from_pretrained(exported.drafter, base_model=other)


def test_a_relative_base_source_and_a_missing_base(tokenizer, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    save_base(work / "base", tokenizer, seed=0)
    monkeypatch.chdir(work)
    base, base_tokenizer = load_causal_lm("base", progress=False)
    model = retrofit(base)
    save_drafter(model, base_tokenizer, "drafter", base_source="base", progress=False)
    record = json.loads(Path("drafter", DRAFTER_RECORD).read_text())
    assert record["base_source"] == "base"
    assert record["base_source_absolute"] == str(work / "base")
    ids = prompts(base.config.vocab_size)
    with torch.no_grad():
        want = model(ids).logits
    # Resolved against the working directory; elsewhere, through the recorded absolute path.
    for cwd in (work, tmp_path):
        monkeypatch.chdir(cwd)
        loaded = CPDMTPForCausalLM.from_pretrained(work / "drafter")
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)
    (work / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="base_model=") as caught:
        CPDMTPForCausalLM.from_pretrained(work / "drafter")
    assert "\n" not in str(caught.value)
    moved = CPDMTPForCausalLM.from_pretrained(work / "drafter", base_model=tmp_path / "moved")
    with torch.no_grad():
        assert torch.equal(moved(ids).logits, want)


def test_the_load_options_a_drafter_does_not_take_are_refused(exported):
    with pytest.raises(ValueError, match="device_map"):
        CPDMTPForCausalLM.from_pretrained(exported.drafter, device_map="cpu")
    with pytest.raises(ValueError, match="base_model= is for a drafter-only export"):
        CPDMTPForCausalLM.from_pretrained(exported.merged, base_model=exported.folder)
    loaded, info = CPDMTPForCausalLM.from_pretrained(exported.drafter, output_loading_info=True)
    assert isinstance(loaded, CPDMTPForCausalLM) and not info["missing_keys"]


def test_save_drafter_needs_a_base_mode_model(tokenizer, tmp_path):
    save_base(tmp_path / "base", tokenizer, seed=0)
    base, base_tokenizer = load_causal_lm(tmp_path / "base", progress=False)
    marginal = CPDMTPForCausalLM.from_causal_lm(base, n_future=2, rank=2)
    with pytest.raises(ValueError, match="use save_export"):
        save_drafter(marginal, base_tokenizer, tmp_path / "d", base_source=tmp_path / "base")
    assert not (tmp_path / "d").exists()


def test_a_failed_save_leaves_the_previous_export(exported, tokenizer, tmp_path, monkeypatch):
    target = shutil.copytree(exported.drafter, tmp_path / "drafter")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("killed while writing the tokenizer")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="killed"):
        save_drafter(exported.model, tokenizer, target, base_source=str(exported.folder))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["drafter"]  # no temporary left


def test_a_non_finite_head_weight_is_refused_naming_it(exported, tmp_path):
    folder = shutil.copytree(exported.drafter, tmp_path / "drafter")
    state = load_file(folder / DRAFTER_WEIGHTS)
    state["head.gate.weight"][0, 0] = float("nan")
    save_file(state, folder / DRAFTER_WEIGHTS, metadata={"format": "pt"})
    export.write_record(folder)
    with pytest.raises(export.ExportError, match=r"weight head\.gate\.weight loaded from .*NaN"):
        CPDMTPForCausalLM.from_pretrained(folder)
    (folder / DRAFTER_WEIGHTS).write_bytes(b"torn")  # and a torn file is caught by the record
    with pytest.raises(export.ExportError, match=r"drafter\.safetensors does not match"):
        CPDMTPForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------- draft ids
def drop_draft_ids(folder: Path, weights: str, key: str) -> None:
    """Remove the draft ids from an export's weights and re-record its checksums."""
    state = load_file(folder / weights)
    del state[key]
    save_file(state, folder / weights, metadata={"format": "pt"})
    export.write_record(folder)


@pytest.mark.parametrize("kind", ["merged", "drafter"])
def test_a_draft_vocabulary_without_draft_ids_is_refused(exported, tmp_path, kind):
    folder = shutil.copytree(getattr(exported, kind), tmp_path / kind)
    if kind == "merged":
        drop_draft_ids(folder, "model.safetensors", "head.draft_ids")
    else:
        drop_draft_ids(folder, DRAFTER_WEIGHTS, "head.draft_ids")
    with pytest.raises(ValueError, match=r"draft_vocab_size=64 .* no head\.draft_ids") as caught:
        CPDMTPForCausalLM.from_pretrained(folder)
    assert "\n" not in str(caught.value)


def test_draft_ids_out_of_range_are_refused(exported, tmp_path):
    folder = shutil.copytree(exported.merged, tmp_path / "merged")
    state = load_file(folder / "model.safetensors")
    state["head.draft_ids"][0] = 10**9
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    export.write_record(folder)
    with pytest.raises(ValueError, match="draft vocabulary is corrupt"):
        CPDMTPForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------- the fingerprint
class Embeddings(torch.nn.Module):
    """The two accessors ``drafter_fingerprint`` reads, over given matrices."""

    def __init__(self, output: torch.Tensor, inputs: torch.Tensor) -> None:
        super().__init__()
        self.out = torch.nn.Linear(output.shape[1], output.shape[0], bias=False)
        self.inp = torch.nn.Embedding(*inputs.shape)
        with torch.no_grad():
            self.out.weight = torch.nn.Parameter(output)
            self.inp.weight = torch.nn.Parameter(inputs)

    def get_output_embeddings(self):
        return self.out

    def get_input_embeddings(self):
        return self.inp


@settings(max_examples=40, deadline=None)
@given(
    vocab=st.integers(1, 40),
    hidden=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    row=st.integers(0, 39),
)
def test_the_fingerprint_is_the_weights_not_their_dtype(vocab, hidden, seed, row):
    g = torch.Generator().manual_seed(seed)
    output = torch.randn(vocab, hidden, generator=g)
    inputs = torch.randn(vocab, hidden, generator=g)
    want = drafter_fingerprint(Embeddings(output, inputs))
    assert len(want) == 64 and int(want, 16) >= 0
    # The same weights loaded in bfloat16, or tied in an untied copy, or non-contiguous.
    assert drafter_fingerprint(Embeddings(output.bfloat16(), inputs.bfloat16())) == want
    transposed = output.t().contiguous().t()
    assert drafter_fingerprint(Embeddings(transposed, inputs.clone())) == want
    # Another value (beyond bfloat16 rounding), another shape, or the roles swapped.
    changed = output.clone()
    changed[row % vocab, 0] += 1.0 + changed[row % vocab, 0].abs()
    assert drafter_fingerprint(Embeddings(changed, inputs)) != want
    if vocab != hidden:
        assert drafter_fingerprint(Embeddings(output.reshape(hidden, vocab), inputs)) != want
    if not torch.equal(output.bfloat16(), inputs.bfloat16()):
        assert drafter_fingerprint(Embeddings(inputs, output)) != want


# ---------------------------------------------------------------------- GGUF bases
def check_gguf_round_trip(gguf_path: Path, tmp_path: Path, draft_vocab: int, new_tokens: int):
    """Retrofit the GGUF model, export the drafter with the GGUF file as its base, reload."""
    base, base_tokenizer = load_causal_lm(gguf_path, progress=False)
    torch.manual_seed(0)
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=3, rank=2, next_token="base", freeze_trunk=True,
        draft_vocab_size=draft_vocab,
    ).eval()  # fmt: skip
    model.head.set_draft_vocab(torch.arange(draft_vocab))
    save_drafter(model, base_tokenizer, tmp_path / "drafter", base_source=gguf_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "drafter").glob("*.safetensors")) == [DRAFTER_WEIGHTS]
    loaded = CPDMTPForCausalLM.from_pretrained(tmp_path / "drafter")
    for name, tensor in head_tensors(model).items():
        assert torch.equal(loaded.head.state_dict()[name], tensor), name
    ids = base_tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        # The reference through Hugging Face's loop (cheaper: no weight packing for a second
        # model); the reloaded model decodes speculatively, drafting with the reloaded head.
        want = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, speculative=False)
        got = loaded.generate(ids, max_new_tokens=new_tokens, do_sample=False, draft_tree="chain")
    assert torch.equal(got, want)
    assert loaded.last_generation_stats is not None  # it did decode speculatively


def test_a_gguf_base_through_load_causal_lm(tmp_path):
    pytest.importorskip("gguf")
    from test_loading import _tiny_llama, write_gguf

    original, tokenizer = _tiny_llama()
    path = tmp_path / "tiny-llama.F32.gguf"
    write_gguf(original, tokenizer, path)
    check_gguf_round_trip(path, tmp_path, draft_vocab=32, new_tokens=12)


def smollm2_path() -> Path:
    """Where ``make smollm2`` puts the GGUF file (or ``CPD_MTP_SMOLLM2``), as test_smollm2."""
    from cpd_mtp.apps.models import model_path

    root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("CPD_MTP_SMOLLM2") or root / model_path("smollm2"))


@pytest.mark.slow
@pytest.mark.smollm2
def test_a_smollm2_gguf_base(tmp_path):
    path = smollm2_path()
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `make smollm2`")
    check_gguf_round_trip(path, tmp_path, draft_vocab=1024, new_tokens=8)
