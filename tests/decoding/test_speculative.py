"""Self-speculative decoding (``cpd_mtp.decoding.speculative``) against independent references.

- Greedy: token-for-token equality with ``transformers`` ``model.generate(do_sample=False)`` on
  the same ``CPDMTPForCausalLM`` (which decodes the marginal one token per forward).
- Sampling: the empirical distribution of continuations against the exact autoregressive
  distribution of the warped marginal, enumerated with full (cache-free) forwards and the
  ``transformers`` logits warpers.
- Statistics, streaming, argument checks, low precision and sliding-window trunks.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from conftest import build_tiny_llama_config as tiny_llama_config
from decoding_builders import (
    chi_square_p_value,
    enumerate_joint,
    hf_warp,
    left_padded,
    periodic,
    prompt_tokens,
    random_head_model,
    train_on_periodic,
    trained_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    Qwen2Config,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from cpd_mtp.decoding import (
    UniformSource,
    autoregressive_generate,
    generate,
    warp_log_probs,
)
from cpd_mtp.hf.modeling import CPDMTPForCausalLM

VOCAB, PAD = 16, 0  # the vocabulary and pad id of the conftest models
GREEDY_SHAPES = [(2, 1), (3, 2), (4, 3)]  # (n_future, rank)


def hf_greedy(model, ids, mask, max_new_tokens, eos=None) -> torch.Tensor:
    """Hugging Face's own greedy loop on the same model (``model.generate`` would decode
    speculatively: ``speculative=False`` keeps the reference independent)."""
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=eos,
        speculative=False,
    )


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("draft_tree", ["chain", 8, "auto"])
@pytest.mark.parametrize(("n_future", "rank"), GREEDY_SHAPES)
def test_greedy_matches_hf_generate(n_future, rank, draft_tree):
    model = trained_model(n_future, rank)
    g = torch.Generator().manual_seed(7)
    proposed = accepted = 0
    for batch, max_new in [(1, 1), (1, 9), (1, 23), (3, 6), (3, 19)]:
        lengths = torch.randint(2, 9, (batch,), generator=g).tolist()
        prompts = [periodic(1, n, g)[0] for n in lengths]
        if batch > 1:  # one row with a random (non-periodic) prompt: more rejections
            prompts[1] = torch.randint(1, VOCAB, (lengths[1],), generator=g)
        ids, mask = left_padded(prompts)
        ref = hf_greedy(model, ids, mask, max_new)
        out = generate(model, ids, max_new, attention_mask=mask, draft_tree=draft_tree)
        assert torch.equal(out.sequences, ref), (batch, max_new)
        proposed += sum(out.proposed_counts)
        accepted += sum(out.accepted_counts)
    # Verification was exercised both ways (a tree with context drafts accepts every level of
    # these periodic prompts).
    assert 0 < accepted <= proposed
    if draft_tree == "chain":
        assert accepted < proposed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(GREEDY_SHAPES),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    use_periodic=st.booleans(),
    seed=st.integers(0, 10_000),
    max_new=st.integers(1, 14),
    draft_fraction=st.floats(0.0, 1.0),
)
def test_greedy_property_random_prompts(
    shape, lengths, use_periodic, seed, max_new, draft_fraction
):
    """Greedy equality holds for any prompts, batch, padding, length and number of drafts."""
    model = trained_model(*shape)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        periodic(1, n, g)[0] if use_periodic else prompt_tokens(seed + i, n)
        for i, n in enumerate(lengths)
    ]
    ids, mask = left_padded(prompts)
    drafts = round(draft_fraction * (shape[0] - 1))
    out = generate(model, ids, max_new, attention_mask=mask, draft_positions=drafts)
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, max_new))


def test_greedy_eos_stops_each_row_like_hf():
    model = trained_model(3, 2)
    g = torch.Generator().manual_seed(3)
    prompts = [periodic(1, n, g)[0] for n in (5, 3, 7)]
    ids, mask = left_padded(prompts)
    free = generate(model, ids, 16, attention_mask=mask).sequences[:, ids.shape[1] :]
    # An EOS that the first row emits a few tokens in, so rows stop at different times.
    eos = int(free[0, 2])
    stopped = []
    for eos_ids in (eos, [eos, int(free[2, 4])]):
        ref = hf_greedy(model, ids, mask, 16, eos=eos_ids)
        out = generate(model, ids, 16, attention_mask=mask, eos_token_id=eos_ids, pad_token_id=PAD)
        assert torch.equal(out.sequences, ref)
        # New tokens per row: up to and including the first EOS.
        new = ref[:, ids.shape[1] :]
        eos_t = torch.tensor(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        for row, count in enumerate(out.new_tokens_per_row):
            hits = torch.isin(new[row], eos_t).nonzero()
            assert count == (int(hits[0]) + 1 if len(hits) else new.shape[1])
        stopped.append(out.new_tokens_per_row)
    # Rows stopped early, and not all at the same time.
    assert all(min(counts) < 16 and len(set(counts)) > 1 for counts in stopped), stopped


def test_uniform_drafter_greedy_still_exact():
    model = trained_model(3, 2)
    ids, mask = left_padded([prompt_tokens(1, 4), prompt_tokens(2, 6)])
    out = generate(model, ids, 12, attention_mask=mask, drafter=UniformSource(VOCAB, 4))
    assert torch.equal(out.sequences, hf_greedy(model, ids, mask, 12))
    assert out.draft_positions == 4


# ----------------------------------------------------------------------------- statistics


def test_statistics_and_stream():
    model = trained_model(4, 3)
    g = torch.Generator().manual_seed(11)
    ids = periodic(1, 6, g)
    calls = {"trunk": 0}
    original = model.trunk_hidden

    def counting(*args, **kwargs):
        calls["trunk"] += 1
        return original(*args, **kwargs)

    streamed: list[int] = []
    model.trunk_hidden = counting
    try:
        out = generate(
            model, ids, 30, draft_tree="chain", stream=lambda new: streamed.extend(new[0])
        )
    finally:
        del model.trunk_hidden
    assert out.forwards == calls["trunk"] == out.iterations + 1
    assert out.new_tokens == 30 == len(streamed)
    assert streamed == out.sequences[0, ids.shape[1] :].tolist()
    assert out.tokens_per_forward == pytest.approx(out.new_tokens / out.forwards)
    assert out.tokens_per_forward > 1.0  # the trained drafts pay off on periodic text
    assert len(out.acceptance_rate) == len(out.proposed_counts) == 3
    for acc, prop, rate in zip(out.accepted_counts, out.proposed_counts, out.acceptance_rate):
        assert 0 <= acc <= prop
        assert 0.0 <= rate <= 1.0
    # A draft position is verified only after the previous one was accepted.
    for j in range(1, 3):
        assert out.proposed_counts[j] <= out.accepted_counts[j - 1]
    expected = 1 + sum(math.prod(out.acceptance_rate[: k + 1]) for k in range(3))
    assert out.expected_tokens_per_step == pytest.approx(expected)
    # Each iteration emits 1 + (accepted drafts) tokens; the prefill emits one.
    assert out.new_tokens <= 1 + out.iterations + sum(out.accepted_counts)
    summary = out.summary()
    assert summary["forwards"] == out.forwards and "wall_time_s" in summary

    ar = generate(model, ids, 30, draft_positions=0)
    assert ar.forwards == 30 and ar.tokens_per_forward == 1.0
    assert torch.equal(ar.sequences, out.sequences)


def test_batch_statistics_count_rows():
    model = trained_model(3, 2)
    ids, mask = left_padded([prompt_tokens(5, 3), prompt_tokens(6, 8), prompt_tokens(7, 5)])
    out = generate(model, ids, 10, attention_mask=mask)
    assert out.new_tokens_per_row == [10, 10, 10]
    assert max(out.row_forwards) == out.forwards
    assert out.tokens_per_forward == pytest.approx(30 / sum(out.row_forwards))


# ----------------------------------------------------------------------------- arguments


def test_running_past_max_position_embeddings_warns():
    model = trained_model(2, 1)
    limit = model.trunk.config.max_position_embeddings
    ids = prompt_tokens(1, 4)[None]
    with pytest.warns(UserWarning, match="max_position_embeddings") as caught:
        generate(model, ids, limit, eos_token_id=[])
    with pytest.warns(UserWarning, match="max_position_embeddings") as through_hf:
        model.generate(ids, max_new_tokens=limit, do_sample=False)
    # The warning points at the caller's line, not at torch's or transformers' decorators.
    assert {record.filename for record in [*caught, *through_hf]} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, ids, limit - ids.shape[1], eos_token_id=[])


def test_invalid_arguments():
    model = trained_model(2, 1)
    ids = prompt_tokens(1, 3)[None]
    with pytest.raises(ValueError, match="draft_positions"):
        generate(model, ids, 3, draft_positions=2)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, 3, attention_mask=torch.tensor([[1, 1, 0]]))
    # A hole in the middle is not left padding either (it was accepted without a word).
    with pytest.raises(ValueError, match="row 0 of attention_mask has a 0 at column 1"):
        generate(model, ids, 3, attention_mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="only 0"):
        generate(model, ids, 3, attention_mask=torch.tensor([[1, 2, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 3, do_sample=True, temperature=0.0)
    assert torch.equal(generate(model, ids, 0).sequences, ids)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"repetition_penalty": 1.2}, ["repetition_penalty", "model.generate"]),
        ({"num_beams": 2, "max_length": 9}, ["max_length, num_beams", "model.generate"]),
        (
            {"do_sample": True, "warpers": [RepetitionPenaltyLogitsProcessor(1.2)]},
            ["RepetitionPenaltyLogitsProcessor", "model.generate"],
        ),
        ({"min_new_tokens": -1}, ["min_new_tokens"]),
    ],
)
def test_what_the_decoder_cannot_serve_is_refused_by_name(kwargs, words):
    model = trained_model(2, 1)
    with pytest.raises(ValueError) as error:
        generate(model, prompt_tokens(1, 3)[None], 3, **kwargs)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


class _StopAfter(StoppingCriteria):
    """Row-wise: a row is done at its third new ``token``."""

    def __init__(self, token: int, prompt_width: int) -> None:
        self.token, self.width = token, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, self.width :] == self.token).sum(dim=1) >= 3


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("batch", [1, 3])
def test_streamer_and_stopping_criteria_as_hf(batch):
    """The streamer gets what HF's loop puts (the prompt, then the same tokens; the same (B,)
    columns for a batch), and a row-wise criterion stops each row at HF's token."""
    model = trained_model(4, 3)
    g = torch.Generator().manual_seed(11)
    ids, mask = left_padded([periodic(1, n, g)[0] for n in (9, 6, 4)[:batch]])
    free = hf_greedy(model, ids, mask, 20)
    token = int(free[0, ids.shape[1]])
    eos = min(set(range(1, VOCAB)) - set(free.flatten().tolist()))  # never emitted
    criteria = StoppingCriteriaList([_StopAfter(token, ids.shape[1])])
    ours, theirs = _Recorder(), _Recorder()
    out = generate(
        model, ids, 20, attention_mask=mask, eos_token_id=eos, streamer=ours,
        stopping_criteria=criteria,
    )  # fmt: skip
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD,
        eos_token_id=eos, streamer=theirs, stopping_criteria=criteria, speculative=False,
    )  # fmt: skip
    assert torch.equal(out.sequences, ref)
    assert out.sequences.shape[1] < free.shape[1]  # the criterion cut every row
    assert out.forwards < out.new_tokens  # speculation did run
    assert ours.ended and theirs.ended and torch.equal(ours.puts[0], theirs.puts[0])
    if batch == 1:  # chunks of the accepted tokens
        assert torch.equal(torch.cat(ours.puts[1:]), torch.cat(theirs.puts[1:]))
        assert len(ours.puts) < len(theirs.puts)
    else:
        assert len(ours.puts) == len(theirs.puts)
        assert all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"do_sample": True, "temperature": NAN}, "temperature"),
        ({"do_sample": True, "temperature": INF}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
        ({"do_sample": True, "top_p": NAN}, "top_p"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"do_sample": True, "top_k": -1}, "top_k"),
        ({"do_sample": True, "top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"draft_positions": 0.5}, "draft_positions"),
        ({"input_ids": VOCAB}, "input_ids"),
        ({"input_ids": -1}, "input_ids"),
    ],
)
def test_nonsense_arguments_are_value_errors_naming_them(kwargs, name):
    """Each argument that makes no sense is refused, in both decoders, before any decoding."""
    model = trained_model(2, 1)
    kwargs = dict(kwargs)
    ids = prompt_tokens(1, 3)[None].clone()
    if "input_ids" in kwargs:
        ids[0, 1] = kwargs.pop("input_ids")
    max_new = kwargs.pop("max_new_tokens", 3)
    with pytest.raises(ValueError, match=name):
        generate(model, ids, max_new, **kwargs)
    if name != "draft_positions":
        with pytest.raises(ValueError, match=name):
            autoregressive_generate(model, ids, max_new, **kwargs)
    warping = {k: v for k, v in kwargs.items() if k in ("temperature", "top_k", "top_p")}
    if warping:
        with pytest.raises(ValueError, match=name):
            warp_log_probs(torch.zeros(2, 5), **warping)


