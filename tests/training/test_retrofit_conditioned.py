"""``cpd-mtp retrofit ... head.token_conditioned=true``: a head that sees the next token.

The head section of the retrofit config is generated from ``CPDMTPConfig``, so the option needs
no retrofit code. The tiny random Llama of ``test_retrofit.py`` is retrofitted with a
token-conditioned head (self-distillation, drafter-only export); the checks compare against
references outside the retrofit code: the original model's logits (``torch.equal``) and greedy
``generate``, the step-0 validation of the same run, and the export's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_retrofit import config

from cpd_mtp.training.config import load_retrofit_config
from cpd_mtp.training.retrofit import retrofit


def test_the_option_is_a_dotted_key_of_the_retrofit_config_and_on_by_default():
    cfg = load_retrofit_config(["model.path=m", "run.out_dir=o", "head.token_conditioned=false"])
    assert cfg.head.token_conditioned is False
    assert (
        load_retrofit_config({"model.path": "m", "run.out_dir": "o"}).head.token_conditioned is True
    )


def test_a_conditioned_retrofit_trains_its_fusion_and_decodes_as_the_original(
    tiny_pretrained_folder, tmp_path
):
    from transformers import AutoModelForCausalLM

    from cpd_mtp import generate
    from cpd_mtp.hf.export import DRAFTER_WEIGHTS
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    out = tmp_path / "run"
    cfg = config(
        tiny_pretrained_folder,
        out,
        head__token_conditioned=True,
        head__draft_vocab_size=200,
        data__distill="kl",
        run__merged=False,
    )
    retrofit(cfg)
    final = Path(cfg.run.out_dir) / "final"
    saved = load_file(str(final / DRAFTER_WEIGHTS))
    assert "head.token_embedding" not in saved
    # The recipe's fusion (an MLP of h and e): its output map starts at zero and trained.
    assert {"head.token_proj.fc_in.weight", "head.token_proj.fc_out.weight"} <= set(saved)
    model = CPDMTPForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_pretrained_folder).eval()
    assert model.head.config.token_conditioned is True and model.head.config.token_fusion == "mlp"
    assert model.head.token_proj.fc_out.weight.abs().sum() > 0
    assert model.head.token_embedding is model.trunk.get_input_embeddings().weight

    # The run's validation: offsets 2..n only, each better than the untrained head's.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and "val/head_nll/1" not in last
    for k in (2, 3):
        assert last[f"val/head_nll/{k}"] < first[f"val/head_nll/{k}"]

    ids = torch.randint(
        0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    for prompt in (ids[:1, :6], ids[1:, :9]):
        want = base.generate(prompt, max_new_tokens=24, do_sample=False)
        for tree in ("chain", "auto"):
            assert torch.equal(generate(model, prompt, 24, draft_tree=tree).sequences, want)
