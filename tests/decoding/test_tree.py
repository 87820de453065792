"""Draft trees (``cpd_mtp.decoding.tree`` and ``forward``) against independent references.

- The ancestor matrix, the 4-D mask and greedy verification against brute-force walks.
- Coupled sampling: a step emits exactly the tokens autoregressive Gumbel-max sampling with the
  same noise emits, whatever the drafts, and those are distributed as the verifier's
  (chi-square).
- A tree forward against its paths fed one by one as chains, on Llama, Qwen2 (full and
  sliding layers), Mistral (sliding window, past the window) and GPT-2.
- Greedy decoding with trees of 1..32 nodes against Hugging Face greedy ``generate``, with
  batches, padding, EOS and stopping criteria.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_llama_config
from decoding_builders import (
    chi_square_p_value,
    hf_greedy,
    left_padded,
    periodic,
    prompt_tokens,
    trained_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    MistralConfig,
    Qwen2Config,
    StoppingCriteria,
    StoppingCriteriaList,
)

from cpd_mtp.decoding import generate
from cpd_mtp.decoding.cache import decoding_cache
from cpd_mtp.decoding.forward import feed_chain, feed_tree, tree_attention_support
from cpd_mtp.decoding.noise import PositionNoise
from cpd_mtp.decoding.tree import DraftTree, ancestor_matrix, tree_attention_mask, verify
from cpd_mtp.hf.modeling import CPDMTPForCausalLM

VOCAB = 16


@st.composite
def trees(draw, max_nodes=12, vocab=5, batch=3):
    """A batch of random trees: parents before children, distinct sibling tokens."""
    n = draw(st.integers(1, max_nodes))
    rows = []
    for _ in range(batch):
        parents, tokens, depth = [-1], [draw(st.integers(0, vocab - 1))], [0]
        for u in range(1, n):
            parent = draw(st.integers(0, u - 1))
            used = {tokens[v] for v in range(1, u) if parents[v] == parent}
            free = [t for t in range(vocab) if t not in used]
            if not free:
                parent, free = (
                    0,
                    [
                        t
                        for t in range(vocab)
                        if t not in {tokens[v] for v in range(1, u) if parents[v] == 0}
                    ]
                    or [0],
                )
            parents.append(parent)
            tokens.append(draw(st.sampled_from(free)))
            depth.append(depth[parent] + 1)
        rows.append((parents, tokens, depth))
    return DraftTree(
        tokens=torch.tensor([r[1] for r in rows]),
        parents=torch.tensor([r[0] for r in rows]),
        depth=torch.tensor([r[2] for r in rows]),
        valid=torch.ones(batch, n, dtype=torch.bool),
    )


@settings(max_examples=60, deadline=None)
@given(tree=trees())
def test_ancestor_matrix_is_the_walk_to_the_root(tree):
    got = ancestor_matrix(tree.parents)
    for row in range(tree.parents.shape[0]):
        for u in range(tree.size):
            seen, v = set(), u
            while v >= 0:
                seen.add(v)
                v = int(tree.parents[row, v])
            assert {v for v in range(tree.size) if bool(got[row, u, v])} == seen


@settings(max_examples=40, deadline=None)
@given(tree=trees(), prefix=st.integers(1, 6), window=st.one_of(st.none(), st.integers(1, 8)))
def test_the_mask_shows_each_node_its_prefix_and_ancestors(tree, prefix, window):
    b = tree.parents.shape[0]
    g = torch.Generator().manual_seed(prefix)
    prefix_mask = torch.rand(b, prefix, generator=g) < 0.7
    prefix_mask = prefix_mask.sort(dim=1).values  # left padding: real slots last
    n_valid = prefix_mask.sum(1)
    mask = tree_attention_mask(prefix_mask, tree, n_valid, torch.float32, window)
    assert mask.shape == (b, 1, tree.size, prefix + tree.size)
    allowed = mask[:, 0] == 0
    ancestors = ancestor_matrix(tree.parents)
    for row in range(b):
        positions = (prefix_mask[row].long().cumsum(0) - 1).tolist()
        for u in range(tree.size):
            q = int(n_valid[row]) + int(tree.depth[row, u])
            for s in range(prefix):
                want = bool(prefix_mask[row, s]) and (window is None or q - positions[s] < window)
                assert bool(allowed[row, u, s]) == want
            for v in range(tree.size):
                k = int(n_valid[row]) + int(tree.depth[row, v])
                want = bool(ancestors[row, u, v]) and (window is None or q - k < window)
                assert bool(allowed[row, u, prefix + v]) == want


@settings(max_examples=80, deadline=None)
@given(tree=trees(), seed=st.integers(0, 1000))
def test_greedy_verification_walks_the_matching_children(tree, seed):
    b = tree.parents.shape[0]
    target = torch.randn(b, tree.size, 5, generator=torch.Generator().manual_seed(seed))
    # Make the verifier agree with some nodes, so paths go deep.
    for row in range(b):
        for u in range(1, tree.size):
            if (u + seed) % 3:
                target[row, int(tree.parents[row, u]), int(tree.tokens[row, u])] = 10.0 + u
    path = verify(tree, target)
    for row in range(b):
        u, walk = 0, [0]
        while True:
            best = int(target[row, u].argmax())
            kids = [v for v in range(tree.size) if int(tree.parents[row, v]) == u]
            match = [v for v in kids if int(tree.tokens[row, v]) == best]
            if not match:
                break
            u = match[0]
            walk.append(u)
        assert int(path.accepted[row]) == len(walk) - 1
        assert path.nodes[row, : len(walk)].tolist() == walk
        assert int(path.next_token[row]) == int(target[row, u].argmax())


def test_the_verifier_takes_the_first_maximum_on_ties():
    """Ties: torch.argmax returns the first maximum, as HF's greedy search; a draft of the
    second tied token is rejected."""
    target = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]])
    for draft, accepted, nxt in ((0, 1, 1), (1, 0, 0)):
        tree = DraftTree(
            tokens=torch.tensor([[2, draft]]),
            parents=torch.tensor([[-1, 0]]),
            depth=torch.tensor([[0, 1]]),
            valid=torch.ones(1, 2, dtype=torch.bool),
        )
        path = verify(tree, target)
        assert path.accepted.tolist() == [accepted] and path.next_token.tolist() == [nxt]


def test_coupled_sampling_emits_the_autoregressive_draws_whatever_the_drafts():
    """100,000 rows, one tree each: three candidates for position 1 drawn from q_root with
    that position's noise (the Gumbel top-3), and a child of the first drawn from q_next with
    position 2's noise. Verifying log p + G walks into a child exactly when it is the
    verifier's own draw, so the first two tokens (the second completed, as the next step
    would, from position 2's noise) are the autoregressive Gumbel-max draws, token for token,
    and follow p(x1) p(x2 | x1) (chi-square over the 16 cells, p > 1e-3)."""
    rows, vocab = 100_000, 4
    p_root = torch.tensor([0.1, 0.4, 0.3, 0.2])
    p_next = torch.tensor(  # p(x2 | x1), one row per x1
        [[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.0, 0.0]]
    )
    q_root, q_next = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.6, 0.2, 0.1])
    noise = PositionNoise(seed=3, vocab_size=vocab)
    batch = torch.arange(rows)
    g1 = noise(batch, torch.full((rows, 1), 1))[:, 0]
    g2 = noise(batch, torch.full((rows, 1), 2))[:, 0]
    drawn = (q_root.log() + g1).topk(3, dim=-1).indices
    second = (q_next.log() + g2).argmax(-1)
    tokens = torch.stack([torch.zeros(rows, dtype=torch.long), *drawn.unbind(1), second], dim=1)
    tree = DraftTree(
        tokens=tokens,
        parents=torch.tensor([-1, 0, 0, 0, 1]).expand(rows, -1),
        depth=torch.tensor([0, 1, 1, 1, 2]).expand(rows, -1),
        valid=torch.ones(rows, 5, dtype=torch.bool),
    )
    # The verifier after the root is p_root, after node u p(. | its token); each node's
    # children are drawn with the noise of their output position.
    log_target = torch.where(tree.depth[..., None] == 0, p_root, p_next[tokens]).log()
    g_children = torch.where(tree.depth[..., None] == 0, g1[:, None], g2[:, None])
    path = verify(tree, log_target + g_children)
    nodes = torch.nn.functional.pad(path.nodes, (0, 3 - path.nodes.shape[1]))
    first = torch.where(
        path.accepted >= 1, tokens.gather(1, nodes[:, 1:2]).squeeze(1), path.next_token
    )
    second_token = torch.where(
        path.accepted >= 2,
        tokens.gather(1, nodes[:, 2:3]).squeeze(1),
        torch.where(path.accepted == 1, path.next_token, (p_next[first].log() + g2).argmax(-1)),
    )
    want_first = (p_root.log() + g1).argmax(-1)
    want_second = (p_next[want_first].log() + g2).argmax(-1)
    assert torch.equal(first, want_first) and torch.equal(second_token, want_second)
    counts: dict[tuple, int] = {}
    for a, b in zip(first.tolist(), second_token.tolist()):
        counts[(a, b)] = counts.get((a, b), 0) + 1
    exact = {(a, b): float(p_root[a] * p_next[a, b]) for a in range(vocab) for b in range(vocab)}
    assert chi_square_p_value(counts, exact, rows) > 1e-3
    assert 0 < int((path.accepted >= 1).sum()) < rows  # drafts accepted and rejected
    assert int((path.accepted == 2).sum()) > 0


# ------------------------------------------------------------------ tree forwards, per architecture
def _model(arch: str) -> CPDMTPForCausalLM:
    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    if arch == "llama":
        config = build_tiny_llama_config(vocab_size=VOCAB)
    elif arch == "mistral":
        config = MistralConfig(sliding_window=5, **shape)
    elif arch == "qwen2-mixed":  # layer 0 full attention, layer 1 a window of 5
        config = Qwen2Config(
            use_sliding_window=True, sliding_window=5, max_window_layers=1, **shape
        )
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    lm = AutoModelForCausalLM.from_config(config).eval()
    return CPDMTPForCausalLM.from_causal_lm(lm, n_future=3, rank=2).eval()


ARCHS = ["llama", "mistral", "qwen2-mixed", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees(max_nodes=10, vocab=VOCAB, batch=2), prefix=st.integers(1, 11))
def test_a_tree_forward_equals_its_paths_fed_as_chains(arch, tree, prefix):
    """Each node's hidden state equals the last hidden state of its path fed after the same
    prefix as a chain (prefixes up to 11 > the window of 5)."""
    model = _model(arch)
    assert tree_attention_support(model, torch.arange(6))[0]
    prefix_ids = torch.randint(1, VOCAB, (2, prefix), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, prefix, dtype=torch.bool)
    n_valid = torch.full((2,), prefix)

    def prefilled(rows):
        positions = torch.arange(prefix)[None].expand(len(rows), -1)
        _, cache = model.trunk_hidden(prefix_ids[rows], attention_mask=mask[rows].long(),
                                      position_ids=positions, cache=decoding_cache(model),
                                      use_cache=True)  # fmt: skip
        return cache

    with torch.no_grad():
        hidden, _ = feed_tree(model, tree, mask, n_valid, prefilled([0, 1]))
        for row in range(2):
            for u in range(tree.size):
                path, v = [], u
                while v >= 0:
                    path.insert(0, int(tree.tokens[row, v]))
                    v = int(tree.parents[row, v])
                chain, _ = feed_chain(model, torch.tensor([path]), mask[row : row + 1],
                                      n_valid[row : row + 1], prefilled([row]))  # fmt: skip
                torch.testing.assert_close(hidden[row, u], chain[0, -1], atol=2e-5, rtol=2e-5)


def test_a_model_that_takes_no_tree_falls_back_to_chains(caplog):
    model = _model("llama")
    model.trunk.config._attn_implementation_internal = "flash_attention_2"
    with caplog.at_level(logging.INFO, logger="cpd_mtp.decoding.forward"):
        support, reason = tree_attention_support(model, torch.arange(6))
    assert not support and "flash_attention_2" in reason
    assert any("decoding with chains" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ greedy decoding with trees
class _StopAt(StoppingCriteria):
    def __init__(self, token: int, prompt_length: int) -> None:
        self.token, self.prompt_length = token, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.prompt_length :] == self.token).any(-1)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nodes=st.integers(1, 32),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    use_periodic=st.booleans(),
    seed=st.integers(0, 10_000),
    max_new=st.integers(1, 16),
    context_drafts=st.booleans(),
)
def test_greedy_trees_of_1_to_32_nodes_equal_hf_greedy(
    nodes, lengths, use_periodic, seed, max_new, context_drafts
):
    model = trained_model(4, 3)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        periodic(1, n, g)[0] if use_periodic else prompt_tokens(seed + i, n)
        for i, n in enumerate(lengths)
    ]
    ids, mask = left_padded(prompts)
    out = generate(
        model, ids, max_new, attention_mask=mask, draft_tree=nodes, context_drafts=context_drafts
    )
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new))
    assert max(out.tree_sizes, default=0) <= nodes


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_trees_equal_hf_with_eos_stopping_and_padding(arch):
    model = _model(arch)
    g = torch.Generator().manual_seed(5)
    ids, mask = left_padded([periodic(1, n, g)[0] for n in (9, 4, 12)])
    free = hf_greedy(model, ids, mask, 24)
    eos = int(free[0, ids.shape[1] + 3])
    stop = int(free[1, ids.shape[1] + 6])
    criteria = StoppingCriteriaList([_StopAt(stop, ids.shape[1])])
    for tree in (16, "auto"):
        out = generate(model, ids, 24, attention_mask=mask, draft_tree=tree, eos_token_id=eos,
                       pad_token_id=0, stopping_criteria=criteria)  # fmt: skip
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, stopping_criteria=criteria,
                             speculative=False)  # fmt: skip
        assert torch.equal(out.sequences, ref), (arch, tree)
    # Past the window of 5 on the sliding models: prompts of 12 and 24 new tokens.
