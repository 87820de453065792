"""Builders shared by the decoding tests: tiny models, prompts, and Hugging Face references.

Test modules import them (pytest puts this folder on ``sys.path``). The model builders are
cached, so each model is trained once per session, whichever test needs it.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from conftest import build_tiny_llama_config as tiny_llama_config
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cpd_mtp.hf.modeling import CPDMTPForCausalLM

VOCAB = 16
PAD = 0


def periodic(batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    """(batch, length) sequences repeating a random motif of period 2..5 (tokens 1..V-1)."""
    period = torch.randint(2, 6, (batch,), generator=g)
    motif = torch.randint(1, VOCAB, (batch, 5), generator=g)
    return motif.gather(1, torch.arange(length)[None] % period[:, None])


@functools.cache
def prompt_tokens(seed: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@functools.cache
def trained_model(n_future: int, rank: int) -> CPDMTPForCausalLM:
    """A tiny Llama + CP head trained briefly on periodic sequences: drafts are often right,
    sometimes wrong, so both branches of verification run."""
    torch.manual_seed(1000 * n_future + rank)
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config),
        n_future=n_future,
        rank=rank,
        loss_impl="reference",
        expert_init_noise=0.1,
    )
    return train_on_periodic(model, steps=60, seed=n_future)


def train_on_periodic(model: CPDMTPForCausalLM, steps: int, seed: int) -> CPDMTPForCausalLM:
    """Train ``model`` for ``steps`` Adam steps on batches of periodic sequences; return it in
    eval mode, padding with PAD and with no EOS (decoding runs to ``max_new_tokens``)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = periodic(16, 24, g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def random_head_model(vocab: int, n_future: int, rank: int, seed: int) -> CPDMTPForCausalLM:
    """A tiny untrained model whose head is randomised strongly enough that the marginal is
    peaked and the conditionals differ from it (so rejections are frequent)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=vocab, hidden_size=16, num_layers=2, num_heads=2)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), n_future=n_future, rank=rank
    )
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
        for name, param in model.head.named_parameters():
            if name != "weight":
                param.normal_(0.0, 0.3)
    # No EOS: the enumerated references cover every continuation of the full length.
    model.generation_config.eos_token_id = None
    return model.eval()


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts: (B, T) ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, max_new_tokens, eos=None) -> torch.Tensor:
    return model.generate(
        ids,
        speculative=False,  # HF's own loop: the independent reference
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=eos,
    )


def hf_warp(log_probs: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """The transformers logits warpers, in generate's order, renormalised."""
    scores = log_probs.clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.log_softmax(scores, dim=-1)


def enumerate_joint(log_w: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """log P(x_1..x_n) = log sum_a w_a prod_s p_{s,a}(x_s) by brute force: (V,)*n.

    Args:
        log_w: (r,) log gate weights; log_p: (n, r, V) per-expert log-probabilities.
    """
    n_future, rank, vocab = log_p.shape
    out = torch.empty((vocab,) * n_future, dtype=torch.float64)
    for cell in itertools.product(range(vocab), repeat=n_future):
        terms = [
            float(log_w[a]) + sum(float(log_p[s, a, cell[s]]) for s in range(n_future))
            for a in range(rank)
        ]
        out[cell] = max(terms) + math.log(sum(math.exp(t - max(terms)) for t in terms))
    return out


def chi_square_p_value(observed: dict, expected_probs: dict, total: int) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled into one."""
    stat, df, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for cell, p in expected_probs.items():
        expected = p * total
        if expected < 5:
            pooled_obs += observed.get(cell, 0)
            pooled_exp += expected
            continue
        stat += (observed.get(cell, 0) - expected) ** 2 / expected
        df += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-12)
        df += 1
    unseen = sum(c for cell, c in observed.items() if expected_probs.get(cell, 0.0) == 0.0)
    if unseen:
        return 0.0  # a continuation the exact distribution gives probability 0
    return float(
        torch.special.gammaincc(
            torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)
        )
    )