def test_generate_defaults_to_the_model_eos_like_hf():
    """No eos_token_id / pad_token_id: the model's generation_config decides, as in HF."""
    model = copy.deepcopy(trained_model(3, 2))
    g = torch.Generator().manual_seed(3)
    ids, mask = left_padded([periodic(1, n, g)[0] for n in (5, 3, 7)])
    free = generate(model, ids, 16, attention_mask=mask).sequences[:, ids.shape[1] :]
    eos = int(free[0, 0])  # the first row stops at once; the others run on
    assert not bool((free[1:] == eos).any())
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = None  # HF then pads with the EOS id
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, speculative=False
    )
    out = generate(model, ids, 16, attention_mask=mask)
    assert torch.equal(out.sequences, ref)
    assert out.new_tokens_per_row == [1, 16, 16]
    ar = autoregressive_generate(model, ids, 16, attention_mask=mask)
    assert torch.equal(ar.sequences, ref) and ar.new_tokens_per_row == out.new_tokens_per_row
    # An explicit argument still wins over the generation config.
    explicit = generate(model, ids, 16, attention_mask=mask, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(explicit.sequences[:, ids.shape[1] :], free)


# ----------------------------------------------------------------------------- sampling

SAMPLE_VOCAB = 4
SAMPLE_NEW = 4  # continuations of 4 tokens: 4**4 = 256 cells
SAMPLES = 24_000


@pytest.fixture(scope="module")
def sampling_model() -> CPDMTPForCausalLM:
    return random_head_model(SAMPLE_VOCAB, n_future=3, rank=3, seed=5)


SAMPLING_PROMPT = torch.tensor([[1, 3, 2]])


def exact_continuation_distribution(model, prompt, length, temperature, top_k, top_p):
    """{continuation tuple: probability} of autoregressive sampling of the warped marginal.

    Enumerates every prefix, runs a full cache-free forward (``model(...).logits``), warps with
    the transformers warpers and multiplies the chain.
    """
    vocab = model.head.config.vocab_size
    probs = {(): 1.0}
    for _ in range(length):
        prefixes = list(probs)
        ids = torch.cat(
            [
                prompt.expand(len(prefixes), -1),
                torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), -1),
            ],
            1,
        )
        with torch.no_grad():
            logits = model(ids).logits[:, -1].double()
        step = hf_warp(logits, temperature, top_k, top_p).exp()
        probs = {
            (*prefix, v): probs[prefix] * float(step[i, v])
            for i, prefix in enumerate(prefixes)
            for v in range(vocab)
        }
    return probs


