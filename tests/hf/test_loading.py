"""``load_causal_lm``: Hugging Face folders and GGUF files against the original model.

The GGUF test writes a tiny Llama and its byte-level BPE tokenizer with the ``gguf`` package's
writer (float32 tensors, llama.cpp's tensor names and its Q/K row permutation), then checks that
the loaded model's logits equal the original's and that ``save_pretrained`` works on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from cpd_mtp.hf.loading import load_causal_lm  # noqa: E402
from cpd_mtp.training.tokenizer import train_bpe_tokenizer  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0\n"] * 20


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (the inverse of what transformers undoes on load)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(model, tokenizer, path) -> None:
    """A float32 GGUF of a Llama causal LM and its GPT-2-style BPE tokenizer."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # control / normal
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _permute(weight, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _permute(weight, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model, tokenizer = _tiny_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_gguf(model, tokenizer, path)
    return model, tokenizer, path


def test_gguf_loads_the_same_model_and_tokenizer(tiny_gguf, tmp_path):
    original, tokenizer, path = tiny_gguf
    model, loaded_tokenizer = load_causal_lm(path)
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert loaded_tokenizer(text).input_ids == ids[0].tolist()
    assert loaded_tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        expected = original(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # A plain model: it saves, and the saved folder loads back to the same logits.
    model.save_pretrained(tmp_path / "hf")
    loaded_tokenizer.save_pretrained(tmp_path / "hf")
    again, _ = load_causal_lm(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, got)


def test_dtype_is_applied(tiny_gguf):
    _, _, path = tiny_gguf
    model, _ = load_causal_lm(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_sources_are_clear_errors(tmp_path, tiny_gguf):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a model folder"):
        load_causal_lm(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="dtype must be"):
        load_causal_lm(tiny_gguf[2], dtype="float8")


@pytest.mark.parametrize("keep", [100, 0.5])
def test_a_gguf_file_cut_short_is_one_line(tmp_path, tiny_gguf, keep):
    # Cut in the header it was a struct.error; cut in the tensors, "cannot reshape array".
    data = tiny_gguf[2].read_bytes()
    size = keep if isinstance(keep, int) else int(len(data) * keep)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:size])
    with pytest.raises(
        ValueError, match=r"cannot read the GGUF file .*cut short or corrupt"
    ) as err:
        load_causal_lm(cut)
    assert "\n" not in str(err.value)


def test_a_folder_without_weights_or_tokenizer_is_one_line(tmp_path, tiny_gguf):
    original, tokenizer, _ = tiny_gguf
    folder = tmp_path / "model"
    original.save_pretrained(folder)
    with pytest.raises(ValueError, match="has no tokenizer") as err:
        load_causal_lm(folder)  # it suggested installing sentencepiece
    assert "\n" not in str(err.value)
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"has a config\.json but no weights"):
        load_causal_lm(folder)  # an OSError from deep inside


def test_progress_false_silences_transformers_bars(tiny_gguf, capfd):
    from transformers.utils import logging as hf_logging

    load_causal_lm(tiny_gguf[2], progress=False)
    err = capfd.readouterr().err
    assert "Converting and de-quantizing" not in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()  # restored afterwards
    load_causal_lm(tiny_gguf[2])
    assert "Converting and de-quantizing" in capfd.readouterr().err
