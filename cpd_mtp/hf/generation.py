"""``model.generate`` decodes speculatively whenever the request allows it exactly.

``SpeculativeGenerationMixin.generate`` (a base of ``CPDMTPForCausalLM``) resolves a call as
Hugging Face ``generate`` does (``generation_config`` and keyword arguments over the model's
generation config, EOS / pad, ``max_length`` / ``max_new_tokens`` / ``min_new_tokens``, the
logits processors and stopping criteria it would build) and then:

- runs ``cpd_mtp.decoding.generate`` (self-speculative decoding) when that yields what
  Hugging Face's loop yields: greedy search (the same tokens), or sampling whose processors are
  score-only warpers (temperature, top-k, top-p, min-p, typical, epsilon, eta: the same
  distribution), any batch size, left padding through ``attention_mask``, ``streamer``,
  ``stopping_criteria`` and ``stop_strings`` (checked token by token), ``min_new_tokens``,
  ``num_return_sequences`` when sampling, and ``return_dict_in_generate`` without scores;
- falls back to Hugging Face's own loop otherwise (beam search, ``repetition_penalty`` and the
  other processors that read the ids so far, scores / logits / attentions in the output,
  assistant models, ``inputs_embeds``, a cache passed in, right padding, ...), with a
  ``WARNING`` of the ``cpd_mtp.hf.generation`` logger naming the reason, once per reason and
  process (as transformers warns); turning speculation off yourself is logged at ``INFO``.

Draft trees: ``generate(..., draft_tree=...)`` (``"auto"`` by default, ``"chain"``, or the most
draft nodes), also read from ``generation_config.draft_tree``; ``context_drafts`` and Hugging
Face's ``prompt_lookup_num_tokens`` add prompt-lookup branches to the tree (the speculative
decoder serves them, instead of Hugging Face's assisted loop).

Lossy decoding: ``acceptance="typical"`` or ``"confident"`` and their thresholds
(``cpd_mtp.decoding.acceptance``), as keyword arguments or ``generation_config`` attributes. A
call that would run Hugging Face's loop (``speculative=False``, beam search, ...) with a lossy
rule is refused with a one-line ``ValueError``, never decoded exactly in silence.

The switch: ``generate(..., speculative=False)``, or ``model.generation_config.speculative =
False`` (saved with the generation config; a ``generation_config`` passed to the call may set it
too). ``model.last_generation_stats`` holds the ``GenerationOutput`` statistics of the last
speculative call (None after a fallback); with ``return_dict_in_generate=True`` they are also
the ``stats`` of the returned ``CPDMTPGenerateOutput``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from cpd_mtp.decoding.inputs import SCORE_ONLY_WARPERS, is_left_padding
from cpd_mtp.decoding.options import ACCEPTANCE_OPTIONS, DraftOptions
from cpd_mtp.decoding.output import GenerationOutput
from cpd_mtp.hf.compat import generation_steps, special_token_tensors

__all__ = ["CPDMTPGenerateOutput", "SpeculativeGenerationMixin"]

logger = logging.getLogger(__name__)
# Reasons already warned about: each fallback warns once per process, as transformers does.
_WARNED_REASONS: set[str] = set()
# Fallbacks the caller asked for: no warning.
_CHOSEN = ("speculative=False", "generation_config.speculative is False")

# Model inputs the speculative decoder takes (the rest go to Hugging Face's loop).
_SERVED_MODEL_KWARGS = {"attention_mask", "use_cache"}
_MIN_LENGTH = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)
# The speculative decoder's own options (``cpd_mtp.decoding.options``), never passed to HF.
_OPTION_NAMES = ("draft_tree", "context_drafts", "draft_positions", *ACCEPTANCE_OPTIONS)


@dataclass
class CPDMTPGenerateOutput(GenerateDecoderOnlyOutput):
    """Hugging Face's ``GenerateDecoderOnlyOutput`` of a speculative call, plus its statistics.

    Attributes:
        sequences: (B, T + L) prompt and new tokens.
        stats: the ``GenerationOutput`` of the speculative decoder (forwards, tokens per
            forward, acceptance per draft position, wall time; ``summary()`` as a dict).
    """

    stats: GenerationOutput | None = None


@dataclass
class _Request:
    """What ``cpd_mtp.decoding.generate`` needs for one call."""

    input_ids: torch.Tensor
    kwargs: dict[str, Any]
    return_dict: bool


class SpeculativeGenerationMixin:
    """Gives ``generate`` the speculative path; the rest of ``GenerationMixin`` is unchanged."""

    last_generation_stats: GenerationOutput | None = None

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn: Any | None = None,
        synced_gpus: bool | None = None,
        assistant_model: Any | None = None,
        streamer: Any | None = None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        custom_generate: Any | None = None,
        speculative: bool | None = None,
        **kwargs: Any,
    ) -> GenerateDecoderOnlyOutput | torch.LongTensor:
        """Hugging Face ``generate``, decoded speculatively when that is exact (module doc).

        Takes the arguments of ``transformers.GenerationMixin.generate``, plus:

        Args:
            speculative: False runs Hugging Face's own loop; None (default) takes
                ``generation_config.speculative`` (default True).
            **kwargs: as Hugging Face's, plus ``draft_tree`` (``"auto"``, ``"chain"`` or the
                most draft nodes per forward, see ``cpd_mtp.decoding.generate``; None takes
                ``generation_config.draft_tree``) and ``context_drafts`` (prompt-lookup
                branches: True, False or their longest length; ``prompt_lookup_num_tokens``
                sets it too), and the opt-in lossy ``acceptance`` (``"typical"``,
                ``"confident"``) with ``typical_epsilon``, ``typical_delta``, ``confidence``,
                ``accept_verified`` (``cpd_mtp.decoding.acceptance``).

        Returns:
            (B, T + L) sequences, or with ``return_dict_in_generate`` a
            ``CPDMTPGenerateOutput`` (``.sequences``, ``.stats``) from the speculative path and
            Hugging Face's output from its loop. The statistics of a speculative call are also
            ``model.last_generation_stats``.
        """
        hf_arguments = {
            "inputs": inputs,
            "generation_config": generation_config,
            "logits_processor": logits_processor,
            "stopping_criteria": stopping_criteria,
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn,
            "synced_gpus": synced_gpus,
            "assistant_model": assistant_model,
            "streamer": streamer,
            "negative_prompt_ids": negative_prompt_ids,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
            "custom_generate": custom_generate,
        }
        self.last_generation_stats = None
        # This decoder's own options, checked whichever loop then runs the call.
        options = {name: kwargs.pop(name, None) for name in _OPTION_NAMES}
        configs = (generation_config, getattr(self, "generation_config", None))
        parsed = DraftOptions.parse(
            **{
                name: next(
                    (
                        v
                        for v in (value, *(getattr(c, name, None) for c in configs))
                        if v is not None
                    ),
                    None,
                )
                for name, value in options.items()
            }
        )
        _check_prompt(inputs if inputs is not None else kwargs.get("input_ids"))
        request = _plan(self, speculative, hf_arguments, dict(kwargs), options)
        if isinstance(request, str):
            if parsed.acceptance.rule != "exact":
                # A lossy rule is never dropped silently: Hugging Face's loop is exact.
                raise ValueError(
                    f"acceptance={parsed.acceptance.rule!r} needs the speculative decoder, but "
                    f"this call runs Hugging Face's loop ({request})"
                )
            _log_fallback(request)
            return super().generate(**hf_arguments, **kwargs)  # type: ignore[misc]

        from cpd_mtp.decoding.speculative import generate as speculative_generate

        out = speculative_generate(self, request.input_ids, **request.kwargs)
        self.last_generation_stats = out
        if request.return_dict:
            return CPDMTPGenerateOutput(sequences=out.sequences, stats=out)
        return out.sequences


def _check_prompt(input_ids: Any) -> None:
    """One-line errors for prompts neither loop can decode (HF's would fail deep inside)."""
    if input_ids is None:
        return
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"input_ids must be a (B, T) torch.LongTensor, got {type(input_ids).__name__}: "
            "tokenize with return_tensors='pt'"
        )
    if input_ids.dim() == 2 and input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids holds no token (shape {tuple(input_ids.shape)}): give at least one, "
            "such as the tokenizer's BOS token"
        )