def sample_continuations(
    model, drafter=None, draft_positions=None, draft_tree="chain", context_drafts=None, **warping
):
    ids = SAMPLING_PROMPT.expand(SAMPLES, -1).contiguous()
    out = generate(
        model,
        ids,
        SAMPLE_NEW,
        do_sample=True,
        generator=torch.Generator().manual_seed(123),
        drafter=drafter,
        draft_positions=draft_positions,
        draft_tree=draft_tree,
        context_drafts=context_drafts,
        **warping,
    )
    counts: dict[tuple, int] = {}
    for row in out.sequences[:, ids.shape[1] :].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts, out


@pytest.mark.parametrize(
    ("warping", "drafter", "draft_tree"),
    [
        ({"temperature": 1.0}, "cp", "chain"),
        ({"temperature": 0.7, "top_k": 3}, "cp", "chain"),
        ({"temperature": 1.2, "top_k": 3, "top_p": 0.8}, "cp", "chain"),
        ({"temperature": 1.0}, "uniform", "chain"),
        # Trees: several children per node (the coupled top draws), context drafts as
        # further branches, warped and not.
        ({"temperature": 1.0}, "cp", 6),
        ({"temperature": 0.7, "top_k": 3}, "cp", 3),
        ({"temperature": 1.2, "top_p": 0.8}, "cp", 9),
    ],
)
@pytest.mark.slow
def test_sampling_matches_exact_autoregressive_distribution(
    warping, drafter, draft_tree, sampling_model
):
    """Chi-square goodness of fit of 24,000 sampled 4-token continuations (256 cells).

    Power: the test rejects at p < 1e-3. For a distribution at total-variation distance delta
    from the exact one, Pearson's noncentrality is N·chi2(p'||p) >= 4·N·delta^2; with
    df = 255 (critical value 330.5 at 1e-3), simulating the noncentral chi-square gives a
    power of 0.88 at delta = 0.034 (noncentrality 111) and 0.94 at delta = 0.036 (124): any
    deviation with TV >= 0.036 is detected with >= 90% probability.
    ``test_sampling_test_has_power`` checks it on the alternative that matters (drafts
    without verification).
    """
    model = sampling_model
    chosen = UniformSource(SAMPLE_VOCAB, max_depth=3) if drafter == "uniform" else None
    counts, out = sample_continuations(
        model, chosen, 3 if chosen else None, draft_tree=draft_tree, **warping
    )
    exact = exact_continuation_distribution(
        model,
        SAMPLING_PROMPT,
        SAMPLE_NEW,
        warping.get("temperature", 1.0),
        warping.get("top_k"),
        warping.get("top_p"),
    )
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    p_value = chi_square_p_value(counts, exact, SAMPLES)
    assert p_value > 1e-3, p_value
    tv = 0.5 * sum(abs(counts.get(c, 0) / SAMPLES - p) for c, p in exact.items())
    assert tv < 0.05
    # Both verification branches ran: some drafts accepted, some rejected.
    assert 0 < sum(out.accepted_counts) < sum(out.proposed_counts)
    if draft_tree != "chain":  # wider than a chain: siblings were verified in turn
        assert max(out.tree_sizes) > model.head.config.n_future - 1
    if drafter == "uniform":
        assert out.acceptance_rate[0] < 0.9


