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


# ------------------------------------------------- decoding with a trained head, 8 x 64 tokens
HELD_OUT_NEW_TOKENS = 64


def _stdlib_source(name: str) -> str:
    import importlib
    import inspect

    return inspect.getsource(importlib.import_module(name))


def held_out_prompts() -> list[str]:
    """8 prompts: the first lines of functions from modules the head never trains on."""
    import ast

    prompts = []
    for name in ("json.encoder", "csv", "calendar", "fractions"):
        source = _stdlib_source(name)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and len(prompts) < 8 and node.body:
                lines = source.splitlines()[node.lineno - 1 : node.lineno + 1]
                prompts.append("\n".join(lines) + "\n")
                if len(prompts) % 2 == 0:
                    break
    return prompts


@pytest.fixture(scope="module")
def trained_head(smollm2):
    """SmolLM2 in base mode with a head trained for a minute on teacher-forced stdlib text."""
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    base, tokenizer, *_ = smollm2
    text = "".join(_stdlib_source(name) for name in ("textwrap", "string", "shlex", "glob"))
    ids = torch.tensor(tokenizer(text).input_ids[: 16 * 128]).view(16, 128)
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=3, rank=2, next_token="base", draft_vocab_size=2048, freeze_trunk=True
    ).eval()
    counts = torch.bincount(ids.flatten(), minlength=model.head.config.vocab_size)
    model.head.set_draft_vocab(counts.topk(2048).indices)
    with torch.no_grad():
        hidden, _ = model.trunk_hidden(ids)
    torch.manual_seed(0)
    params = [p for p in model.head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    model.head.train()
    for _step in range(120):
        rows = torch.randint(0, 16, (4,))
        loss = model.head(hidden[rows], labels=ids[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    if diff.numel():
        return int(diff[0])
    return None if a.numel() == b.numel() else n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trained_head_decodes_the_original_models_tokens(smollm2, trained_head, dtype):
    """Greedy speculative decoding of 8 held-out prompts x 64 tokens with accepted drafts:

    - float32: every token equals the original model's HF greedy ``generate``;
    - bf16: the same, except after a step where both tokens are the model's argmax up to bf16
      rounding (the contract of docs/concepts.md), checked at the first difference against the
      float32 logits: each token's logit is within twice the bf16 logits' distance to them.
    """
    import copy

    from cpd_mtp.decoding import generate

    base, *_ = smollm2
    model, tokenizer = trained_head
    original = copy.deepcopy(base).to(dtype)
    model = copy.deepcopy(model).to(dtype)
    accepted = 0
    for prompt in held_out_prompts():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = original.generate(ids, max_new_tokens=HELD_OUT_NEW_TOKENS, do_sample=False)
            out = generate(model, ids, HELD_OUT_NEW_TOKENS)
        accepted += sum(out.accepted_counts)
        got, ref = out.sequences[0], want[0]
        where = _first_difference(got, ref)
        if dtype == torch.float32:
            assert where is None, (prompt, tokenizer.decode(got), tokenizer.decode(ref))
        elif where is not None:
            # Both tokens must be the model's argmax up to bf16's rounding: against the exact
            # (fp32) logits at that prefix, each lies within twice the distance between the bf16
            # and the fp32 logits (two bf16 computations differ by at most that much).
            with torch.no_grad():
                exact = base(ref[None, :where]).logits[0, -1].float()
                rounded = original(ref[None, :where]).logits[0, -1].float()
            noise = float((rounded - exact).abs().max())
            best = float(exact.max())
            for token in (int(got[where]), int(ref[where])):
                assert best - float(exact[token]) <= 2 * noise, (prompt, where, noise)
    assert accepted > 0  # accept-and-crop ran
