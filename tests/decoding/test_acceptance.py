"""Lossy acceptance rules (``cpd_mtp.decoding.acceptance``) against references built by hand.

- ``Acceptance.acceptable``: each node's verdict against the rule computed in plain Python
  floats (softmax, entropy, threshold) for random trees and distributions.
- ``verify`` with a rule: the accepted path against enumeration of every acceptable path (the
  longest, first in tree order), and its unverified flags.
- End to end on tiny models: every emitted token obeys the rule against the original model's own
  distribution of the emitted prefix (a full forward, no cache); the statistics count exactly
  the tokens that are not the model's greedy choice; tau = 1 is exact decoding (greedy and
  seeded sampling); ``model.generate`` and ``generation_config`` serve the rule; bad options
  are one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from decoding_builders import prompt_tokens, trained_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tree import trees

from cpd_mtp.decoding import UniformSource, generate
from cpd_mtp.decoding.acceptance import Acceptance
from cpd_mtp.decoding.options import DraftOptions
from cpd_mtp.decoding.tree import DraftTree, verify


@st.composite
def tree_batches(draw, vocab: int = 12, batch: int = 2, max_nodes: int = 10):
    """(DraftTree, target (b, N, V)): ``test_tree.trees`` (V > N, so siblings always get
    distinct tokens) with random scores."""
    tree = draw(trees(max_nodes=max_nodes, vocab=vocab, batch=batch))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.3, 1.0, 3.0]))
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, tree.size, vocab, generator=generator) * scale
    return tree, target


def _reference_typical(tokens, parents, scores, epsilon, delta) -> list[bool]:
    """One row's verdicts in Python floats: exact match or p(token) > min(eps, delta e^-H)."""
    verdicts = [True]
    for u in range(1, len(tokens)):
        row = scores[parents[u]]
        top = max(row)
        probs = [math.exp(s - top) for s in row]
        total = sum(probs)
        probs = [p / total for p in probs]
        entropy = -sum(p * math.log(p) for p in probs if p > 0)
        threshold = min(epsilon, delta * math.exp(-entropy))
        choice = row.index(top)
        verdicts.append(tokens[u] == choice or probs[tokens[u]] > threshold)
    return verdicts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=tree_batches(),
    epsilon=st.sampled_from([0.05, 0.09, 0.3, 1.0]),
    delta=st.sampled_from([0.1, 0.3, 1.0]),
)
def test_typical_verdicts_match_the_rule_in_python_floats(batch, epsilon, delta):
    tree, scores = batch
    rule = Acceptance.parse("typical", epsilon, delta)
    logits = scores.double() + 3.0  # unnormalised: the rule normalises what it reads
    got = rule.acceptable(tree.tokens, tree.parents, scores.argmax(-1), logits)
    for i in range(tree.tokens.shape[0]):
        want = _reference_typical(
            tree.tokens[i].tolist(), tree.parents[i].tolist(), scores[i].double().tolist(),
            epsilon, delta,
        )  # fmt: skip
        assert got[i].tolist() == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=tree_batches(), tau=st.sampled_from([0.2, 0.5, 0.9, 1.0]), verified=st.booleans())
def test_confident_verdicts_match_the_rule(batch, tau, verified):
    tree, scores = batch
    b, n = tree.tokens.shape
    q = torch.rand(b, n, generator=torch.Generator().manual_seed(n))
    head = torch.rand(b, n, generator=torch.Generator().manual_seed(n + 1)) < 0.7
    head_log_q = torch.where(head, q.log(), -torch.inf)
    rule = Acceptance.parse("confident", confidence=tau, accept_verified=verified)
    choice = scores.argmax(-1)
    got = rule.acceptable(tree.tokens, tree.parents, choice, head_log_q=head_log_q)
    for i in range(b):
        for u in range(n):
            exact = int(tree.tokens[i, u]) == int(choice[i, max(int(tree.parents[i, u]), 0)])
            if u == 0:
                want = True
            elif tau == 1.0:  # nothing is confident enough: exact decoding
                want = exact
            else:
                confident = bool(head[i, u]) and float(q[i, u]) >= tau
                want = confident or (verified and exact)
            assert bool(got[i, u]) == want, (i, u)


def _reference_path(tokens, parents, acceptable, scores):
    """Every path of acceptable nodes from the root, enumerated; the longest, then the first
    in tree order (lexicographically smallest node list); and the choice after it."""
    paths = [[0]]
    stack = [[0]]
    while stack:
        path = stack.pop()
        for u in range(1, len(tokens)):
            if parents[u] == path[-1] and acceptable[u]:
                paths.append([*path, u])
                stack.append([*path, u])
    best = min(paths, key=lambda p: (-len(p), p))
    last = scores[best[-1]]
    return best, last.index(max(last))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=tree_batches(), density=st.sampled_from([0.3, 0.6, 0.9]))
