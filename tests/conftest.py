"""Shared pytest setup.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test
module imports triton or ``cpd_mtp.kernels``. Without CUDA the kernels can only run in the
interpreter; with CUDA the variable is left alone so the CUDA tests exercise real kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No hub, no wandb account, DeepSpeed on CPU, and a cache the tests own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"  # tests never talk to wandb, whatever the shell says
os.environ.setdefault("CPD_MTP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".test_cache"))
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_tiny_llama_config(
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    **kwargs,
):
    """A small ``LlamaConfig`` (no hub access): ``AutoModelForCausalLM.from_config(config)``.

    Handed out by the ``tiny_llama_config`` fixture. ``num_kv_heads`` defaults to
    ``num_heads``, ``intermediate_size`` to 4 d rounded up to a multiple of 8.
    """
    from transformers import LlamaConfig

    if intermediate_size is None:
        intermediate_size = -(-4 * hidden_size // 8) * 8
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads if num_kv_heads is not None else num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **kwargs,
    )


@pytest.fixture(scope="session")
def tiny_llama_config():
    """The builder of small Llama configs: ``tiny_llama_config(vocab_size=..., ...)``."""
    return build_tiny_llama_config


@pytest.fixture(scope="session")
def tiny_pretrained_folder(tmp_path_factory):
    """A random 2-layer Llama and a 320-token BPE trained on 20 stdlib files, saved together
    as a Hugging Face folder: a stand-in for a pretrained model (retrofit and study tests)."""
    import sysconfig
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from cpd_mtp.training.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:20]]
    tokenizer = train_bpe_tokenizer(texts, 320)
    torch.manual_seed(0)
    config = build_tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
