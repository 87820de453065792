"""How much faster a retrofitted model decodes than the original, on the same prompts.

``measure_retrofit`` decodes each prompt with self-speculative decoding of the retrofitted model
(``cpd_mtp.decoding.generate``) and with the *original* model's own Hugging Face ``generate``,
alternating which goes first, and reports:

- greedy: tokens per forward, acceptance per draft depth, whether every sequence was
  identical to the original model's, and the wall-clock speedup per prompt (original seconds /
  speculative seconds for the same tokens) as a median with its 20th-80th percentile spread;
  with ``baselines``, also the speedup over the best zero-training alternative measured in
  the same run, prompt by prompt: the faster of Hugging Face greedy in the packed oneDNN
  layout (``few_row_linears``) and Hugging Face prompt lookup in that layout;
- sampled (temperature T, no top-k / top-p): tokens per forward and acceptance per position
  (their distribution is the original model's; the wall clock of the draws is not compared).

Used by ``cpd-mtp retrofit`` (at the end of a run), ``cpd-mtp measure``, the demo and the
retrofit study.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from cpd_mtp.decoding import DecodingStats, generate
from cpd_mtp.utils.stats import percentiles

__all__ = ["format_report", "measure_retrofit", "slower_warning", "summarise_speedup"]

# A speedup whose 20th-80th percentile range is wider than this fraction of its median is
# reported as too noisy to trust.
TRUSTED_SPREAD = 0.25


def summarise_speedup(ratios: Sequence[float]) -> dict[str, Any]:
    """Median, p20, p80 and count of per-prompt speedups (``percentiles``), with ``trusted``:
    whether the p20-p80 range is within ``TRUSTED_SPREAD`` of the median."""
    summary: dict[str, Any] = percentiles(list(ratios))
    summary["median"] = summary.pop("p50")
    summary["trusted"] = (summary["p80"] - summary["p20"]) <= TRUSTED_SPREAD * summary["median"]
    return summary


def _timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@torch.no_grad()
def measure_retrofit(
    model: Any,
    original: Any,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float | None = 0.7,
    repeats: int = 1,
    seed: int = 0,
    baselines: bool = True,
    draft_tree: str | int = "auto",
) -> dict[str, Any]:
    """Speculative decoding of ``model`` against ``original.generate``, prompt by prompt.

    Args:
        model: the retrofitted ``CPDMTPForCausalLM`` (base mode), in eval mode.
        original: the original causal LM (the same weights without the head), in eval mode.
        prompts: 1-D token-id tensors.
        max_new_tokens: new tokens per prompt (fewer when the model emits EOS; both decoders
            stop at the model's EOS).
        temperature: also sample at this temperature (tokens per forward and acceptance only);
            None: greedy only.
        repeats: greedy passes over the prompts (each prompt's speedup is one sample per pass).
        seed: sampling seed of prompt i is ``seed + i``.
        baselines: also time the zero-training alternatives (module docstring).
        draft_tree: the decoder's ``draft_tree`` (``"auto"``, ``"chain"`` or a node count).

    Returns:
        ``{"greedy": {...}, "sampled": {...}}`` (``sampled`` absent without a temperature):
        ``tokens_per_forward``, ``acceptance_per_position``, ``expected_tokens_per_step``,
        ``new_tokens``; greedy also ``identical``, ``speedup`` (``summarise_speedup`` of the
        per-prompt ratios), ``total_speedup`` (summed original seconds / summed speculative
        seconds), ``spec_s_per_token`` and ``hf_s_per_token``; with ``baselines`` also
        ``speedup_over_best_baseline`` and ``best_baseline_s_per_token``.
    """
    from cpd_mtp.ops.few_rows import few_row_linears

    # Untimed first calls: one-time set-up costs (allocations, lazy imports) favour neither.
    generate(model, prompts[0][None], 2, draft_tree=draft_tree)
    original.generate(prompts[0][None], max_new_tokens=2, do_sample=False)
    greedy_stats: list[DecodingStats] = []
    ratios: list[float] = []
    best_ratios: list[float] = []
    spec_total = hf_total = best_total = 0.0
    identical = True
    for repeat in range(repeats):
        for i, prompt in enumerate(prompts):
            ids = prompt[None]

            def spec(ids=ids):
                return generate(model, ids, max_new_tokens, draft_tree=draft_tree)

            def hf(ids=ids, **extra):
                return original.generate(
                    ids,
                    **extra,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    repetition_penalty=1.0,
                    pad_token_id=model.generation_config.pad_token_id,
                    eos_token_id=model.generation_config.eos_token_id,
                )

            # Alternate the order so a warm cache or a drift favours neither decoder.
            if (i + repeat) % 2 == 0:
                spec_s, out = _timed(spec)
                hf_s, hf_ids = _timed(hf)
            else:
                hf_s, hf_ids = _timed(hf)
                spec_s, out = _timed(spec)
            identical &= torch.equal(out.sequences, hf_ids)
            greedy_stats.append(out.stats)
            ratios.append(hf_s / spec_s)
            if baselines:  # the zero-training alternatives, in the layout the decoder uses
                with few_row_linears(original):
                    fast_s, _ = _timed(hf)
                    lookup_s, _ = _timed(lambda hf=hf: hf(prompt_lookup_num_tokens=10))
                best = min(fast_s, lookup_s)
                best_ratios.append(best / spec_s)
                best_total += best
            spec_total, hf_total = spec_total + spec_s, hf_total + hf_s
    greedy = DecodingStats.combine(greedy_stats)
    result: dict[str, Any] = {
        "greedy": {
            **_rates(greedy),
            "identical": identical,
            "speedup": summarise_speedup(ratios),
            "total_speedup": hf_total / spec_total,
            "spec_s_per_token": spec_total / max(greedy.new_tokens, 1),
            "hf_s_per_token": hf_total / max(greedy.new_tokens, 1),
        }
    }
    if baselines:
        result["greedy"]["speedup_over_best_baseline"] = summarise_speedup(best_ratios)
        result["greedy"]["best_baseline_s_per_token"] = best_total / max(greedy.new_tokens, 1)
    if temperature is not None:
        sampled = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device=prompt.device).manual_seed(seed + i)
            out = generate(
                model,
                prompt[None],
                max_new_tokens,
                do_sample=True,
                temperature=temperature,
                generator=generator,
                draft_tree=draft_tree,
            )
            sampled.append(out.stats)
        result["sampled"] = {"temperature": temperature, **_rates(DecodingStats.combine(sampled))}
    return result


def _rates(stats: DecodingStats) -> dict[str, Any]:
    # A position never verified has no rate: None (JSON null), not NaN.
    from cpd_mtp.decoding.output import json_rates

    rates = json_rates(stats.acceptance_rate)
    return {
        "tokens_per_forward": stats.tokens_per_forward,
        "acceptance_per_position": rates,
        "expected_tokens_per_step": stats.expected_tokens_per_step,
        "new_tokens": stats.new_tokens,
    }


def format_report(measured: dict[str, Any], prompts: int, new_tokens: int, repeats: int) -> str:
    """``measure_retrofit``'s result as the lines a person reads (what the demo prints)."""
    from cpd_mtp.decoding.output import format_rates

    greedy = measured["greedy"]
    speed = greedy["speedup"]
    rates = format_rates(greedy["acceptance_per_position"], sep="  ")
    lines = [
        "",
        "== speculative decoding vs the original model's HF generate (greedy, batch 1) ==",
        f"{prompts} held-out prompts x {new_tokens} new tokens, {repeats} interleaved passes",
        f"tokens per forward            {greedy['tokens_per_forward']:.2f}",
        f"acceptance per draft depth    {rates}",
        f"time per token                speculative {greedy['spec_s_per_token'] * 1e3:.1f} ms, "
        f"HF generate {greedy['hf_s_per_token'] * 1e3:.1f} ms",
        f"speedup over HF generate      {speed['median']:.2f}x median over prompts "
        f"(p20 {speed['p20']:.2f}x, p80 {speed['p80']:.2f}x, n={speed['n']}); "
        f"total time {greedy['total_speedup']:.2f}x",
    ]
    if not speed["trusted"]:
        lines.append(
            "                              a wide spread (p20-p80 beyond 25 % of the median): "
            "the prompts differ, or the machine is busy"
        )
    best = greedy.get("speedup_over_best_baseline")
    if best is not None:
        lines.append(
            f"speedup over the best zero-training alternative {best['median']:.2f}x "
            f"(p20 {best['p20']:.2f}x, p80 {best['p80']:.2f}x): per prompt the faster of HF "
            "greedy and HF prompt lookup, both in the packed oneDNN layout this decoder uses"
        )
    lines.append(f"identical tokens to HF        {'yes' if greedy['identical'] else 'NO'}")
    if "sampled" in measured:
        sampled = measured["sampled"]
        lines.append(
            f"sampled at T={sampled['temperature']:g}: {sampled['tokens_per_forward']:.2f} tokens "
            "per forward (distributed exactly as the original model's sampling)"
        )
    return "\n".join(lines)


def slower_warning(measured: dict[str, Any]) -> str | None:
    """A plain-words warning when the head makes greedy decoding slower than the original
    model's own ``generate`` (median over prompts below 1x), with what to change; else None."""
    greedy = measured["greedy"]
    speed = greedy["speedup"]
    if speed["median"] >= 1.0:
        return None
    return (
        f"warning: this head makes decoding SLOWER: {greedy['tokens_per_forward']:.2f} tokens "
        f"per forward, {speed['median']:.2f}x the original model's speed (p20 "
        f"{speed['p20']:.2f}x, p80 {speed['p80']:.2f}x). A draft is worth its cost only when "
        "it is accepted often: train on more tokens (--tokens), on the model's own "
        "continuations (--distill generated), over a draft vocabulary (--draft-vocab 4096); "
        "until then decode without the head (model.generate(..., speculative=False))."
    )
