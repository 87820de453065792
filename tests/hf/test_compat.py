"""The decoding and training paths raise no deprecation warning of the installed transformers.

transformers 5.25 renamed ``past_key_values`` to ``cache`` in model forwards and outputs and
warns on the old name (removal announced for 5.40). The check runs in a fresh process, because
transformers warns through ``logger.warning_once``: an earlier test of this session would have
used up the one warning.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("error", FutureWarning)  # transformers' deprecations of arguments

    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    from transformers.utils import logging as hf_logging

    from cpd_mtp import CPDMTPForCausalLM, generate

    hf_logging.set_verbosity_warning()
    torch.manual_seed(0)
    configs = {
        "llama": LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        "gpt2": GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    }
    for name, config in configs.items():
        for mode in ("base", "marginal"):
            lm = AutoModelForCausalLM.from_config(config).eval()
            model = CPDMTPForCausalLM.from_causal_lm(lm, n_future=3, rank=2, next_token=mode).eval()
            ids = torch.randint(0, 64, (2, 7))
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            out = generate(model, ids, 12, attention_mask=mask, eos_token_id=[])  # speculative
            hf = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                speculative=False, eos_token_id=None, pad_token_id=0)
            sampled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True)
            loss = model(ids, labels=ids).loss  # training forward
            loss.backward()
            hidden, cache = model.trunk_hidden(ids[:, :4], use_cache=True)
            model.trunk_hidden(ids[:, 4:], cache=cache, use_cache=True)
            with torch.no_grad():
                step = model(ids, use_cache=True)
                model(ids[:, -1:], cache=step.cache if hasattr(step, "cache") else step.past_key_values)
    print("DONE")
    """
)


@pytest.mark.slow
def test_decoding_and_training_raise_no_deprecation_warning():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("DONE"), result.stdout[-2000:]
    lowered = result.stderr.lower()
    assert "deprecat" not in lowered, result.stderr[-4000:]
