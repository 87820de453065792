"""Token-conditioned heads in decoding: the drafter feeds the root x_{t+1} to the head.

References: the conditionals of the joint over x_{t+2..t+n} enumerated from the gate and the
experts at z = h + C e(x_{t+1}) (z computed by hand), the original model's own greedy
``generate``, and the exact enumerated distribution of autoregressive sampling from it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch
from conftest import build_tiny_llama_config as tiny_llama_config
from decoding_builders import PAD, left_padded, periodic, train_on_periodic
from test_base_mode import base_from_trained
from test_speculative import (
    SAMPLE_NEW,
    SAMPLE_VOCAB,
    SAMPLES,
    SAMPLING_PROMPT,
    chi_square_p_value,
    exact_continuation_distribution,
    sample_continuations,
)
from transformers import AutoModelForCausalLM

from cpd_mtp import CPDMTPConfig, CPDMTPHead
from cpd_mtp.decoding import generate
from cpd_mtp.decoding.noise import PositionNoise
from cpd_mtp.decoding.sources import CPSource, DraftContext, SourceLimit
from cpd_mtp.hf.modeling import CPDMTPForCausalLM


def conditioned_retrofit(base, n_future: int, rank: int, **kwargs):
    """(original, token-conditioned base-mode model); the original is a deep copy."""
    original = copy.deepcopy(base)
    model = CPDMTPForCausalLM.from_causal_lm(
        base,
        n_future=n_future,
        rank=rank,
        next_token="base",
        token_conditioned=True,
        freeze_trunk=True,
        **kwargs,
    )
    return original, model.eval()


# ---------------------------------------------------------------------------------------------
# The drafter's conditionals given the root.


def random_conditioned_head(draft_vocab: int | None) -> CPDMTPHead:
    torch.manual_seed(21)
    config = CPDMTPConfig(
        hidden_size=6,
        vocab_size=6,
        n_future=3,
        rank=3,
        expert_type="resblock",
        next_token="base",
        token_conditioned=True,
        draft_vocab_size=draft_vocab,
    )
    table = torch.nn.Parameter(torch.randn(6, 6), requires_grad=False)
    head = CPDMTPHead(config, token_embedding=table).double()
    with torch.no_grad():
        for name, param in head.named_parameters():
            if name != "token_embedding":
                param.normal_(0.0, 1.0)
    if draft_vocab is not None:
        head.set_draft_vocab(torch.tensor([0, 2, 3, 5][:draft_vocab]))
    return head.eval()


@torch.no_grad()
def brute_force_conditional(head: CPDMTPHead, h: torch.Tensor, root: int, path: tuple) -> list:
    """q(v | x_{t+1} = root, x_{t+2..} = path) over the vocabulary, from the enumerated joint
    of x_{t+2..t+n} at z = h + C e(root) (the root itself is the input: no factor of its own)."""
    z = h + head.token_proj.weight.detach() @ head.token_embedding.detach()[root].to(h.dtype)
    w = torch.softmax(head.gate.weight @ z + head.gate.bias, -1)
    p = head.expert_log_probs(z[None])[0].exp()  # (n, r, K)
    ids = list(range(6)) if head.draft_ids is None else head.draft_ids.tolist()
    n = head.config.n_future
    joint = {}
    for xs in itertools.product(range(len(ids)), repeat=n - 1):
        joint[tuple(ids[x] for x in xs)] = float(
            sum(w[a] * math.prod(float(p[s + 1, a, x]) for s, x in enumerate(xs)) for a in range(3))
        )
    depth = len(path)
    mass = {v: 0.0 for v in range(6)}
    for cell, prob in joint.items():
        if cell[:depth] == path:
            mass[cell[depth]] += prob
    total = sum(mass.values())
    return [mass[v] / total for v in range(6)]


@pytest.mark.parametrize("draft_vocab", [None, 4])
@pytest.mark.parametrize("greedy", [True, False])
def test_the_sources_conditionals_given_the_root_are_the_enumerated_ones(draft_vocab, greedy):
    """Greedy: every candidate's q is its enumerated conditional given the root and its path.
    Sampling: every node's children are the top tokens of log q + G, q that conditional and G
    the coupled noise of the children's output position."""
    head = random_conditioned_head(draft_vocab)
    anchor = torch.randn(2, 6, dtype=torch.float64)
    root = torch.tensor([4, 1])  # 4 lies outside the draft vocabulary: it is an input all the same
    noise = None if greedy else PositionNoise(seed=7, vocab_size=6)
    context = DraftContext(
        anchor=anchor,
        root=root,
        max_depth=2,
        history=[torch.tensor([1, 2, 4]), torch.tensor([3, 1])],
        rows=torch.arange(2),
        root_position=torch.tensor([3, 5]),
        warp=None if greedy else (lambda scores: torch.log_softmax(scores, dim=-1)),
        noise=noise,
    )
    cand = CPSource(head, children=3, width=6).propose(context, SourceLimit(8, 2))
    checked = 0
    for b in range(2):
        children: dict[tuple, list[int]] = {}
        for node in range(cand.tokens.shape[1]):
            path, parent = [], int(cand.parents[b, node])
            while parent >= 0:
                path.insert(0, int(cand.tokens[b, parent]))
                parent = int(cand.parents[b, parent])
            children.setdefault(tuple(path), []).append(int(cand.tokens[b, node]))
            if greedy:
                want = brute_force_conditional(head, anchor[b], int(root[b]), tuple(path))
                token = int(cand.tokens[b, node])
                assert float(cand.q[b, node]) == pytest.approx(want[token], rel=1e-5, abs=1e-7)
                checked += 1
        if not greedy:
            for path, tokens in children.items():
                want = torch.tensor(
                    brute_force_conditional(head, anchor[b], int(root[b]), path),
                    dtype=torch.float64,
                )
                position = int(context.root_position[b]) + len(path) + 1
                g = noise.vector(b, position).double()
                allowed = torch.arange(6) if draft_vocab is None else head.draft_ids
                ranking = torch.full((6,), -torch.inf, dtype=torch.float64)
                ranking[allowed] = want.log()[allowed] + g[allowed]
                assert tokens == ranking.topk(len(tokens)).indices.tolist()
                checked += len(tokens)
    assert checked >= 8


