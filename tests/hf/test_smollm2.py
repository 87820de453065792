"""Base mode on a real pretrained model: SmolLM2-135M-Instruct (Llama, V = 49152, tied).

The model is fetched by ``make smollm2`` (``make test`` does it first) into ``models/``; set
``CPD_MTP_SMOLLM2`` to use another copy of the GGUF file. The references are the original
model's own logits and its own Hugging Face greedy ``generate``, computed before wrapping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cpd_mtp.apps.models import model_path

pytestmark = [pytest.mark.slow, pytest.mark.smollm2]

GGUF = Path(
    os.environ.get("CPD_MTP_SMOLLM2") or Path(__file__).resolve().parents[2] / model_path("smollm2")
)
PROMPTS = [
    "def fibonacci(n):\n    ",
    'import os\n\n\ndef read_lines(path):\n    """Return the lines of a file."""\n',
]


@pytest.fixture(scope="module")
def smollm2():
    if not GGUF.is_file():
        pytest.skip(f"{GGUF} is missing: run `make smollm2`")
    from cpd_mtp.hf.loading import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(GGUF)
    inputs = [tokenizer(p, return_tensors="pt").input_ids for p in PROMPTS]
    with torch.no_grad():
        logits = [model(ids).logits for ids in inputs]
        greedy = [model.generate(ids, max_new_tokens=32, do_sample=False) for ids in inputs]
    return model, tokenizer, inputs, logits, greedy


@pytest.mark.parametrize("draft_vocab", [None, 8192])
def test_base_mode_is_the_original_model(smollm2, draft_vocab):
    from cpd_mtp.decoding import generate
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    base, tokenizer, inputs, logits, greedy = smollm2
    kwargs = {"draft_vocab_size": draft_vocab} if draft_vocab else {}
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=4, rank=4, next_token="base", **kwargs
    ).eval()
    if draft_vocab:  # any ids keep decoding exact; the frequent ones only draft better
        model.head.set_draft_vocab(torch.arange(draft_vocab))
    with torch.no_grad():
        for ids, expected, reference in zip(inputs, logits, greedy):
            assert torch.equal(model(ids).logits, expected)  # bit for bit
            out = generate(model, ids, 32)
            assert torch.equal(out.sequences, reference), tokenizer.decode(out.sequences[0])
    assert "def" in tokenizer.decode(greedy[0][0]) or "return" in tokenizer.decode(greedy[0][0])