@pytest.mark.slow
def test_sampling_test_has_power(sampling_model):
    """The chi-square test rejects samples of the unverified CP joint (drafts kept as is)."""
    model = sampling_model
    counts, _ = sample_continuations(model)
    exact = exact_continuation_distribution(model, SAMPLING_PROMPT, 3, 1.0, None, None)
    first3: dict[tuple, int] = {}
    for cell, c in counts.items():
        first3[cell[:3]] = first3.get(cell[:3], 0) + c
    assert chi_square_p_value(first3, exact, SAMPLES) > 1e-3
    # The naive alternative: x1..x3 from the CP joint at the prompt's last position.
    with torch.no_grad():
        hidden, _ = model.trunk_hidden(SAMPLING_PROMPT)
        log_w, log_p = model.head.draft_state(hidden[:, -1])
    joint = enumerate_joint(log_w[0], log_p[0]).exp()
    naive = {c: float(joint[c]) for c in itertools.product(range(SAMPLE_VOCAB), repeat=3)}
    tv = 0.5 * sum(abs(naive[c] - exact[c]) for c in exact)
    assert tv > 0.05  # the alternative is far enough to be detectable
    assert chi_square_p_value(first3, naive, SAMPLES) < 1e-6


def test_seeded_sampling_is_a_function_of_the_seed_whatever_the_clock(monkeypatch):
    """Two seeded calls under ``draft_tree="auto"`` give the same tokens although a perturbed
    clock makes them size their trees differently, and so do a chain and plain autoregressive
    decoding with the same seed; through ``model.generate`` after ``torch.manual_seed`` too."""
    import random
    import time

    from cpd_mtp.decoding import speculative

    model = trained_model(4, 3)
    ids, mask = left_padded([prompt_tokens(3, 5), prompt_tokens(4, 7)])
    real = time.perf_counter

    def run(clock_seed: int, **options):
        jitter = random.Random(clock_seed)
        elapsed = [0.0]

        def clock() -> float:  # every reading adds a random 0-50 ms
            elapsed[0] += jitter.uniform(0.0, 0.05)
            return real() + elapsed[0]

        monkeypatch.setattr(time, "perf_counter", clock)
        speculative._FORWARD_COSTS.pop(model, None)  # measured again under this clock
        out = generate(
            model,
            ids,
            24,
            attention_mask=mask,
            do_sample=True,
            temperature=0.9,
            generator=torch.Generator().manual_seed(7),
            **options,
        )
        monkeypatch.setattr(time, "perf_counter", real)
        return out

    first, second = run(1), run(2)
    assert first.tree_sizes != second.tree_sizes  # the clock changed the trees
    assert torch.equal(first.sequences, second.sequences)
    for options in ({"draft_tree": "chain"}, {"draft_tree": 0}, {"draft_tree": 5}):
        assert torch.equal(run(3, **options).sequences, first.sequences), options
    torch.manual_seed(5)
    via_hf = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True)
    torch.manual_seed(5)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True,
                           draft_tree=3)  # fmt: skip
    assert torch.equal(via_hf, again)


