"""What a drafting head adds: its decoder against the alternatives that need no training.

``measure_decoders`` decodes every prompt (greedy, batch 1, the model's EOS) with each decoder,
in an order that rotates from prompt to prompt so a warm cache or a drift favours none, and
reports per kind of prompt (chat, code):

- ``hf``: the original model's own Hugging Face ``generate``;
- ``hf_packed``: the same inside ``few_row_linears`` (the packed oneDNN layout this decoder's
  forwards use: a speedup that needs no training);
- ``hf_lookup``: Hugging Face prompt lookup (``prompt_lookup_num_tokens=10``) in that layout;
- ``context``: this decoder with context drafts only (no head);
- ``cp``: this decoder with the head's drafts only (optional);
- ``default``: ``model.generate(ids, max_new_tokens=..., do_sample=False)`` as a user calls it
  (this decoder with the head's tree and context drafts).

The **best zero-training alternative** of a prompt is the fastest of ``hf_packed``,
``hf_lookup`` and ``context`` on it; the headline is the default decoder's speedup over it, a
median over prompts with its 20th-80th percentile spread (``trusted`` when that spread is
within 25 % of the median). Every decoder's tokens are compared with ``hf``'s.

Used at the end of ``cpd-mtp retrofit``, by ``cpd-mtp measure``, the demo and the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cpd_mtp.decoding.output import format_rates, json_rates
from cpd_mtp.decoding.sources import ContextSource, CPSource
from cpd_mtp.decoding.speculative import generate
from cpd_mtp.decoding.stats import DecodingStats
from cpd_mtp.utils.stats import percentiles

__all__ = [
    "DECODERS",
    "ZERO_TRAINING",
    "decoder_call",
    "format_report",
    "head_adds_nothing",
    "measure_decoders",
    "summarise_speedup",
]

DECODERS = ("hf", "hf_packed", "hf_lookup", "context", "cp", "default")
ZERO_TRAINING = ("hf_packed", "hf_lookup", "context")
DESCRIPTIONS = {
    "hf": "HF greedy generate (the original model)",
    "hf_packed": "HF greedy, packed oneDNN layout",
    "hf_lookup": "HF prompt lookup, packed layout",
    "context": "this decoder, context drafts only (no head)",
    "cp": "this decoder, the head's drafts only",
    "default": "this decoder, default (head + context drafts)",
}
# A speedup whose 20th-80th percentile range is wider than this fraction of its median is
# reported as too noisy to trust.
TRUSTED_SPREAD = 0.25
PROMPT_LOOKUP_TOKENS = 10


def summarise_speedup(ratios: Sequence[float]) -> dict[str, Any]:
    """Median, p20, p80 and count of per-prompt speedups (``percentiles``), with ``trusted``:
    whether the p20-p80 range is within ``TRUSTED_SPREAD`` of the median."""
    summary: dict[str, Any] = percentiles(list(ratios))
    summary["median"] = summary.pop("p50")
    summary["trusted"] = (summary["p80"] - summary["p20"]) <= TRUSTED_SPREAD * summary["median"]
    return summary


def decoder_call(name: str, model: Any, original: Any, max_new_tokens: int) -> Callable:
    """A function of (1, T) ids -> (sequences, stats or None) for decoder ``name`` (one of
    :data:`DECODERS`), decoding ``max_new_tokens`` greedily with the model's EOS."""
    from cpd_mtp.ops.few_rows import few_row_linears

    config = model.generation_config

    def hf(ids: torch.Tensor, **extra: Any):
        out = original.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=config.pad_token_id,
            eos_token_id=config.eos_token_id,
            **extra,
        )
        return out, None

    def packed(ids: torch.Tensor, **extra: Any):
        with few_row_linears(original):
            return hf(ids, **extra)

    def ours(ids: torch.Tensor, **options: Any):
        out = generate(model, ids, max_new_tokens, **options)
        return out.sequences, out.stats

    def as_users_call_it(ids: torch.Tensor):
        # model.generate, greedy, the model's own EOS: what a user's call runs.
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return out, model.last_generation_stats.stats

    return {
        "hf": hf,
        "hf_packed": packed,
        "hf_lookup": lambda ids: packed(ids, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS),
        "context": lambda ids: ours(ids, drafter=ContextSource(PROMPT_LOOKUP_TOKENS)),
        "cp": lambda ids: ours(ids, drafter=CPSource(model.head)),
        "default": as_users_call_it,
    }[name]


