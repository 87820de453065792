"""The lossy-decoding benchmark's quality measures against independent references."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_lossy


def test_arithmetic_questions_are_seeded_and_answered_by_their_sum():
    questions = bench_lossy.arithmetic_questions(20)
    assert questions == bench_lossy.arithmetic_questions(20)
    assert questions != bench_lossy.arithmetic_questions(20, seed=1)
    for text, answer in questions:
        a, b = (int(x) for x in text.split("What is ")[1].split("?")[0].split(" + "))
        assert answer == a + b and 2 <= a <= 19 and 2 <= b <= 19


def test_is_correct_reads_the_answer_after_the_equals_sign():
    assert bench_lossy.is_correct("The answer is 42.", 42)
    assert bench_lossy.is_correct("42", 42)
    assert bench_lossy.is_correct("7 + 5 = 12.", 12)
    assert not bench_lossy.is_correct("7 + 7 = 12, but 14", 14)
    assert not bench_lossy.is_correct("41, not 42", 42)
    assert not bench_lossy.is_correct("forty-two", 42)


def test_mean_log_likelihood_equals_cross_entropy(tiny_llama_config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=50)).eval()
    sequence = torch.randint(0, 50, (12,))
    got = bench_lossy.mean_log_likelihood(model, sequence, prompt_length=5)
    with torch.no_grad():
        logits = model(sequence[None]).logits[0]
    want = -torch.nn.functional.cross_entropy(logits[4:-1], sequence[5:])
    assert abs(got - float(want)) < 1e-5
    assert bench_lossy.mean_log_likelihood(model, sequence, prompt_length=12) == 0.0
