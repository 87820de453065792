"""``import cpd_mtp`` registers the export format with the Auto classes and pipelines.

References: the original model's logits and its own ``text-generation`` pipeline.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from generation_builders import accepting_pair, periodic_prompts, word_tokenizer
from transformers import pipeline

SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    folder, reference, prompt, expected = sys.argv[1:5]
    try:  # not registered yet: transformers does not know the architecture
        AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError):
        pass
    else:
        raise AssertionError("cpd_mtp config loaded before import cpd_mtp")

    import cpd_mtp

    # The import stays light: the model code loads when a config is built.
    assert "cpd_mtp.hf.modeling" not in sys.modules
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "CPDMTPModelConfig"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "CPDMTPForCausalLM", type(model)
    ids, logits = torch.load(reference)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)

    pipe = pipeline("text-generation", model=folder)
    text = pipe(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]
    assert text == expected, (text, expected)
    assert pipe.model.last_generation_stats.tokens_per_forward > 1
    print("OK")
    """
)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An export folder of the base-mode model with its tokenizer, the original model, and a
    prompt of the tokenizer's text."""
    original, model = accepting_pair()
    tokenizer = word_tokenizer()
    folder = tmp_path_factory.mktemp("export")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ids, _ = periodic_prompts(1)
    return folder, original, tokenizer, tokenizer.decode(ids[0])


def original_text(original, tokenizer, prompt: str) -> str:
    pipe = pipeline("text-generation", model=original, tokenizer=tokenizer)
    return pipe(prompt, max_new_tokens=16, do_sample=False)[0]["generated_text"]


def test_auto_classes_and_pipeline_after_a_bare_import(export, tmp_path):
    folder, original, tokenizer, prompt = export
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save((ids, original(ids).logits), tmp_path / "reference.pt")
    expected = original_text(original, tokenizer, prompt)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(folder),
            str(tmp_path / "reference.pt"),
            prompt,
            expected,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        # Not the repository root: its `kernels/` folder would shadow the optional `kernels`
        # package that transformers imports, and that folder imports cpd_mtp.
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")


def test_pipeline_decodes_speculatively_with_the_original_text(export):
    folder, original, tokenizer, prompt = export
    pipe = pipeline("text-generation", model=str(folder))
    prompts = [prompt, prompt[:-3]]  # a batch, left-padded by the pipeline
    ours = pipe(prompts, max_new_tokens=16, do_sample=False, batch_size=2)
    assert [row[0]["generated_text"] for row in ours] == [
        original_text(original, tokenizer, p) for p in prompts
    ]
    assert pipe.model.last_generation_stats.tokens_per_forward > 1
