"""Hugging Face drop-in: any ``transformers`` causal LM with a CP-MTP head on top.

``CPDMTPForCausalLM`` keeps the wrapped causal LM's body (its ``base_model``: ``LlamaModel``,
``GPT2Model``, ...) as ``self.trunk`` and replaces its ``lm_head`` by a ``CPDMTPHead`` whose
unembedding W_U *is* the LM's ``lm_head.weight`` (the same ``nn.Parameter``, so a tie between
input and output embeddings survives). Its ``forward`` returns a ``CausalLMOutputWithPast``:

- ``logits``: (B, T, V) next-token *marginal* log-probabilities of the CP mixture. They are
  normalised (``logsumexp`` over V is 0), so HF ``generate``, cross-entropy and perplexity work
  on them exactly as on raw logits.
- ``loss``: the CP-MTP loss (exact joint NLL of the next n tokens plus the balancing terms).

Labels are aligned with ``input_ids``, the model shifts; see the label convention in the docs.

``generate`` decodes speculatively when that is exact and runs Hugging Face's loop otherwise
(``cpd_mtp.hf.generation.SpeculativeGenerationMixin``). The config, ``CPDMTPModelConfig``, lives
in ``cpd_mtp.hf.configuration`` (re-exported here); importing this module registers the model
with ``AutoModelForCausalLM``.

Weights, saving and loading: W_U is saved once. When the wrapped LM ties its embeddings, the
model declares ``_tied_weights_keys = {"head.weight": "trunk.<embedding>.weight"}`` (the
transformers 5 ``{target: source}`` form), so ``save_pretrained`` drops the alias and
``from_pretrained`` re-ties it. A token-conditioned head also reads the trunk's input
embedding (``head.token_embedding``, the same ``nn.Parameter``); the head never saves it, and
``tie_weights`` (which ``from_pretrained`` calls after loading) hands the loaded trunk's
embedding to the head. The wrapped LM's config is stored as ``config.text_config``
(rebuilt through ``AutoConfig`` from its ``model_type``) and the head's as
``config.head_config`` (``CPDMTPConfig.to_dict()``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.modeling_outputs import CausalLMOutputWithPast

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.experts import ExpertStates
from cpd_mtp.head import SHARED_KEYS, CPDMTPHead, CPDMTPHeadOutput, _full_shape, check_bias_free
from cpd_mtp.hf.compat import (
    OUTPUT_CACHE_FIELD,
    attention_implementation,
    cache_keyword,
    mark_initialized,
    output_cache,
    set_attention_implementation,
)
from cpd_mtp.hf.configuration import CPDMTPModelConfig
from cpd_mtp.hf.generation import SpeculativeGenerationMixin

__all__ = [
    "CPDMTPCausalLMOutputWithPast",
    "CPDMTPForCausalLM",
    "CPDMTPModelConfig",
]

# Config attributes of models whose logits are not plain ``lm_head(last_hidden_state)``.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
)


@dataclass
class CPDMTPCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the head's full output.

    Attributes:
        loss: scalar CP-MTP loss (``cp_output.loss``), when labels are given.
        logits: (B, T', V) float32 next-token marginal log-probabilities (T' = T unless
            ``logits_to_keep`` selects fewer positions), or None with ``return_logits=False``.
        cache: the trunk's cache (``DynamicCache``) when ``use_cache``; the field is named
            ``past_key_values`` under transformers < 5.25, as Hugging Face's own outputs are.
        cp_output: with labels, the head's ``CPDMTPHeadOutput`` (joint NLL, per-head NLL, aux
            loss, expert usage, ...) for metrics; None otherwise. It is a plain dict with
            attribute access, nested here as is: DeepSpeed ZeRO-3 and ``nested_detach`` walk
            into it like into this output.
    """

    cp_output: CPDMTPHeadOutput | None = None