@pytest.mark.slow
def test_sampling_is_exact_on_a_padded_batch_of_two_prompts(sampling_model):
    """Rows of two prompts of different lengths, left-padded in one batch under a tree: each
    prompt's 4-token continuations follow its own exact distribution (chi-square, 12,000 rows
    each, p > 1e-3)."""
    model = sampling_model
    short, long = torch.tensor([2, 1]), SAMPLING_PROMPT[0]
    half = SAMPLES // 2
    ids, mask = left_padded([short] * half + [long] * half)
    out = generate(
        model,
        ids,
        SAMPLE_NEW,
        attention_mask=mask,
        do_sample=True,
        temperature=0.9,
        generator=torch.Generator().manual_seed(321),
        draft_tree=6,
        eos_token_id=[],
    )
    new = out.sequences[:, ids.shape[1] :].tolist()
    for prompt, rows in ((short, new[:half]), (long, new[half:])):
        counts: dict[tuple, int] = {}
        for row in rows:
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        exact = exact_continuation_distribution(model, prompt[None], SAMPLE_NEW, 0.9, None, None)
        assert chi_square_p_value(counts, exact, half) > 1e-3
    assert 0 < sum(out.accepted_counts) < sum(out.proposed_counts)


def test_captured_states_are_the_trunks_own_for_every_token_fed():
    """With trees and a padded batch, the states the decoder keeps equal a teacher-forced
    forward over each row's prompt and tokens (the drafter's training inputs, no second pass)."""
    model = trained_model(3, 2)
    ids, mask = left_padded([prompt_tokens(6, 5), prompt_tokens(7, 9)])
    out = generate(model, ids, 14, attention_mask=mask, capture_states=True, draft_tree=6)
    assert out.tokens_per_forward > 1.0  # drafts were accepted, so trees fed the states
    for row in range(2):
        real = ids[row][mask[row].bool()]
        new = out.sequences[row, ids.shape[1] : ids.shape[1] + out.new_tokens_per_row[row]]
        tokens = torch.cat([real, new])
        with torch.no_grad():
            want, _ = model.trunk_hidden(tokens[None])
        assert out.states[row].shape == (len(tokens) - 1, want.shape[-1])
        torch.testing.assert_close(out.states[row], want[0, :-1], rtol=1e-4, atol=1e-4)
    assert generate(model, ids, 4, attention_mask=mask).states is None


