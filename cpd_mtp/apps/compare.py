"""Self-speculative vs autoregressive decoding of the same prompts: a timing comparison.

Used by the demo, the rank study and ``benchmarks/bench_decode.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cpd_mtp.decoding import (
    DecodingStats,
    GenerationOutput,
    autoregressive_generate,
    generate,
    left_pad,
)

__all__ = ["compare_decoding"]


def _timed(
    fn: Callable[[], list[GenerationOutput]], device: torch.device
) -> tuple[float, list[GenerationOutput]]:
    """Wall-clock seconds of ``fn()`` (CUDA synchronised before and after) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    outputs = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, outputs


def compare_decoding(
    model: Any,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    batch_size: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    draft_tree: int | str | None = "chain",
) -> dict[str, Any]:
    """Self-speculative vs autoregressive (HF ``generate``) decoding of the same prompts.

    One *run* decodes every prompt, ``batch_size`` at a time (left-padded), once with
    ``cpd_mtp.decoding.generate`` and once with ``autoregressive_generate``; runs of the two
    alternate, after ``warmup`` untimed ones. Call it with the model in eval mode.

    Args:
        prompts: 1-D token-id tensors on the model's device.
        repeats: timed runs of each decoder.
        seed: sampling seed of run i is ``seed + i`` (the speculative decoder's generator and
            torch's global RNG for HF ``generate``).
        draft_tree: the speculative decoder's tree (``"chain"`` by default: the head's own
            drafts per offset, the acceptance the rank study compares).

    Returns:
        A dict: ``spec_time_s`` and ``ar_time_s`` (per-run seconds), ``new_tokens`` (per
        speculative run; AR decodes the same count unless EOS differs), ``ar_new_tokens``,
        ``tokens_per_forward`` (per run), ``proposed_counts`` / ``accepted_counts`` /
        ``acceptance_rate`` (summed over the timed runs), ``expected_tokens_per_step``,
        ``speedup`` (median AR time / median speculative time) and, when greedy,
        ``identical`` (whether every run gave the same ids as HF ``generate``).
    """
    device = prompts[0].device
    batches = [
        left_pad(prompts[i : i + batch_size], pad_token_id)
        for i in range(0, len(prompts), batch_size)
    ]
    options = {
        "do_sample": do_sample,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }

    def spec_run(run: int) -> list[GenerationOutput]:
        gen = torch.Generator(device=device).manual_seed(seed + run)
        return [
            generate(
                model,
                ids,
                max_new_tokens,
                attention_mask=mask,
                generator=gen,
                draft_tree=draft_tree,
                **options,
            )
            for ids, mask in batches
        ]

    def ar_run(run: int) -> list[GenerationOutput]:
        torch.manual_seed(seed + run)
        return [
            autoregressive_generate(model, ids, max_new_tokens, attention_mask=mask, **options)
            for ids, mask in batches
        ]

    for i in range(warmup):
        spec_run(-1 - i)
        ar_run(-1 - i)
    result: dict[str, Any] = {
        "spec_time_s": [],
        "ar_time_s": [],
        "new_tokens": [],
        "ar_new_tokens": [],
        "tokens_per_forward": [],
    }
    runs: list[DecodingStats] = []
    identical = True
    for run in range(repeats):
        spec_s, spec = _timed(lambda run=run: spec_run(run), device)
        ar_s, ar = _timed(lambda run=run: ar_run(run), device)
        spec_stats = DecodingStats.combine(out.stats for out in spec)
        runs.append(spec_stats)
        result["spec_time_s"].append(spec_s)
        result["ar_time_s"].append(ar_s)
        result["new_tokens"].append(spec_stats.new_tokens)
        result["ar_new_tokens"].append(sum(out.new_tokens for out in ar))
        result["tokens_per_forward"].append(spec_stats.tokens_per_forward)
        if not do_sample:
            identical &= all(torch.equal(s.sequences, a.sequences) for s, a in zip(spec, ar))
    total = DecodingStats.combine(runs)
    result |= {
        "proposed_counts": total.proposed_counts,
        "accepted_counts": total.accepted_counts,
        "acceptance_rate": total.acceptance_rate,
        "expected_tokens_per_step": total.expected_tokens_per_step,
        "speedup": _median(result["ar_time_s"]) / _median(result["spec_time_s"]),
    }
    if not do_sample:
        result["identical"] = identical
    return result


def _median(values: list[float]) -> float:
    """The upper median (the middle of an odd count), as the benchmark has always reported."""
    return sorted(values)[len(values) // 2]