def _log_fallback(reason: str) -> None:
    """Say why Hugging Face's (slower, one forward per token) loop runs this call."""
    message = "CPDMTPForCausalLM.generate runs Hugging Face's loop, one forward per token: %s"
    if reason in _CHOSEN:
        logger.info(message, reason)
    elif reason not in _WARNED_REASONS:
        _WARNED_REASONS.add(reason)
        logger.warning(message, reason)


def _plan(
    model: Any,
    speculative: bool | None,
    hf_arguments: dict[str, Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> _Request | str:
    """The speculative decoder's arguments for this call, or why Hugging Face's loop runs it."""
    if speculative is not None and not isinstance(speculative, bool):
        raise ValueError(f"speculative must be True, False or None, got {speculative!r}")
    if speculative is False:
        return "speculative=False"
    for name in (
        "logits_processor",
        "prefix_allowed_tokens_fn",
        "synced_gpus",
        "assistant_model",
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
        "custom_generate",
    ):
        value = hf_arguments[name]
        if value is not None and value is not False and not (isinstance(value, list) and not value):
            return f"{name} is not served by the speculative decoder"
    tokenizer = kwargs.pop("tokenizer", None)
    kwargs.pop("assistant_tokenizer", None)
    input_ids = hf_arguments["inputs"]
    if input_ids is None:
        input_ids = kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return "the speculative decoder needs (B, T) input_ids with T >= 1"

    # Has the caller (or either generation config) set the lengths? As Hugging Face decides.
    given = hf_arguments["generation_config"]
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (given is None or given.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (given is None or given.min_length is None)
        and model.generation_config.min_length is None
    )
    config, model_kwargs = generation_steps.config(model, given, kwargs)
    if getattr(config, "speculative", True) is False:
        return "generation_config.speculative is False"
    # The call's options over the generation config's (saved with it), checked once more.
    for name in _OPTION_NAMES:
        if options[name] is None:
            options[name] = getattr(config, name, None)
    draft_tree, context_drafts = options["draft_tree"], options["context_drafts"]
    DraftOptions.parse(**options)
    lookup = getattr(config, "prompt_lookup_num_tokens", None)
    if lookup is not None:
        # Prompt lookup runs here as context drafts, branches of the same draft tree.
        if context_drafts is None:
            context_drafts = int(lookup)
        config.prompt_lookup_num_tokens = None
    mode = config.get_generation_mode(hf_arguments["assistant_model"])
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value}"
    unserved = sorted(
        k for k, v in model_kwargs.items() if k not in _SERVED_MODEL_KWARGS and v is not None
    )
    if unserved:
        return f"model inputs {', '.join(unserved)} are not served by the speculative decoder"
    outputs = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
    if config.return_dict_in_generate and any(getattr(config, name, False) for name in outputs):
        return "the output asks for scores, logits, attentions or hidden states"
    for name in ("token_healing", "cache_implementation"):
        if getattr(config, name, None):
            return f"{name} is not served by the speculative decoder"
    batch = input_ids.shape[0]
    if config.num_return_sequences and config.num_return_sequences > 1:
        if mode != GenerationMode.SAMPLE:
            return "num_return_sequences > 1 without sampling"
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if model_kwargs.get("attention_mask") is not None:
            model_kwargs["attention_mask"] = model_kwargs["attention_mask"].repeat_interleave(
                config.num_return_sequences, dim=0
            )
        batch = input_ids.shape[0]
    mask = model_kwargs.get("attention_mask")
    if mask is not None and (mask.shape != input_ids.shape or not is_left_padding(mask)):
        return "the attention mask is not a left-padding mask of the shape of input_ids"

    # EOS / pad, lengths, processors and stopping criteria exactly as Hugging Face builds them.
    generation_steps.special_tokens(model, config, mask is not None, input_ids.device, batch)
    length = input_ids.shape[1]
    config = generation_steps.lengths(
        model, config, input_ids, has_default_max_length, has_default_min_length
    )
    processors = generation_steps.logits_processors(model, config, input_ids, model_kwargs)
    warpers = LogitsProcessorList()
    for processor in processors:
        name = type(processor).__name__
        if isinstance(processor, _MIN_LENGTH):
            continue  # served: EOS is masked out of the first min_new_tokens targets
        if mode == GenerationMode.SAMPLE and name in SCORE_ONLY_WARPERS:
            warpers.append(processor)
            continue
        return f"logits processor {name} is not served by the speculative decoder"
    user_criteria = list(hf_arguments["stopping_criteria"] or [])
    criteria = generation_steps.stopping_criteria(model, config, user_criteria, tokenizer)
    # The budget and EOS are the decoder's own; every other criterion is checked per token.
    checked = StoppingCriteriaList(
        c
        for c in criteria
        if any(c is u for u in user_criteria)
        or not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))
    )

    eos, pad = special_token_tensors(config)
    if len(checked) and eos is None and batch > 1:
        # Hugging Face pads a stopped row only when an EOS id is set; without one it goes on
        # generating that row until every row has stopped.
        return "stopping criteria on a batch without an EOS id"
    return _Request(
        input_ids=input_ids,
        kwargs={
            "max_new_tokens": int(config.max_length) - length,
            "min_new_tokens": max(int(config.min_length or 0) - length, 0),
            "do_sample": mode == GenerationMode.SAMPLE,
            "warpers": warpers,
            # An empty list: no EOS (None would mean "the model's default").
            "eos_token_id": [] if eos is None else eos.flatten().tolist(),
            "pad_token_id": None if pad is None else int(pad),
            "attention_mask": mask,
            "streamer": hf_arguments["streamer"],
            "stopping_criteria": checked if len(checked) else None,
            "draft_tree": draft_tree,
            "context_drafts": context_drafts,
            "draft_positions": options["draft_positions"],
            **{name: options[name] for name in ACCEPTANCE_OPTIONS},
        },
        return_dict=bool(config.return_dict_in_generate),
    )
