"""Medusa-format conversion: the converted tensors, read back from disk and run through the
Medusa formulas alone, give the rank-1 head's draft conditionals; every other head is refused
in one line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.hf.medusa import (
    MEDUSA_CONFIG,
    MEDUSA_WEIGHTS,
    load_medusa,
    main,
    medusa_draft_logprobs,
    medusa_state,
    to_medusa,
)

RANK_MESSAGE = (
    "rank 2 head: a rank-r mixture is not a product of independent heads (its offsets are "
    "coupled through the expert posterior), so it has no Medusa form; only rank-1 heads convert"
)
MARGINAL_MESSAGE = (
    "next_token='marginal' head: its next token is the CP marginal softmax(W_U phi_1(h)), not "
    "the wrapped model's lm_head, so an engine serving that model with Medusa heads would "
    "verify against another model; only next_token='base' heads convert"
)
N1_MESSAGE = (
    "n_future=1 head: offset 1 is the base model's own token, so there are no offsets 2..n to "
    "draft as Medusa heads"
)
RESBLOCK_MESSAGE = (
    "resblock experts compute h + A SiLU(B h) and Medusa's residual block h + SiLU(W h) has no "
    "map after the SiLU: they agree only where A = I, and offset 2's A is not the identity"
)


def make_head(
    d: int,
    vocab: int,
    n_future: int,
    *,
    rank: int = 1,
    expert_type: str = "linear",
    draft: int | None = None,
    next_token: str = "base",
    inner: int = 3,
    seed: int = 0,
) -> CPDMTPHead:
    """A head far from its initialisation: experts with O(1) noise, a random draft vocabulary."""
    torch.manual_seed(seed)
    config = CPDMTPConfig(
        hidden_size=d,
        vocab_size=vocab,
        n_future=n_future,
        rank=rank,
        expert_type=expert_type,
        expert_inner_size=inner,
        expert_init_noise=1.0,
        next_token=next_token,
        draft_vocab_size=draft,
    )
    head = CPDMTPHead(config, unembedding=torch.nn.Parameter(torch.randn(vocab, d)))
    with torch.no_grad():
        for param in head.experts.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    if head.draft_ids is not None:
        head.set_draft_vocab(torch.randperm(vocab)[: config.draft_vocab])
    return head.eval()


def head_draft_logprobs(head: CPDMTPHead, hidden: torch.Tensor) -> torch.Tensor:
    """(B, n - 1, V): the head's drafter conditional of offsets 2..n on the full vocabulary.

    Taken from ``draft_state`` + ``conditional`` as the drafter takes them, each given a random
    path of the offsets before it (at rank 1 the path must not matter).
    """
    cfg = head.config
    log_w, log_p = head.draft_state(hidden)  # (B, 1), (B, n, 1, K)
    rows = []
    for s in range(2, cfg.n_future + 1):
        chosen = torch.randint(0, cfg.draft_vocab, (hidden.shape[0], s - 1))
        _, log_q = CPDMTPHead.conditional(log_w, log_p, chosen)  # (B, K)
        full = log_q.new_full((hidden.shape[0], cfg.vocab_size), -torch.inf)
        ids = torch.arange(cfg.vocab_size) if head.draft_ids is None else head.draft_ids
        full[:, ids] = log_q
        rows.append(full)
    return torch.stack(rows, dim=1)


def assert_same_drafts(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "different draft supports"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite].to(got.dtype), atol=atol, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 12),
    vocab=st.integers(2, 40),
    n_future=st.integers(2, 5),
    expert_type=st.sampled_from(["linear", "lowrank"]),
    draft_fraction=st.one_of(st.none(), st.floats(0.0, 1.0)),
    wide=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_converted_heads_reproduce_the_rank1_drafts(
    d, vocab, n_future, expert_type, draft_fraction, wide, seed
):
    draft = None if draft_fraction is None else max(1, round(draft_fraction * vocab))
    head = make_head(d, vocab, n_future, expert_type=expert_type, draft=draft, seed=seed)
    dtype = torch.float64 if wide else torch.float32
    head = head.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        out = to_medusa(head, Path(tmp) / "medusa", dtype=dtype)
        assert sorted(p.name for p in out.iterdir()) == [MEDUSA_CONFIG, MEDUSA_WEIGHTS]
        tensors, config = load_medusa(out)
    k = head.config.draft_vocab
    assert config["model_type"] == "medusa" and config["num_heads"] == n_future - 1
    assert config["num_hidden_layers"] == 0 and config["hidden_size"] == d
    assert config["vocab_size"] == vocab and config["truncated_vocab_size"] == k
    names = {f"lm_heads.{h}.weight" for h in range(n_future - 1)}
    assert set(tensors) == names | ({"token_map"} if k < vocab else set())
    assert all(tensors[name].shape == (k, d) and tensors[name].dtype == dtype for name in names)
    if k < vocab:
        assert torch.equal(tensors["token_map"], head.draft_ids)

    hidden = torch.randn(5, d, dtype=dtype)
    got = medusa_draft_logprobs(tensors, config, hidden)
    assert got.dtype == dtype
    want = head_draft_logprobs(head, hidden)
    assert_same_drafts(got, want, atol=1e-9 if wide else 2e-4)


def test_a_resblock_head_maps_with_one_block_exactly_where_its_a_is_the_identity():
    head = make_head(6, 20, 3, expert_type="resblock", draft=9).double()
    with torch.no_grad():
        head.experts.proj_out[1:] = torch.eye(6, dtype=torch.float64)  # offsets 2 and 3
    tensors, config = medusa_state(head, torch.float64)  # offset 1's A is not I: not drafted
    assert config["num_hidden_layers"] == 1 and config["medusa_fc_bias"] is False
    assert torch.equal(tensors["blocks.0.layers.0.weight"], head.experts.proj_in[1])
    hidden = torch.randn(4, 6, dtype=torch.float64)
    got = medusa_draft_logprobs(tensors, config, hidden)
    assert_same_drafts(got, head_draft_logprobs(head, hidden), atol=1e-9)

    with torch.no_grad():
        head.experts.proj_out[1, 0, 0] += 1e-12
    with pytest.raises(ValueError) as err:
        medusa_state(head)
    assert str(err.value) == RESBLOCK_MESSAGE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2}, RANK_MESSAGE),
        ({"next_token": "marginal"}, MARGINAL_MESSAGE),
        ({"n_future": 1}, N1_MESSAGE),
        ({"expert_type": "resblock"}, RESBLOCK_MESSAGE),
    ],
)
def test_heads_without_an_exact_medusa_form_are_refused_in_one_line(kwargs, message, tmp_path):
    values = {"n_future": 3, **kwargs}
    head = make_head(4, 10, values.pop("n_future"), **values)
    with pytest.raises(ValueError) as err:
        to_medusa(head, tmp_path / "out")
    assert str(err.value) == message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left


def test_other_objects_are_refused():
    with pytest.raises(ValueError, match=r"^to_medusa takes a CPDMTPHead or a CPDMTPForCausalLM"):
        medusa_state(torch.nn.Linear(4, 4))


def test_an_existing_medusa_folder_is_replaced_and_any_other_folder_kept(tmp_path):
    first, second = make_head(4, 12, 3, seed=1), make_head(4, 12, 4, seed=2)
    out = to_medusa(first, tmp_path / "medusa")
    to_medusa(second, out)
    tensors, config = load_medusa(out)
    assert config["num_heads"] == 3
    torch.testing.assert_close(
        tensors["lm_heads.2.weight"], medusa_state(second)[0]["lm_heads.2.weight"]
    )

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "cpd_mtp"}))
    with pytest.raises(ValueError) as err:
        to_medusa(first, export)
    assert str(err.value) == (
        f"{export} exists and is not a Medusa folder (no config.json with model_type "
        "'medusa'); refusing to replace it"
    )
    assert json.loads((export / "config.json").read_text()) == {"model_type": "cpd_mtp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "medusa"]


def test_the_reference_reads_checkpoints_as_vllm_does():
    """A ``medusa_heads.`` prefix, full-vocabulary lm_heads with a token map, and a shared
    lm_head (``original_lm_head``) give the same drafts as the layout we write."""
    head = make_head(5, 16, 3, draft=7)
    tensors, config = medusa_state(head)
    hidden = torch.randn(3, 5)
    want = medusa_draft_logprobs(tensors, config, hidden)

    prefixed = {f"medusa_heads.{name}": t for name, t in tensors.items()}
    torch.testing.assert_close(medusa_draft_logprobs(prefixed, config, hidden), want)

    full = dict(tensors)
    for h in range(2):
        rows = torch.randn(16, 5)
        rows[tensors["token_map"]] = tensors[f"lm_heads.{h}.weight"]
        full[f"lm_heads.{h}.weight"] = rows
    torch.testing.assert_close(medusa_draft_logprobs(full, config, hidden), want)

    shared = {**tensors, "lm_heads.1.weight": torch.zeros(7, 5)}
    got = medusa_draft_logprobs(shared, {**config, "original_lm_head": True}, hidden)
    torch.testing.assert_close(got[:, 1], want[:, 0])


# ---------------------------------------------------------------------- the model and the CLI


@pytest.fixture(scope="module")
def tiny_model():
    from conftest import build_tiny_llama_config
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(build_tiny_llama_config(vocab_size=64, hidden_size=16))
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=4, rank=1, expert_type="linear", next_token="base", draft_vocab_size=24
    )
    with torch.no_grad():
        model.head.experts.proj.add_(torch.randn_like(model.head.experts.proj) * 0.3)
    model.head.set_draft_vocab(torch.randperm(64)[:24])
    return model.eval()


def test_a_model_converts_through_its_head_on_its_own_hidden_states(tiny_model, tmp_path):
    out = to_medusa(tiny_model, tmp_path / "medusa")
    tensors, config = load_medusa(out)
    input_ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        hidden = tiny_model.trunk(input_ids=input_ids).last_hidden_state[:, -1]  # (B, d)
    got = medusa_draft_logprobs(tensors, config, hidden)
    assert got.shape == (2, 3, 64)
    assert_same_drafts(got, head_draft_logprobs(tiny_model.head, hidden), atol=2e-4)


def test_the_command_line_converts_a_saved_export(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "export")
    main([str(tmp_path / "export"), str(tmp_path / "medusa")])
    assert "3 Medusa heads (offsets 2..4), V=64, K=24" in capsys.readouterr().out
    tensors, _ = load_medusa(tmp_path / "medusa")
    for name, tensor in medusa_state(tiny_model)[0].items():
        torch.testing.assert_close(tensors[name], tensor)


def test_the_command_line_converts_a_drafter_only_export(tiny_model, tmp_path, capsys):
    """What ``retrofit`` writes by default: the head alone, attached to its base on loading."""
    from conftest import build_tiny_llama_config
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.export import save_drafter
    from cpd_mtp.training.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)  # the base ``tiny_model`` was built around, saved as a folder
    base = AutoModelForCausalLM.from_config(build_tiny_llama_config(vocab_size=64, hidden_size=16))
    base.save_pretrained(tmp_path / "base")
    tokenizer = train_bpe_tokenizer(["def f(x): return x"] * 20, vocab_size=260)
    save_drafter(
        tiny_model, tokenizer, tmp_path / "drafter", base_source=tmp_path / "base", progress=False
    )
    main([str(tmp_path / "drafter"), str(tmp_path / "medusa")])
    assert "3 Medusa heads (offsets 2..4), V=64, K=24" in capsys.readouterr().out
    tensors, _ = load_medusa(tmp_path / "medusa")
    for name, tensor in medusa_state(tiny_model)[0].items():
        torch.testing.assert_close(tensors[name], tensor)


def test_the_command_line_errors_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "missing"), str(tmp_path / "medusa")])
    assert (
        err.value.code
        == f"error: {tmp_path / 'missing'} is not a saved model folder (no config.json)"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "empty"), str(tmp_path / "medusa")])
    assert str(err.value.code).startswith("error: ") and "\n" not in str(err.value.code)
    assert not (tmp_path / "medusa").exists()


def test_the_command_line_refuses_a_rank_2_export(tmp_path):
    from conftest import build_tiny_llama_config
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    base = AutoModelForCausalLM.from_config(build_tiny_llama_config(vocab_size=32, hidden_size=8))
    model = CPDMTPForCausalLM.from_causal_lm(base, n_future=3, rank=2, next_token="base")
    model.save_pretrained(tmp_path / "export")
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "export"), str(tmp_path / "medusa")])
    assert err.value.code == f"error: {RANK_MESSAGE}"