@torch.no_grad()
def measure_decoders(
    model: Any,
    original: Any,
    prompts: dict[str, Sequence[torch.Tensor]],
    max_new_tokens: int,
    *,
    decoders: Sequence[str] = ("hf", "hf_packed", "hf_lookup", "context", "default"),
    repeats: int = 1,
    deadline: float | None = None,
    progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    deadline_clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Every decoder on every prompt, interleaved; the speedups of ``default``.

    Args:
        model: the retrofitted ``CPDMTPForCausalLM`` (base mode), in eval mode.
        original: the original causal LM (the same weights without the head), in eval mode.
        prompts: per kind (``"chat"``, ``"code"``), 1-D token-id tensors.
        max_new_tokens: new tokens per prompt (fewer when the model emits EOS).
        decoders: which of :data:`DECODERS` (``hf`` and ``default`` are always run).
        repeats: passes over the prompts (each prompt's ratio is one sample per pass).
        deadline: a ``deadline_clock()`` value after which no new prompt starts (every kind
            keeps at least one prompt).
        progress: called with one line after each prompt.
        clock: the timer of each decode.
        deadline_clock: what ``deadline`` is read against (a test gives its own).

    Returns:
        ``{"kinds": {kind: {...}}, "identical": bool, "decoders": [...]}``; each kind holds
        ``prompts``, per decoder ``s_per_token`` (and for this decoder's variants
        ``tokens_per_forward``, ``acceptance_per_position``), ``identical`` (tokens equal to
        ``hf``'s), and the ``default`` decoder's ``speedup`` over every other decoder and
        ``vs_best_zero_training`` (``summarise_speedup`` of per-prompt ratios), with
        ``best_zero_training``: how often each alternative was the fastest.
    """
    names = [d for d in DECODERS if d in set(decoders) | {"hf", "default"}]
    unknown = set(decoders) - set(DECODERS)
    if unknown:
        raise ValueError(f"unknown decoders {sorted(unknown)}; choose from {DECODERS}")
    runs = {name: decoder_call(name, model, original, max_new_tokens) for name in names}
    first = next(iter(p for kind in prompts.values() for p in kind), None)
    if first is None:
        raise ValueError("no prompt to measure on")
    for name in names:  # untimed: one-time costs (allocations, the forward-cost probe)
        runs[name](first[None])
    result: dict[str, Any] = {"kinds": {}, "identical": True, "decoders": names}
    count = 0
    for kind, kind_prompts in prompts.items():
        seconds = {name: [] for name in names}
        tokens: list[int] = []
        stats: dict[str, list[DecodingStats]] = {name: [] for name in names}
        identical = {name: True for name in names}
        done = 0
        for repeat in range(repeats):
            for i, prompt in enumerate(kind_prompts):
                late = deadline is not None and deadline_clock() > deadline
                if late and done > 0:
                    break
                ids = prompt[None]
                order = names[count % len(names) :] + names[: count % len(names)]
                outputs = {}
                for name in order:
                    start = clock()
                    outputs[name] = runs[name](ids)
                    seconds[name].append(clock() - start)
                reference = outputs["hf"][0]
                tokens.append(int(reference.shape[1] - ids.shape[1]))
                for name in names:
                    sequences, stat = outputs[name]
                    identical[name] &= bool(torch.equal(sequences, reference))
                    if stat is not None:
                        stats[name].append(stat)
                done += 1
                count += 1
                if progress is not None:
                    took = sum(s[-1] for s in seconds.values())
                    ratio = min(seconds[z][-1] for z in ZERO_TRAINING if z in seconds)
                    ratio = (
                        ratio / seconds["default"][-1]
                        if any(z in seconds for z in ZERO_TRAINING)
                        else None
                    )
                    shown = "" if ratio is None else f", {ratio:.2f}x the best zero-training"
                    progress(
                        f"measure {kind} {i + 1}/{len(kind_prompts)}"
                        + (f" (pass {repeat + 1})" if repeats > 1 else "")
                        + f": {tokens[-1]} tokens, {took:.1f} s{shown}"
                    )
        result["kinds"][kind] = _summarise(names, seconds, tokens, stats, identical, done)
        result["identical"] &= all(identical.values())
    return result


def _summarise(names, seconds, tokens, stats, identical, done) -> dict[str, Any]:
    total_tokens = max(sum(tokens), 1)
    summary: dict[str, Any] = {"prompts": done, "new_tokens": sum(tokens), "decoders": {}}
    for name in names:
        entry: dict[str, Any] = {
            "s_per_token": sum(seconds[name]) / total_tokens,
            "identical": identical[name],
        }
        if stats[name]:
            combined = DecodingStats.combine(stats[name])
            entry["tokens_per_forward"] = combined.tokens_per_forward
            entry["acceptance_per_position"] = json_rates(combined.acceptance_rate)
        summary["decoders"][name] = entry
    default = seconds["default"]
    summary["speedup"] = {
        name: summarise_speedup([a / b for a, b in zip(seconds[name], default)])
        for name in names
        if name != "default"
    }
    alternatives = [z for z in ZERO_TRAINING if z in names]
    if alternatives:
        best = [min(seconds[z][i] for z in alternatives) for i in range(len(default))]
        summary["vs_best_zero_training"] = summarise_speedup([b / d for b, d in zip(best, default)])
        winners = [min(alternatives, key=lambda z, i=i: seconds[z][i]) for i in range(len(default))]
        summary["best_zero_training"] = {z: winners.count(z) for z in alternatives}
    return summary


def format_report(measured: dict[str, Any], max_new_tokens: int) -> str:
    """``measure_decoders``'s result as the lines a person reads."""
    lines = [
        "",
        f"== decoding speed, greedy, batch 1, {max_new_tokens} new tokens at most per prompt ==",
    ]
    for kind, summary in measured["kinds"].items():
        lines.append(f"-- {kind}: {summary['prompts']} held-out prompts --")
        for name, entry in summary["decoders"].items():
            tpf = entry.get("tokens_per_forward")
            speed = summary["speedup"].get(name)
            shown = f"  {DESCRIPTIONS[name]:<46} {entry['s_per_token'] * 1e3:6.1f} ms/token"
            if tpf is not None:
                shown += f", {tpf:.2f} tokens/forward"
            if speed is not None:
                shown += f"; default is {speed['median']:.2f}x this"
            lines.append(shown)
        best = summary.get("vs_best_zero_training")
        if best is not None:
            trust = "" if best["trusted"] else " (spread too wide to trust: machine busy?)"
            lines.append(
                f"  default over the best zero-training alternative (per prompt the fastest of "
                f"HF packed, HF prompt lookup, context drafts): {best['median']:.2f}x median, "
                f"p20 {best['p20']:.2f}x, p80 {best['p80']:.2f}x{trust}"
            )
        rates = summary["decoders"]["default"].get("acceptance_per_position")
        if rates:
            lines.append(
                f"  acceptance by draft depth (depth 1: the first draft after the model's own "
                f"token; context drafts reach {PROMPT_LOOKUP_TOKENS} deep): "
                f"{format_rates(rates[:6], sep=' ')}"
            )
    lines.append(
        f"identical tokens to the original model: {'yes' if measured['identical'] else 'NO'}"
    )
    return "\n".join(lines)


def head_adds_nothing(measured: dict[str, Any]) -> str | None:
    """A plain-words warning when, on some kind of prompt, the default decoder is no faster than
    the best alternative that needs no training; else None."""
    slow = {
        kind: summary["vs_best_zero_training"]["median"]
        for kind, summary in measured["kinds"].items()
        if "vs_best_zero_training" in summary and summary["vs_best_zero_training"]["median"] < 1.0
    }
    if not slow:
        return None
    where = ", ".join(f"{kind} {value:.2f}x" for kind, value in slow.items())
    return (
        f"warning: the head adds nothing here: with it, decoding is {where} the best alternative "
        "that needs no training (HF prompt lookup, or this decoder with context drafts only). "
        "Give the retrofit more minutes (--minutes) or prompts like the ones you decode "
        "(--prompts); meanwhile cpd_mtp.generate(model, ids, n, drafter=ContextSource()) decodes "
        "with context drafts only."
    )