def test_lossy_verification_takes_the_longest_acceptable_path(batch, density):
    tree, scores = batch
    b, n = tree.tokens.shape
    acceptable = torch.rand(b, n, generator=torch.Generator().manual_seed(n * 7)) < density
    acceptable[:, 0] = True
    path = verify(tree, scores, acceptable)
    choice = scores.argmax(-1)
    for i in range(b):
        nodes, after = _reference_path(
            tree.tokens[i].tolist(), tree.parents[i].tolist(), acceptable[i].tolist(),
            scores[i].tolist(),
        )  # fmt: skip
        accepted = int(path.accepted[i])
        assert path.nodes[i, : accepted + 1].tolist() == nodes
        assert int(path.next_token[i]) == after
        flags = path.unverified[i, :accepted].tolist()
        want = [
            int(tree.tokens[i, u]) != int(choice[i, int(tree.parents[i, u])]) for u in nodes[1:]
        ]
        assert flags == want and not path.unverified[i, accepted:].any()


def test_exact_verification_marks_nothing_unverified():
    tree = DraftTree(
        tokens=torch.tensor([[1, 2, 3]]),
        parents=torch.tensor([[-1, 0, 1]]),
        depth=torch.tensor([[0, 1, 2]]),
        valid=torch.ones(1, 3, dtype=torch.bool),
    )
    target = torch.full((1, 3, 5), -1.0)
    target[0, 0, 2] = target[0, 1, 3] = target[0, 2, 4] = 1.0  # 2 then 3 accepted, then 4
    path = verify(tree, target)
    assert path.accepted.tolist() == [2] and path.next_token.tolist() == [4]
    assert not path.unverified.any()


# ------------------------------------------------------------------------ end to end


def _greedy_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The original model's scores after every prefix: one full forward, no cache."""
    with torch.no_grad():
        return model(sequence[None]).logits[0].float()


@pytest.mark.parametrize(("epsilon", "delta"), [(0.09, 0.3), (0.3, 1.0), (1.0, 1.0)])
@pytest.mark.parametrize("draft_tree", ["auto", "chain", 6])
def test_every_typical_token_obeys_the_rule_against_the_original_model(epsilon, delta, draft_tree):
    model = trained_model(3, 2)
    total_unverified = 0
    for seed in range(3):
        ids = prompt_tokens(seed, 7)[None]
        out = generate(
            model, ids, 24, draft_tree=draft_tree, acceptance="typical",
            typical_epsilon=epsilon, typical_delta=delta,
        )  # fmt: skip
        assert out.acceptance == f"typical(epsilon={epsilon:g}, delta={delta:g})"
        sequence = out.sequences[0]
        logits = _greedy_logits(model, sequence)
        off_greedy = 0
        for t in range(ids.shape[1], sequence.shape[0]):
            row = logits[t - 1].double()
            p = torch.softmax(row, -1)
            entropy = float(-(torch.special.xlogy(p, p)).sum())
            token = int(sequence[t])
            greedy = int(row.argmax())
            # A float32 near-tie may flip between layouts; the rule itself is what is checked.
            assert (
                token == greedy or float(p[token]) > min(epsilon, delta * math.exp(-entropy)) - 1e-5
            )
            off_greedy += token != greedy
        assert out.unverified_tokens == off_greedy
        total_unverified += off_greedy
    if (epsilon, delta) == (1.0, 1.0):
        return
    assert total_unverified > 0  # the rule did accept against the verifier here


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("draft_tree", ["auto", "chain", 6])
def test_confidence_one_is_exact_decoding(do_sample, draft_tree):
    model = trained_model(4, 2)
    for seed in range(3):
        ids = prompt_tokens(seed + 10, 6)[None]
        kwargs = dict(do_sample=do_sample, temperature=0.8, draft_tree=draft_tree)
        exact = generate(model, ids, 20, generator=torch.Generator().manual_seed(seed), **kwargs)
        tau1 = generate(
            model, ids, 20, generator=torch.Generator().manual_seed(seed), acceptance="confident",
            confidence=1.0, **kwargs,
        )  # fmt: skip
        assert torch.equal(exact.sequences, tau1.sequences)
        assert tau1.unverified_tokens == 0 and exact.acceptance == "exact"