class RepeatRoot:
    """A source written in a few lines: guess that the root repeats."""

    name, max_depth = "repeat", 3

    def propose(self, context, limit):
        from cpd_mtp.decoding import Candidates

        depth = min(self.max_depth, limit.max_depth)
        return Candidates.chain(context.root[:, None].expand(-1, depth))


def test_a_source_of_your_own_decodes_exactly():
    """Alone and beside the CP head, greedy tokens are Hugging Face's; on periodic prompts of
    period 1 the repeat guesses are accepted."""
    from cpd_mtp.decoding import CPSource

    model = trained_model(3, 2)
    ids, mask = left_padded([prompt_tokens(5, 6), torch.full((5,), 7)])
    want = hf_greedy(model, ids, mask, 16)
    for drafter in (RepeatRoot(), [RepeatRoot(), CPSource(model.head)]):
        out = generate(model, ids, 16, attention_mask=mask, drafter=drafter)
        assert torch.equal(out.sequences, want)


def test_the_greedy_tie_rule_on_the_path_generate_takes():
    """Tokens 3 and 5 get the same W_U row, scaled up so the pair is the argmax at many steps:
    their logits tie exactly there, and the first maximum (3) must win, as in HF's loop."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4)
    base = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        base.lm_head.weight[5] = base.lm_head.weight[3]
        base.lm_head.weight[[3, 5]] *= 4.0
    model = CPDMTPForCausalLM.from_causal_lm(base, n_future=3, rank=2, next_token="base").eval()
    ids, mask = left_padded([prompt_tokens(9, 4), prompt_tokens(10, 7)])
    want = hf_greedy(model, ids, mask, 20)
    new = want[:, ids.shape[1] :]
    assert int((new == 3).sum()) >= 5 and not bool((new == 5).any())  # ties, all to 3
    for tree in ("auto", "chain", 8):
        assert torch.equal(generate(model, ids, 20, attention_mask=mask, draft_tree=tree).sequences,
                           want)  # fmt: skip


# ----------------------------------------------------------------------------- precision


@settings(max_examples=8, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    n_future=st.integers(1, 3),
    rank=st.integers(1, 3),
    chunked=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_head_decoding_log_probs_are_not_rounded_to_the_model_dtype(
    dtype, n_future, rank, chunked, seed
):
    """A bf16 / fp16 head's gate, expert and marginal log-probabilities equal a float64
    computation from the same (low-precision) h, u, W_g and W_U, to float32 accuracy: the
    logits are not rounded to the model dtype, and no float32 W_U is kept in the model."""
    import cpd_mtp.head as head_module

    torch.manual_seed(seed)
    config = tiny_llama_config(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), n_future=n_future, rank=rank
    )
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)  # logits of a few units: bf16 spacing ~0.03
        model.head.gate.weight.normal_(0.0, 0.5)
    head = model.to(dtype).eval().head
    hidden = torch.randn(5, 32).to(dtype)
    old_budget = head_module._UPCAST_CHUNK_BYTES
    head_module._UPCAST_CHUNK_BYTES = 7 * 32 * 4 if chunked else old_budget  # 7 rows a chunk
    try:
        with torch.no_grad():
            log_w = head.log_gate(hidden)
            log_p = head.expert_log_probs(hidden)
            marginal = head(hidden)
            u = head.experts(hidden)  # (5, n, r, d) in the model dtype, as the head uses it
    finally:
        head_module._UPCAST_CHUNK_BYTES = old_budget
    h64 = hidden.double()
    ref_w = torch.log_softmax(h64 @ head.gate.weight.double().T + head.gate.bias.double(), dim=-1)
    ref_p = torch.log_softmax(u.double() @ head.weight.double().T, dim=-1)
    ref_marginal = torch.logsumexp(ref_w[:, :, None] + ref_p[:, 0], dim=1)
    assert log_w.dtype == log_p.dtype == marginal.dtype == torch.float32
    # float32 accuracy (logits of ~10: a few 1e-6); a bf16 rounding of them is ~1e-2.
    torch.testing.assert_close(log_w.double(), ref_w, atol=2e-5, rtol=0)
    torch.testing.assert_close(log_p.double(), ref_p, atol=2e-5, rtol=0)
    torch.testing.assert_close(marginal.double(), ref_marginal, atol=2e-5, rtol=0)
    assert all(p.dtype == dtype for p in head.parameters())
    assert not any(b.dtype == torch.float32 for b in head.buffers())


def _llama_for_ties(dtype: torch.dtype) -> CPDMTPForCausalLM:
    """An untrained tiny Llama with a peaked, wide marginal (logits of a few tens)."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config), n_future=3, rank=2
    )
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_exactness_contract_in_low_precision(dtype):
    """30 prompts against HF greedy ``generate``. float32: identical on every prompt. bf16:
    identical, or, at the first divergence, HF's own top-2 log-probabilities there are within
    bf16 rounding of the logits (one bf16 spacing of the largest centred logit): the trunk's
    bf16 hidden states differ by rounding between a 1-token and an (m+1)-token forward."""
    model = _llama_for_ties(dtype)
    g = torch.Generator().manual_seed(1)
    eps = torch.finfo(torch.bfloat16).eps
    diverged = []
    for _ in range(30):
        length = int(torch.randint(2, 10, (1,), generator=g))
        ids = torch.randint(1, 256, (1, length), generator=g)
        ref = model.generate(
            ids,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
            speculative=False,
        )
        out = generate(model, ids, 20)
        if torch.equal(out.sequences, ref.sequences):
            continue
        assert dtype == torch.bfloat16, "float32 decoding must be identical to HF greedy"
        step = int((out.sequences[0] != ref.sequences[0]).nonzero()[0]) - length
        scores = ref.scores[step][0].double()  # HF's log-probabilities at that step
        top = scores.topk(2).values
        margin = float(top[0] - top[1])
        rounding = eps * float((scores - scores.mean()).abs().max())
        # The speculative decoder chose HF's runner-up, and the two were within rounding.
        assert int(out.sequences[0, length + step]) in scores.topk(2).indices.tolist()
        assert margin <= rounding, (step, margin, rounding)
        diverged.append(step)
    assert len(diverged) <= 5, diverged  # near-ties are rare