def _slice_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (B, T', d): the positions whose logits are wanted (HF ``logits_to_keep``).

    An int k keeps the last k positions (0 keeps all); a 1-D tensor holds the positions to keep.
    """
    if isinstance(logits_to_keep, int):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0, got {logits_to_keep}")
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1:
        return hidden[:, logits_to_keep.to(hidden.device), :]
    raise ValueError(
        "logits_to_keep must be an int or a 1-D tensor of positions, "
        f"got {type(logits_to_keep).__name__}"
        + (
            f" of shape {tuple(logits_to_keep.shape)}"
            if isinstance(logits_to_keep, torch.Tensor)
            else ""
        )
    )


class CPDMTPForCausalLM(SpeculativeGenerationMixin, PreTrainedModel, GenerationMixin):
    """A causal LM whose ``lm_head`` is a rank-r CP multi-token prediction head.

    Modules: ``trunk`` (the wrapped LM's ``base_model``, whose ``last_hidden_state`` is taken
    after the final norm) and ``head`` (``CPDMTPHead``; ``head.weight`` is W_U, shared with the
    wrapped LM's ``lm_head.weight``). There is no separate ``lm_head`` module: W_U is owned and
    used only by ``head``, so ZeRO-3 gathers it inside ``head.forward``.

    Build it with ``CPDMTPForCausalLM.from_causal_lm(model, n_future, rank)`` from an existing
    LM, with ``CPDMTPForCausalLM(config)`` from a ``CPDMTPModelConfig``, or with
    ``from_pretrained`` from a directory written by ``save_pretrained``.

    Args:
        config: the model's configuration.
        causal_lm: an existing causal LM to wrap (its modules are taken over, not copied);
            when None one is built from ``config.text_config``.
    """

    config_class = CPDMTPModelConfig
    base_model_prefix = "trunk"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The trunk decides which attention kernels it can run; do not veto them here.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The CP loss is a mean over positions and ignores `num_items_in_batch`, so the Trainer must
    # scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def __init__(self, config: CPDMTPModelConfig, causal_lm: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        built_here = causal_lm is None
        if built_here:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)]
            causal_lm = model_class(config.text_config)
        _warn_on_logit_transforms(causal_lm.config)
        trunk = causal_lm.base_model
        if trunk is causal_lm:
            raise ValueError(f"{type(causal_lm).__name__} has no base model to use as the trunk")
        lm_head = causal_lm.get_output_embeddings()
        if not isinstance(lm_head, nn.Linear):
            raise ValueError(
                f"the output embedding of {type(causal_lm).__name__} must be an nn.Linear, "
                f"got {type(lm_head).__name__}"
            )
        check_bias_free(lm_head, f"{type(causal_lm).__name__}.lm_head")
        # One config object for the trunk and this model, so later changes reach both.
        config.text_config = causal_lm.config
        set_attention_implementation(config, attention_implementation(causal_lm.config))
        head_values = config.cp_config.to_dict()
        hidden, vocab = head_values.pop("hidden_size"), head_values.pop("vocab_size")
        # ZeRO-3 (zero.Init) partitions parameters: their `.shape` is (0,), `ds_shape` is real.
        if _full_shape(lm_head.weight) != (vocab, hidden):
            raise ValueError(
                f"lm_head weight has shape {_full_shape(lm_head.weight)}, the head config wants "
                f"(vocab_size, hidden_size) = {(vocab, hidden)}"
            )
        n_future, rank = head_values.pop("n_future"), head_values.pop("rank")
        embedding = trunk.get_input_embeddings()
        token_embedding = None
        if head_values.get("token_conditioned"):
            token_embedding = _input_embedding_weight(embedding, type(causal_lm).__name__)
        head = CPDMTPHead.from_linear(
            lm_head, n_future, rank, token_embedding=token_embedding, **head_values
        )

        if built_here:
            # From the config; under from_pretrained the tie is only made after loading.
            tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
        else:
            # An existing model: its modules are the truth, whatever its config says.
            weight = (
                getattr(embedding, "weight", None) if isinstance(embedding, nn.Module) else None
            )
            tied = weight is head.weight
            if tied != bool(getattr(causal_lm.config, "tie_word_embeddings", False)):
                causal_lm.config.tie_word_embeddings = tied
        config.tie_word_embeddings = tied
        self._tied_weights_keys = (
            {"head.weight": f"trunk.{_module_name(trunk, embedding)}.weight"} if tied else {}
        )

        self.trunk = trunk
        self.head = head
        self.vocab_size = vocab
        deferred_init = head.weight.device.type == "meta" or (
            built_here and is_deepspeed_zero3_enabled()
        )
        if not deferred_init:
            # Built from existing (or just initialised) weights: post_init must not re-draw them.
            # (On meta / under ZeRO-3 zero.Init, transformers initialises after construction.)
            mark_initialized(self)
        self.post_init()
        if config.freeze_trunk:
            self._set_trunk_requires_grad(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_causal_lm(
        cls,
        model: PreTrainedModel,
        n_future: int = 4,
        rank: int = 4,
        freeze_trunk: bool = False,
        **head_kwargs: Any,
    ) -> CPDMTPForCausalLM:
        """Convert an existing HF causal LM; its modules are taken over, not copied.

        W_U is the model's ``lm_head.weight`` itself (so ``head.weight is
        model.lm_head.weight``, and a tie with the input embedding survives). The head's gate
        and experts are new, on the device and dtype of W_U; every expert type starts near the
        identity, so the marginal starts near the LM's softmax. A model built under Hugging Face
        ZeRO-3 (``deepspeed.zero.Init``, parameters partitioned) is accepted: shapes are read
        from DeepSpeed's ``ds_shape``.

        Args:
            model: a causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) whose output
                embedding is a bias-free ``nn.Linear``.
            n_future: n, tokens predicted jointly.
            rank: r, mixture components.
            freeze_trunk: heads-only training: the trunk and W_U get ``requires_grad=False``,
                the gate and experts stay trainable. Stored in the config, so it is re-applied
                by ``from_pretrained``.
            **head_kwargs: the rest of ``CPDMTPConfig`` (``expert_type``, ``balance``, ...).

        Raises:
            ValueError: the output embedding has a bias or is not an ``nn.Linear``, the model
                has no base model, or the head config is invalid.
        """
        if not isinstance(model, PreTrainedModel):
            raise ValueError(
                f"model must be a transformers PreTrainedModel, got {type(model).__name__}"
            )
        text = model.config
        head = CPDMTPConfig(
            hidden_size=int(text.hidden_size),
            vocab_size=int(text.vocab_size),
            n_future=n_future,
            rank=rank,
            **head_kwargs,
        )
        config = CPDMTPModelConfig(
            text_config=text, head_config=head.to_dict(), freeze_trunk=freeze_trunk
        )
        return cls(config, causal_lm=model)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> CPDMTPForCausalLM:
        """``PreTrainedModel.from_pretrained``, then re-applies ``config.freeze_trunk``; also
        loads drafter-only exports.

        Loading creates fresh parameters (``requires_grad=True``); a frozen trunk stays frozen.
        A local directory holding a ``cpd_mtp_export.json`` record (every export the trainer
        writes) has each file checked against its size and SHA-256 before loading, and the loaded
        weights are scanned for NaN and inf.

        A drafter-only export (``cpd_mtp.hf.export.save_drafter``: the head, and the identity of
        its base model) is attached to its base by :meth:`from_drafter`: the
        recorded base is loaded with ``cpd_mtp.hf.loading.load_causal_lm`` (an HF folder or a
        ``.gguf`` file; a relative path is resolved against the working directory, then against
        the absolute path recorded at export), or ``base_model=`` names another copy (a path, or
        a loaded ``PreTrainedModel`` used as is). Its W_U and input embedding must have the
        recorded fingerprint. ``dtype`` / ``torch_dtype`` apply to a base loaded from a path;
        the hub options (``local_files_only``, ``revision``, ...) are accepted and unused; other
        loading options (``device_map``, ``quantization_config``, ...) are refused: load the base
        with them yourself and pass it as ``base_model``.

        Raises:
            cpd_mtp.hf.export.ExportError: a file differs from the record (the file is named), or a
                loaded weight is not finite (the weight is named).
            ValueError: the head has a draft vocabulary but the checkpoint holds no
                ``head.draft_ids`` (or ids outside [0, V), or repeated ones); a drafter-only
                export's base has another fingerprint; ``base_model`` given for a merged export.
        """

        from cpd_mtp.hf.export import check_finite, is_drafter_export, verify_export

        base_model = kwargs.pop("base_model", None)
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        local = None
        if isinstance(source, (str, os.PathLike)):
            local = os.path.join(os.fspath(source), kwargs.get("subfolder") or "")
            if os.path.isdir(local):
                verify_export(local)  # before any byte of it is deserialised
            else:
                local = None
        if local is not None and is_drafter_export(local):
            return cls._from_drafter_export(local, args[1:], base_model, kwargs)
        if base_model is not None:
            raise ValueError(
                f"base_model= is for a drafter-only export; {source} is not one (a merged export "
                "holds its own base model): drop base_model"
            )
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if isinstance(model, CPDMTPForCausalLM):
            check_draft_vocab(model.head, info.get("missing_keys", ()), local or source)
            check_finite(model, local if local is not None else source)
            if model.config.freeze_trunk:
                model._set_trunk_requires_grad(False)
        return (model, info) if want_info else model

    # Options of PreTrainedModel.from_pretrained that mean nothing for a local drafter export.
    _DRAFTER_IGNORED_KWARGS = frozenset(
        {
            "_from_auto",
            "_from_pipeline",
            "adapter_kwargs",
            "cache_dir",
            "force_download",
            "local_files_only",
            "low_cpu_mem_usage",
            "proxies",
            "revision",
            "subfolder",
            "token",
            "trust_remote_code",
            "use_safetensors",
        }
    )

    @classmethod
    def _from_drafter_export(
        cls, directory: str, model_args: tuple, base_model: Any, kwargs: dict[str, Any]
    ) -> Any:
        kwargs = dict(kwargs)
        kwargs.pop("pretrained_model_name_or_path", None)
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        if dtype is None:
            dtype = torch_dtype
        want_info = kwargs.pop("output_loading_info", False)
        config = kwargs.pop("config", None)
        unsupported = sorted(set(kwargs) - cls._DRAFTER_IGNORED_KWARGS)
        if model_args or unsupported:
            raise ValueError(
                f"{directory} is a drafter-only export; its from_pretrained takes base_model, "
                f"dtype, output_loading_info and the hub options, not "
                f"{unsupported or 'positional model arguments'}: load the base model with them "
                "and pass it as base_model"
            )
        head_config = config.head_config if isinstance(config, CPDMTPModelConfig) else None
        model = cls.from_drafter(directory, base_model, dtype, head_config=head_config)
        if want_info:
            empty: dict[str, Any] = {"missing_keys": set(), "unexpected_keys": set()}
            return model, {**empty, "mismatched_keys": set(), "error_msgs": []}
        return model

    @classmethod
    def from_drafter(
        cls,
        directory: str | os.PathLike[str],
        base_model: Any = None,
        dtype: torch.dtype | str | None = None,
        *,
        head_config: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> CPDMTPForCausalLM:
        """A drafter-only export attached to its base model: a base-mode model.

        What ``from_pretrained(directory, base_model=...)`` runs for a drafter-only export
        (after ``verify_export``). The export's files are read and checked first
        (``cpd_mtp.hf.export.read_drafter``), then the base is loaded and its fingerprint
        checked.

        Args:
            directory: the export folder written by ``cpd_mtp.hf.export.save_drafter``.
            base_model: None loads the recorded base with ``cpd_mtp.hf.loading.load_causal_lm``
                (an HF folder or a ``.gguf`` file; a relative path is resolved against the
                working directory, then against the absolute path recorded at export); a path
                loads that base instead; a ``PreTrainedModel`` (the plain causal LM) is used as
                is, its modules taken over.
            dtype: the dtype a base loaded from a path gets (None or ``"auto"``: as stored,
                float32 for a GGUF file); a given model keeps its own. The head takes W_U's.
            head_config: the head's ``CPDMTPConfig`` fields; None reads the export's.
            progress: transformers' progress bars while loading the base.

        Raises:
            ValueError: the base's fingerprint is not the recorded one (one line), or the
                export has a draft vocabulary but no ``head.draft_ids``.
            FileNotFoundError: the recorded base is not here and no ``base_model`` was given.
            ExportError: the export's files do not fit together or hold NaN or inf.
        """
        from transformers import GenerationConfig

        from cpd_mtp.hf.compat import set_source_path
        from cpd_mtp.hf.export import (
            SPECIAL_TOKENS,
            ExportError,
            base_source,
            check_base_fingerprint,
            read_drafter,
        )
        from cpd_mtp.hf.loading import load_causal_lm

        files = read_drafter(directory, head_config)
        directory = files.directory
        if isinstance(dtype, str) and dtype == "auto":
            dtype = None
        if base_model is None or isinstance(base_model, (str, os.PathLike)):
            source = base_source(files) if base_model is None else base_model
            base, _ = load_causal_lm(source, dtype, progress=progress, tokenizer=False)
            described = f"loaded from {os.fspath(source)}"
        elif isinstance(base_model, CPDMTPForCausalLM):
            raise ValueError(
                "base_model must be the plain base causal LM the drafter was trained on, not a "
                "CPDMTPForCausalLM"
            )
        elif isinstance(base_model, PreTrainedModel):
            base, described = base_model, f"{type(base_model).__name__} passed as base_model"
        else:
            raise TypeError(
                f"base_model must be a path or a transformers PreTrainedModel, got "
                f"{type(base_model).__name__}"
            )
        check_base_fingerprint(base, files, described)

        values = dict(files.head_values)
        hidden, vocab = values.pop("hidden_size"), values.pop("vocab_size")
        n_future, rank = values.pop("n_future"), values.pop("rank")
        if (hidden, vocab) != (int(base.config.hidden_size), int(base.config.vocab_size)):
            raise ExportError(
                f"drafter export {directory}: its head has (hidden_size, vocab_size) = "
                f"{(hidden, vocab)}, its base "
                f"{(base.config.hidden_size, base.config.vocab_size)}"
            )
        with torch.random.fork_rng(devices=[]):  # the head's fresh init is overwritten below
            model = cls.from_causal_lm(
                base, n_future=n_future, rank=rank, freeze_trunk=True, **values
            )
        try:
            missing, unexpected = model.head.load_state_dict(files.state, strict=False)
        except RuntimeError as err:  # a shape that does not fit the head config
            first = str(err).strip().splitlines()
            raise ExportError(
                f"drafter export {directory}: its head tensors do not fit its head config: "
                f"{first[-1].strip() if first else err!r}"
            ) from err
        # The shared W_U (and the input embedding, re-attached from the base).
        missing = {f"head.{key}" for key in missing} - {f"head.{key}" for key in SHARED_KEYS}
        check_draft_vocab(model.head, missing, directory)
        if missing or unexpected:
            raise ExportError(
                f"drafter export {directory}: its head lacks {sorted(missing)} and has "
                f"unexpected {sorted(unexpected)}"
            )
        for config in (model.config, model.config.text_config):
            for name in SPECIAL_TOKENS:
                if name in files.stored:
                    setattr(config, name, files.stored[name])
        if (directory / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        set_source_path(model.config, str(directory))
        return model.eval()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise head modules whose weights were missing from a checkpoint.

        The trunk is a ``PreTrainedModel`` and initialises its own modules.
        """
        if isinstance(module, ExpertStates):
            module.reset_parameters()
        elif isinstance(module, CPDMTPHead):
            hf_init.normal_(
                module.gate.weight, mean=0.0, std=0.02 / math.sqrt(module.config.hidden_size)
            )
            hf_init.zeros_(module.gate.bias)
            fusion = module.token_proj
            if fusion is not None:  # f starts at zero (the unconditioned head)
                if fusion.kind == "add":
                    hf_init.zeros_(fusion.weight)
                else:  # hf_init skips tensors a checkpoint already filled
                    width = fusion.fc_in.weight.shape[1]
                    hf_init.normal_(fusion.fc_in.weight, mean=0.0, std=width**-0.5)
                    hf_init.zeros_(fusion.fc_in.bias)
                    hf_init.zeros_(fusion.fc_out.weight)
                    hf_init.zeros_(fusion.fc_out.bias)
            if not self.config.tie_word_embeddings:
                std = getattr(self.config.text_config, "initializer_range", 0.02) or 0.02
                hf_init.normal_(module.weight, mean=0.0, std=std)

    # ------------------------------------------------------------------ freezing
    def _set_trunk_requires_grad(self, requires_grad: bool) -> None:
        for param in self.trunk.parameters():
            param.requires_grad_(requires_grad)
        self.head.weight.requires_grad_(requires_grad)

    def set_freeze_trunk(self, frozen: bool = True) -> None:
        """Freeze (heads-only training) or unfreeze the trunk and W_U; recorded in the config.

        The gate and the experts always stay trainable.
        """
        self.config.freeze_trunk = bool(frozen)
        self._set_trunk_requires_grad(not frozen)

    # ------------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self) -> nn.Module:
        """The trunk's token embedding module."""
        return self.trunk.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the trunk's token embedding (a tie with W_U is re-made by ``tie_weights``;
        a token-conditioned head reads the new one at once)."""
        self.trunk.set_input_embeddings(value)
        self._attach_token_embedding()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Hugging Face's tying (W_U to the input embedding when tied), then the head of a
        ``token_conditioned`` model is given the trunk's input embedding again.

        The head reads that embedding but never saves it (it is the trunk's): loading puts
        the loaded embedding in the trunk, and this call, which ``from_pretrained`` makes after
        loading, hands it to the head.
        """
        super().tie_weights(*args, **kwargs)
        self._attach_token_embedding()

    def _attach_token_embedding(self) -> None:
        head = getattr(self, "head", None)
        trunk = getattr(self, "trunk", None)
        if head is None or trunk is None or not head.config.token_conditioned:
            return
        weight = _input_embedding_weight(trunk.get_input_embeddings(), type(trunk).__name__)
        if head.token_embedding is not weight:
            head.attach_token_embedding(weight)

    def attention_implementation(self) -> str:
        """The trunk's attention kernel (``"eager"``, ``"sdpa"``, ...): whether a draft tree's
        4-D mask can be passed to it (``cpd_mtp.decoding.forward``)."""
        return attention_implementation(self.trunk.config) or "eager"

    def get_output_embeddings(self) -> CPDMTPHead:
        """The CP head: ``.weight`` is W_U (V, d) and calling it on (…, d) gives (…, V) log-probs."""
        return self.head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        """Use ``new_embeddings.weight`` (V, d), same shape, no bias, as W_U."""
        weight = getattr(new_embeddings, "weight", None)
        shape = _full_shape(self.head.weight)  # the logical shape, also under ZeRO-3
        if not isinstance(weight, nn.Parameter) or _full_shape(weight) != shape:
            raise ValueError(f"new output embeddings need a weight Parameter of shape {shape}")
        check_bias_free(new_embeddings, "the new output embedding")
        self.head.weight = weight

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """Not supported on the wrapper: the head config fixes V.

        Resize the causal LM first, then convert it with ``from_causal_lm``.
        """
        raise NotImplementedError(
            "CPDMTPForCausalLM cannot resize its vocabulary; resize the causal LM with "
            "resize_token_embeddings first, then wrap it with CPDMTPForCausalLM.from_causal_lm"
        )

    # ------------------------------------------------------------------ forward
    def trunk_hidden(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any | None]:
        """One trunk forward: final hidden states (after the final norm) and the cache.

        This is the entry point for decoders (e.g. self-speculative decoding): feed new tokens
        with the cache of the previous call, then apply ``self.head`` (marginal),
        ``self.head.draft_state`` or ``self.head.conditional`` to the returned states.

        Args:
            input_ids: (B, T) new token ids (or pass ``inputs_embeds`` (B, T, d)).
            attention_mask: (B, T_past + T) 1 for real tokens, 0 for padding.
            position_ids: (B, T) positions; the trunk derives them from the cache when None.
            cache: the trunk's cache (a ``DynamicCache``), or None. To drop k
                rejected tokens call ``cache.crop(-k)``: transformers 5 rejects a positive
                ``crop(new_length)``; ``cache.get_seq_length()`` gives the cached length.
            use_cache: whether to build / extend and return the cache.
            **kwargs: passed to the trunk (e.g. ``token_type_ids`` for GPT-2).

        Returns:
            hidden: (B, T, d) last hidden states; cache: the updated cache, or None when
            ``use_cache`` is False.
        """
        outputs = self._run_trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if isinstance(outputs, tuple):
            hidden, cache = outputs[0], outputs[1] if use_cache and len(outputs) > 1 else None
            return hidden, cache
        return outputs.last_hidden_state, (output_cache(outputs) if use_cache else None)

    def _run_trunk(self, *, cache: Any | None, **kwargs: Any) -> Any:
        """The trunk's forward, given the cache under the name its version takes."""
        if cache is not None:
            kwargs[cache_keyword(self.trunk)] = cache
        return self.trunk(**kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        return_logits: bool = True,
        **kwargs: Any,
    ) -> CPDMTPCausalLMOutputWithPast | tuple:
        """Trunk, then the CP head: marginal logits and, with labels, the CP-MTP loss.

        Args:
            input_ids: (B, T) token ids (or ``inputs_embeds`` (B, T, d)).
            attention_mask: (B, T_past + T) 1 for real tokens, 0 for padding.
            position_ids: (B, T).
            cache: the trunk's cache (``past_key_values``, the name before transformers 5.25,
                is taken too).
            labels: (B, T) aligned with ``input_ids``, the model shifts; see the label
                convention in the docs. Values must lie in [0, V) or be ``ignore_index``.
            use_cache: return the trunk's cache (default: the trunk config's ``use_cache``).
            logits_to_keep: int k: logits for the last k positions only (0: all); or a 1-D
                tensor of positions. The loss always uses every position.
            return_dict: False returns the tuple ``(loss?, logits?, cache?)``; None
                (the default) takes ``config.return_dict``, as Hugging Face models do.
            return_logits: False skips the (B, T', V) marginal (it costs r·V per position),
                e.g. in training where only the loss is needed; ``logits`` is then None.
            **kwargs: passed to the trunk (``output_hidden_states``, ``token_type_ids``, ...);
                the Trainer's ``num_items_in_batch`` is dropped.

        Returns:
            ``CPDMTPCausalLMOutputWithPast`` with ``loss`` (scalar, with labels), ``logits``
            (B, T', V) float32 normalised log-probabilities, ``cache``,
            ``hidden_states``/``attentions`` when asked for, and ``cp_output`` (the head's
            ``CPDMTPHeadOutput``, with labels).

        Raises:
            ValueError: labels whose shape is not (B, T) or whose values are out of range.
        """
        kwargs.pop("num_items_in_batch", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        if cache is None:
            cache = legacy_cache
        if labels is not None:
            reference = input_ids if input_ids is not None else inputs_embeds
            expected = tuple(reference.shape[:2]) if reference is not None else None
            if expected is not None and tuple(labels.shape) != expected:
                raise ValueError(
                    f"labels must have the shape of input_ids (B, T) = {expected} (aligned, the "
                    f"model shifts), got {tuple(labels.shape)}"
                )
        outputs = self._run_trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs[0]  # (B, T, d)

        loss, logits, cp_output = None, None, None
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is not None:
            labels = labels.to(hidden.device)
            cp_output = self.head(hidden, labels=labels, return_logits=return_logits and keep_all)
            loss, logits = cp_output.loss, cp_output.logits
        if return_logits and logits is None:
            logits = self.head(_slice_positions(hidden, logits_to_keep))

        past = output_cache(outputs)
        if return_dict is None:  # resolved from the config, like HF models (PEFT passes None)
            return_dict = self.config.return_dict
        if not return_dict:
            return tuple(x for x in (loss, logits, past) if x is not None)
        return CPDMTPCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{OUTPUT_CACHE_FIELD: past},
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
            cp_output=cp_output,
        )