@pytest.mark.parametrize("do_sample", [False, True])
def test_confident_decoding_counts_its_off_greedy_tokens(do_sample):
    """Greedy: the statistics count exactly the emitted tokens that are not the original model's
    greedy choice after the emitted prefix. Sampled: the rule runs and is recorded."""
    model = trained_model(4, 2)
    seen = 0
    for seed in range(4):
        ids = prompt_tokens(seed + 20, 6)[None]
        out = generate(
            model, ids, 24, do_sample=do_sample, generator=torch.Generator().manual_seed(seed),
            acceptance="confident", confidence=0.3, accept_verified=False,
        )  # fmt: skip
        assert out.acceptance == "confident(tau=0.3)"
        seen += out.unverified_tokens
        if not do_sample:
            sequence = out.sequences[0]
            greedy = _greedy_logits(model, sequence).argmax(-1)
            off = sum(int(sequence[t]) != int(greedy[t - 1]) for t in range(6, sequence.shape[0]))
            assert out.unverified_tokens == off
    assert seen > 0


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_fixed_tree_makes_lossy_output_a_function_of_inputs_and_seed(do_sample):
    model = trained_model(3, 2)
    ids = torch.stack([prompt_tokens(s, 6) for s in range(3)])
    runs = [
        generate(
            model,
            ids,
            16,
            do_sample=do_sample,
            generator=torch.Generator().manual_seed(5),
            acceptance="typical",
            typical_epsilon=0.3,
            draft_tree=tree,
        )
        for tree in (6, 6, "chain", "chain")
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[2].sequences, runs[3].sequences)
    assert runs[0].unverified_tokens == runs[1].unverified_tokens


def test_batched_typical_rows_obey_the_rule_and_are_counted():
    model = trained_model(3, 2)
    ids = torch.stack([prompt_tokens(s, 6) for s in range(4)])  # equal lengths: no padding
    out = generate(model, ids, 20, acceptance="typical", typical_epsilon=0.3, typical_delta=1.0)
    off_greedy = 0
    for row in out.sequences:
        logits = _greedy_logits(model, row).double()
        for t in range(ids.shape[1], row.shape[0]):
            p = torch.softmax(logits[t - 1], -1)
            entropy = float(-(torch.special.xlogy(p, p)).sum())
            token, greedy = int(row[t]), int(p.argmax())
            assert token == greedy or float(p[token]) > min(0.3, math.exp(-entropy)) - 1e-5
            off_greedy += token != greedy
    assert out.unverified_tokens == off_greedy > 0


def test_model_generate_and_generation_config_serve_the_rule():
    model = trained_model(3, 2)
    ids = prompt_tokens(4, 6)[None]
    lossy = {"acceptance": "typical", "typical_epsilon": 0.3, "draft_tree": 6}
    want = generate(model, ids, 16, **lossy)
    got = model.generate(ids, max_new_tokens=16, do_sample=False, **lossy)
    assert torch.equal(got, want.sequences)
    assert model.last_generation_stats.acceptance == want.acceptance
    config = model.generation_config.__class__(**model.generation_config.to_dict())
    config.acceptance, config.typical_epsilon, config.max_new_tokens = "typical", 0.3, 16
    config.draft_tree = 6
    assert torch.equal(model.generate(ids, generation_config=config, do_sample=False), got)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"acceptance": "lossy"}, "acceptance must be one of"),
        ({"acceptance": "typical", "typical_epsilon": 0.0}, "typical_epsilon must be"),
        ({"acceptance": "typical", "typical_delta": 1.5}, "typical_delta must be"),
        ({"acceptance": "typical", "typical_delta": float("nan")}, "typical_delta must be"),
        ({"acceptance": "confident", "confidence": -0.1}, "confidence must be"),
        ({"acceptance": "confident", "accept_verified": 1}, "accept_verified must be"),
        ({"confidence": 0.5}, "applies to acceptance='confident' only"),
        ({"acceptance": "confident", "typical_delta": 0.5}, "applies to acceptance='typical'"),
        ({"acceptance": "typical", "draft_tree": 0}, "draft_tree=0 feeds none"),
        ({"acceptance": "confident", "draft_positions": 0}, "draft_positions=0 feeds none"),
    ],
)
def test_bad_lossy_options_are_one_line_errors(kwargs, message):
    model = trained_model(3, 2)
    ids = prompt_tokens(0, 4)[None]
    with pytest.raises(ValueError, match=message) as error:
        generate(model, ids, 4, **kwargs)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=4, **kwargs)


def test_a_lossy_rule_is_never_dropped_for_hugging_faces_loop():
    model = trained_model(3, 2)
    ids = prompt_tokens(0, 4)[None]
    for extra in ({"speculative": False}, {"num_beams": 2}, {"repetition_penalty": 1.2}):
        with pytest.raises(ValueError, match="needs the speculative decoder"):
            model.generate(ids, max_new_tokens=4, acceptance="typical", **extra)


def test_confident_needs_the_heads_probabilities():
    model = trained_model(3, 2)
    ids = prompt_tokens(0, 4)[None]
    with pytest.raises(ValueError, match="no CPSource"):
        generate(model, ids, 4, acceptance="confident", drafter=UniformSource(16, 2))
    out = generate(model, ids, 8, acceptance="typical", drafter=UniformSource(16, 2))
    assert out.acceptance.startswith("typical")


def test_options_parse_keeps_exact_the_default():
    assert DraftOptions.parse().acceptance == Acceptance()
    assert not Acceptance.parse().lossy and not Acceptance.parse("confident", confidence=1).lossy
    assert Acceptance.parse("typical").lossy