# ----------------------------------------------------------------------------- sliding window

WINDOW = 16


def sliding_model(arch: str, periodic) -> CPDMTPForCausalLM:
    """A tiny Mistral / Qwen2 with ``sliding_window=16`` on every layer, trained briefly on
    periodic sequences longer than the window (drafts are accepted sometimes, not always)."""
    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=WINDOW,
    )
    if arch == "mistral":
        config = MistralConfig(**shape)
    else:
        config = Qwen2Config(use_sliding_window=True, max_window_layers=0, **shape)
    model = CPDMTPForCausalLM.from_causal_lm(
        AutoModelForCausalLM.from_config(config),
        n_future=3,
        rank=2,
        loss_impl="reference",
        expert_init_noise=0.1,
    )
    return train_on_periodic(model, steps=120, seed=1)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_greedy_matches_hf_past_the_window(arch):
    """Prompt + continuation longer than the window, at batch 1 and in left-padded batches of
    3 (rows accept different numbers of drafts), token for token against HF greedy."""
    model = sliding_model(arch, periodic)
    assert model.config.text_config.sliding_window == WINDOW
    g = torch.Generator().manual_seed(0)
    proposed = accepted = 0
    for lengths in ([13], [10], [3], [10, 4, 13], [7, 12, 3], [2, 9, 5]):
        prompts = [periodic(1, n, g)[0] for n in lengths]
        if len(prompts) > 1:  # one row with a random prompt: other acceptance counts
            prompts[1] = torch.randint(1, VOCAB, (lengths[1],), generator=g)
        ids, mask = left_padded(prompts)
        new = 2 * WINDOW + 4 - min(lengths)
        out = generate(model, ids, new, attention_mask=mask)
        assert torch.equal(out.sequences, hf_greedy(model, ids, mask, new)), lengths
        proposed += sum(out.proposed_counts)
        accepted += sum(out.accepted_counts)
    assert 0 < accepted < proposed