# ---------------------------------------------------------------------------------------------
# Greedy: the original model's tokens.


@functools.cache
def trained_conditioned(n_future: int, rank: int):
    """The periodic-trained base (``base_from_trained``) and a conditioned head trained on it
    for a few steps (heads only): it drafts the periodic patterns from (h_t, x_{t+1})."""
    original, model = conditioned_retrofit(
        base_from_trained(n_future, rank), n_future, rank, loss_impl="reference"
    )
    torch.manual_seed(5)
    return original, train_on_periodic(model, steps=60, seed=17)


@pytest.mark.parametrize("draft_tree", ["chain", 6, "auto"])
def test_greedy_decoding_equals_the_original_models_greedy(draft_tree):
    original, model = trained_conditioned(4, 2)
    assert model.head.token_proj.weight.abs().sum() > 0  # C was trained
    g = torch.Generator().manual_seed(7)
    prompts = [periodic(1, length, g)[0] for length in (5, 9, 7)]
    outs = []
    for prompt in prompts:
        outs.append(generate(model, prompt[None], 24, draft_tree=draft_tree, context_drafts=False))
        ref = original.generate(prompt[None], max_new_tokens=24, do_sample=False)
        assert torch.equal(outs[-1].sequences, ref)
    ids, mask = left_padded(prompts)
    outs.append(
        generate(model, ids, 24, attention_mask=mask, pad_token_id=PAD, draft_tree=draft_tree)
    )
    ref = original.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert torch.equal(outs[-1].sequences, ref)
    # Hugging Face's generate on the model runs the same decoder.
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24), ref)
    accepted = sum(sum(o.accepted_counts) for o in outs)
    proposed = sum(sum(o.proposed_counts) for o in outs)
    if draft_tree == "chain":  # the conditioned drafter is mostly right on these patterns
        assert accepted > 0.5 * proposed, (accepted, proposed)


# ---------------------------------------------------------------------------------------------
# Sampling: the original model's distribution.


@functools.cache
def conditioned_sampling_model(draft_ids: tuple[int, ...] | None) -> CPDMTPForCausalLM:
    torch.manual_seed(11)
    config = tiny_llama_config(vocab_size=SAMPLE_VOCAB, hidden_size=16, num_layers=2, num_heads=2)
    base = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        base.lm_head.weight.normal_(0.0, 0.5)
    kwargs = {"draft_vocab_size": len(draft_ids)} if draft_ids else {}
    _, model = conditioned_retrofit(base, 3, 3, **kwargs)
    if draft_ids:
        model.head.set_draft_vocab(torch.tensor(draft_ids))
    model.generation_config.eos_token_id = None  # the enumerated reference has no stop token
    torch.manual_seed(12)
    with torch.no_grad():
        for name, param in model.head.named_parameters():
            if name not in ("weight", "token_embedding"):
                param.normal_(0.0, 0.3)
    return model


@pytest.mark.slow
@pytest.mark.parametrize(("draft_tree", "draft_ids"), [("chain", None), (5, None), (5, (0, 2, 3))])
def test_sampling_is_distributed_as_the_original_model(draft_tree, draft_ids):
    """Chi-square goodness of fit of 24,000 sampled continuations against the exact
    distribution of autoregressive sampling from the original model (as in test_base_mode)."""
    model = conditioned_sampling_model(draft_ids)
    assert model.head.token_proj.weight.abs().sum() > 0
    counts, out = sample_continuations(model, draft_tree=draft_tree, temperature=1.0)
    exact = exact_continuation_distribution(model, SAMPLING_PROMPT, SAMPLE_NEW, 1.0, None, None)
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    assert chi_square_p_value(counts, exact, SAMPLES) > 1e-3
    assert 0 < sum(out.accepted_counts) < sum(out.proposed_counts)