def check_draft_vocab(head: CPDMTPHead, missing_keys: Any, source: Any = None) -> None:
    """Refuse a loaded head with a draft vocabulary but no (or broken) ``draft_ids``.

    A checkpoint whose head config has ``draft_vocab_size`` < V but which lacks the
    ``head.draft_ids`` buffer would otherwise leave the ids uninitialised, and drafting would
    fail far from the cause (an ``IndexError`` on a garbage index).

    Args:
        head: the loaded head.
        missing_keys: the keys the load did not find (``head.draft_ids`` among them is refused).
        source: where it was loaded from, for the message.

    Raises:
        ValueError: in one line, naming ``source`` and ``draft_vocab_size``.
    """
    ids = head.draft_ids
    if ids is None:
        return
    where = f"{source}" if source is not None else "the checkpoint"
    k, vocab = head.config.draft_vocab, head.config.vocab_size
    if "head.draft_ids" in set(missing_keys):
        raise ValueError(
            f"{where} has draft_vocab_size={k} in its head config but no head.draft_ids tensor, "
            "so its draft vocabulary is unknown: export the head again with its draft ids "
            "(set by set_draft_vocab)"
        )
    if ids.is_meta or ids.numel() == 0:  # not materialised (meta, ZeRO-3): nothing to check
        return
    if ids.numel() != k or bool(((ids < 0) | (ids >= vocab)).any()) or ids.unique().numel() != k:
        raise ValueError(
            f"{where} holds head.draft_ids that are not {k} distinct ids in [0, {vocab}): "
            "the draft vocabulary is corrupt"
        )


def _input_embedding_weight(embedding: Any, owner: str) -> nn.Parameter:
    """The weight of a model's input embedding module, for a token-conditioned head."""
    weight = getattr(embedding, "weight", None) if isinstance(embedding, nn.Module) else None
    if not isinstance(weight, nn.Parameter):
        raise ValueError(
            f"a token-conditioned head reads the input embedding's weight, but the input "
            f"embedding of {owner} is {type(embedding).__name__} without a weight Parameter"
        )
    return weight


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _warn_on_logit_transforms(config: PretrainedConfig) -> None:
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1 and value != 1.0:
            warnings.warn(
                f"{type(config).__name__}.{name}={value!r}: this model transforms its lm_head "
                "output; the CP head uses plain W_U h logits, so its marginal differs from the "
                "original model's distribution even at n=1, r=1 with identity experts",
                stacklevel=3,
            )


# The config registers itself with AutoConfig (cpd_mtp.hf.configuration).
AutoModelForCausalLM.register(CPDMTPModelConfig, CPDMTPForCausalLM, exist_ok=True)
