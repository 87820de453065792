"""The CP-MTP head: n future tokens as a mixture of r products of per-token distributions.

    log w_t        = log_softmax(W_g h_t + b_g)                         (r,)
    u_{t,s,a}      = phi_{s,a}(h_t)                                      (n, r, d)
    log p_{s,a}(v) = log_softmax(W_U u_{t,s,a})_v                        (n, r, V)
    P(x_{t+1..t+n}) = sum_a w_a prod_s p_{s,a}(x_{t+s})

``forward(hidden)`` returns the next-token marginal log P(x_{t+1}), a drop-in for
``lm_head(hidden)`` logits. ``forward(hidden, labels=labels)`` also returns the exact CP loss.

A token-conditioned head (``token_conditioned``, base mode) reads z_t = h_t + f(h_t, e(x_{t+1}))
in place of h_t in the gate and the experts, with e the model's frozen input embedding and f a
learned fusion (``cpd_mtp.fusion``: C e, or an MLP of both): it models x_{t+2..t+n} given
(h_t, x_{t+1}), and offset 1 is its input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cpd_mtp.balance import balance_loss, expert_statistics, router_z_loss
from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.experts import ExpertStates
from cpd_mtp.fusion import TokenFusion
from cpd_mtp.ops.checks import accumulation_dtype, check_targets
from cpd_mtp.ops.dispatch import row_logprobs_unchecked
from cpd_mtp.ops.distill import window_distill_loss
from cpd_mtp.ops.few_rows import few_row_linear
from cpd_mtp.ops.mixture import mixture_logsumexp


class CPDMTPHeadOutput(dict):
    """What ``CPDMTPHead.forward(hidden, labels=...)`` returns: a dict with attribute access.

    A plain ``dict`` subclass, so DeepSpeed ZeRO-3 (which rewrites a dict's tensors in place,
    ``out[key] = ...``) finds its tensors and gathers the head's parameters again for
    backward; every attribute read goes through the dict, so it sees those rewrites. As in a
    ``transformers`` ``ModelOutput``, a field that is None is not a key, reads as None, and is
    left out of ``to_tuple()``.

    Attributes:
        loss: scalar training objective, ``joint_nll + aux_loss``.
        logits: (..., T, V) next-token marginal log-probabilities, or None if not asked for.
        joint_nll: scalar, -sum_t l_t / (positions with at least one target).
        joint_nll_per_target: scalar, -sum_t l_t / (number of targets), nats per token.
        per_head_nll: (n,) NLL of the marginal at each offset, over its observed targets;
            entry 0 is the next-token NLL.
        aux_loss: scalar, balance_coef · balance + router_z_coef · z-loss.
        expert_weight: (r,) mean gate weight per expert.
        expert_responsibility: (r,) mean posterior responsibility per expert.
        gate_entropy: scalar, mean entropy of the gate in nats. These three are means over
            the positions with at least one target, over all positions when none has one (the
            responsibility is then the gate weight), and 0 when there is no position.
        position_nll: (..., T) -l_t per position (0 where a position has no target), detached.
        num_positions: positions with at least one target.
        num_targets: observed targets summed over positions and offsets.
        distill_kl: (n,) with ``distill``: mean KL(teacher || q_k) per offset, detached.
    """

    FIELDS = (
        "loss",
        "logits",
        "joint_nll",
        "joint_nll_per_target",
        "per_head_nll",
        "aux_loss",
        "expert_weight",
        "expert_responsibility",
        "gate_entropy",
        "position_nll",
        "num_positions",
        "num_targets",
        "distill_kl",
    )
    __slots__ = ()

    def __init__(self, values: Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        # ``type(out)({k: f(v) ...})`` is how transformers and accelerate rebuild a mapping.
        fields = {**(values or {}), **fields}
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"CPDMTPHeadOutput has no fields {sorted(unknown)}")
        # Keys in field order, None left out, as ModelOutput does.
        super().__init__((k, fields[k]) for k in self.FIELDS if fields.get(k) is not None)

    def __getattr__(self, name: str) -> Any:
        if name in self.FIELDS:
            return self.get(name)
        raise AttributeError(f"CPDMTPHeadOutput has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.FIELDS:
            raise AttributeError(f"CPDMTPHeadOutput has no field {name!r}")
        if value is None:
            self.pop(name, None)
        else:
            self[name] = value

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are not None, in field order."""
        return tuple(self[k] for k in self.FIELDS if k in self)


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The logical shape of a parameter, also when DeepSpeed ZeRO-3 has partitioned it.

    A partitioned parameter's ``.shape`` is ``(0,)`` outside a gather; ``ds_shape`` keeps the
    real one.
    """
    return tuple(getattr(param, "ds_shape", param.shape))


def check_bias_free(module: nn.Module, what: str = "lm_head") -> None:
    """Raise ``ValueError`` when ``module`` (an output embedding) has a bias.

    A CP-MTP head shares only the unembedding W_U (V, d) of a causal LM; a bias would be
    silently dropped.
    """
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"{what} has a bias; a CP-MTP head shares only a bias-free W_U")


def next_tokens(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """x_{t+1} of every position: (..., T) labels -> (..., T) ``labels[..., t + 1]``, and
    ``ignore_index`` at the last position (what a token-conditioned head is teacher-forced with).
    """
    return shift_targets(labels, 1, ignore_index)[..., 0]


def shift_targets(labels: torch.Tensor, n_future: int, ignore_index: int) -> torch.Tensor:
    """Future targets per position: out[..., t, s-1] = labels[..., t+s], past the end ignored.

    Args:
        labels: (..., T) token ids aligned with the input ids (the Hugging Face convention:
            ``labels = input_ids``, the model shifts).

    Returns:
        (..., T, n) targets; ``ignore_index`` where t+s >= T.
    """
    seq_len = labels.shape[-1]
    pad = labels.new_full((*labels.shape[:-1], n_future), ignore_index)
    padded = torch.cat([labels, pad], dim=-1)  # (..., T + n)
    return torch.stack([padded[..., s : s + seq_len] for s in range(1, n_future + 1)], dim=-1)


# The head's parameters that belong to the model it sits on, not to the head: W_U and, for a
# token-conditioned head, the input embedding. Exports of the head alone leave them out.
SHARED_KEYS = ("weight", "token_embedding")


class CPDMTPHead(nn.Module):
    """Rank-r CP multi-token prediction head over a shared unembedding W_U.

    Args:
        config: the head's hyper-parameters.
        unembedding: an existing (V, d) parameter to use as W_U (shared, not copied);
            a new one is created when None.
        token_embedding: for a ``token_conditioned`` head, the model's (V, d) input embedding
            (shared, not copied; None: W_U itself, the input embedding of a model with tied
            embeddings). It is read, never trained (no gradient reaches it through the head),
            and never part of the head's ``state_dict``: it is the model's, like W_U, and
            whoever builds the head attaches it again (``CPDMTPForCausalLM`` does, also after
            loading). Ignored by a head that is not token-conditioned.

    Label convention: ``labels`` has the shape of ``hidden`` without its last dimension and is
    aligned with the input ids (``labels = input_ids`` as in Hugging Face); the target of
    position t at offset s is ``labels[..., t + s]``. Targets past the end of the sequence and
    those equal to ``ignore_index`` are marginalised out, not counted.
    """

    def __init__(
        self,
        config: CPDMTPConfig,
        unembedding: nn.Parameter | None = None,
        token_embedding: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        d, vocab = config.hidden_size, config.vocab_size
        self.gate = nn.Linear(d, config.rank)
        nn.init.normal_(self.gate.weight, std=0.02 / d**0.5)
        nn.init.zeros_(self.gate.bias)
        self.experts = ExpertStates(config)
        if unembedding is None:
            unembedding = nn.Parameter(torch.randn(vocab, d) * 0.02)
        elif _full_shape(unembedding) != (vocab, d):
            raise ValueError(
                f"unembedding must have shape (vocab_size, hidden_size) = {(vocab, d)}, "
                f"got {_full_shape(unembedding)}"
            )
        self.weight = unembedding
        if config.token_conditioned:
            # The next token's embedding enters as z = h + f(h, e(x_{t+1})) (cpd_mtp.fusion).
            # f starts at zero, so a new conditioned head computes exactly what the
            # unconditioned head does.
            self.token_proj = TokenFusion(config.token_fusion, d)
            self.attach_token_embedding(unembedding if token_embedding is None else token_embedding)
        else:
            self.token_proj = None
            self.token_embedding = None
        if config.has_draft_vocab:
            # Placeholder ids until ``set_draft_vocab``; saved and restored with the model.
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab))
        else:
            self.draft_ids = None

    @classmethod
    def from_linear(
        cls,
        lm_head: nn.Linear,
        n_future: int,
        rank: int,
        *,
        token_embedding: nn.Parameter | None = None,
        **config_kwargs,
    ) -> CPDMTPHead:
        """A head whose W_U *is* ``lm_head.weight`` (shared, so tying is preserved).

        Args:
            lm_head: a bias-free ``nn.Linear(d, V)``.
            n_future: n, the number of future tokens predicted jointly.
            rank: r, the number of experts.
            token_embedding: the model's (V, d) input embedding weight, read by a
                ``token_conditioned`` head (see the class); None: ``lm_head.weight``.
            **config_kwargs: the rest of ``CPDMTPConfig`` (``expert_type``, ``balance``, ...).
        """
        if not isinstance(lm_head, nn.Linear):
            raise ValueError(f"lm_head must be an nn.Linear, got {type(lm_head).__name__}")
        check_bias_free(lm_head)
        vocab, d = _full_shape(lm_head.weight)  # (V, d), also when ZeRO-3 partitioned it
        config = CPDMTPConfig(
            hidden_size=d, vocab_size=vocab, n_future=n_future, rank=rank, **config_kwargs
        )
        head = cls(config, unembedding=lm_head.weight, token_embedding=token_embedding)
        head.gate.to(lm_head.weight.device, lm_head.weight.dtype)
        head.experts.to(lm_head.weight.device, lm_head.weight.dtype)
        if head.token_proj is not None:
            head.token_proj.to(lm_head.weight.device, lm_head.weight.dtype)
        return head

    # ------------------------------------------------------------------ the next token's input
    def attach_token_embedding(self, embedding: nn.Parameter) -> None:
        """Read x_{t+1} through this (V, d) input embedding (shared, not copied).

        For a ``token_conditioned`` head only; the embedding is the model's, so the head's
        ``state_dict`` leaves it out and a loaded head needs it attached again.
        """
        if not self.config.token_conditioned:
            raise ValueError("attach_token_embedding: this head is not token_conditioned")
        want = (self.config.vocab_size, self.config.hidden_size)
        if not isinstance(embedding, torch.Tensor) or _full_shape(embedding) != want:
            shape = _full_shape(embedding) if isinstance(embedding, torch.Tensor) else None
            raise ValueError(
                f"token_embedding must be a tensor of shape (vocab_size, hidden_size) = {want}, "
                f"got {shape if shape is not None else type(embedding).__name__}"
            )
        if not isinstance(embedding, nn.Parameter):
            embedding = nn.Parameter(embedding, requires_grad=False)
        self.token_embedding = embedding

    def conditioned_state(
        self, hidden: torch.Tensor, next_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the gate and the experts read: h, or z = h + f(h, e(x_{t+1})) when conditioned.

        Args:
            hidden: (..., d) hidden states h_t.
            next_token: (...) ids of x_{t+1}; a negative id means no token (its embedding is
                taken as 0). Required by a ``token_conditioned`` head, ignored by the others.

        Returns:
            (..., d) in ``hidden``'s dtype. The embedding is read detached: no gradient
            reaches it, only C.
        """
        if self.token_proj is None:
            return hidden
        if next_token is None:
            raise ValueError(
                "this head is token_conditioned: it drafts given x_{t+1}, pass next_token"
            )
        next_token = next_token.to(hidden.device)
        if tuple(next_token.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"next_token must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                f"got {tuple(next_token.shape)}"
            )
        present = next_token >= 0
        ids = torch.where(present, next_token, 0).to(torch.int64)
        table = self.token_embedding.detach()
        embedded = nn.functional.embedding(ids.to(table.device), table).to(hidden.device)
        embedded = torch.where(present[..., None], embedded, 0.0)
        shift = self.token_proj(hidden, embedded)
        return hidden + shift.to(hidden.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # The input embedding is the model's, like W_U in an export of the head alone; unlike
        # W_U it is never the head's to save (see the class docstring).
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "token_embedding", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Neither expected nor loaded: a state dict holding it is reported as unexpected.
        embedding = self._parameters.pop("token_embedding", None)
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        finally:
            if embedding is not None:
                self._parameters["token_embedding"] = embedding

    # ------------------------------------------------------------------ pieces
    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if not hidden.dtype.is_floating_point:
            raise ValueError(f"hidden must be a floating tensor, got dtype {hidden.dtype}")
        if hidden.dim() < 1 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden must have last dimension hidden_size={self.config.hidden_size}, "
                f"got shape {tuple(hidden.shape)}"
            )

    # ------------------------------------------------------------------ draft vocabulary
    @torch.no_grad()
    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Use these K token ids as the draft vocabulary (e.g. ``most_frequent_ids``).

        Args:
            ids: (K,) distinct ids in [0, V), K = ``config.draft_vocab_size``.
        """
        if self.draft_ids is None:
            raise ValueError(
                "this head has no draft vocabulary (draft_vocab_size is None or V); build it "
                "with next_token='base' and draft_vocab_size=K"
            )
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        k, vocab = self.config.draft_vocab, self.config.vocab_size
        if ids.numel() != k or ids.unique().numel() != k:
            raise ValueError(f"the draft vocabulary needs {k} distinct ids, got {ids.numel()}")
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(f"draft vocabulary ids must lie in [0, {vocab})")
        self.draft_ids.copy_(ids.sort().values)

    def draft_position(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position of each vocabulary id inside the draft vocabulary, -1 outside it.

        Args:
            token_ids: (...) ids in [0, V).

        Returns:
            (...) int64 positions in [0, K) or -1; the ids themselves without a draft vocabulary.
        """
        if self.draft_ids is None:
            return token_ids
        index = torch.full(
            (self.config.vocab_size,), -1, dtype=torch.int64, device=self.draft_ids.device
        )
        index[self.draft_ids] = torch.arange(self.draft_ids.numel(), device=index.device)
        return index[token_ids.to(index.device)]

    def _expert_unembedding(self) -> torch.Tensor:
        """The rows of W_U the experts' softmax runs over: (K, d)."""
        return self.weight if self.draft_ids is None else self.weight[self.draft_ids]

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The wrapped model's own logits ``lm_head(hidden)`` = W_U h: (..., d) -> (..., V).

        The same operation as the ``nn.Linear`` lm_head it replaces (same dtype, same kernel),
        so the values are bit for bit the original model's.
        """
        return nn.functional.linear(hidden, self.weight)

    def gate_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """z = W_g h + b_g: (..., d) -> (..., r)."""
        return self.gate(hidden)

    def log_gate(self, hidden: torch.Tensor) -> torch.Tensor:
        """log w = log_softmax(W_g h + b_g): (..., d) -> (..., r), float32 (float64 for float64).

        The gate logits are computed in that dtype from upcast h, W_g and b_g (the gate is
        small), so a bf16 model's decoding gate is not rounded to bf16 first.
        """
        dtype = accumulation_dtype(hidden.dtype)
        if hasattr(self.gate.weight, "ds_id"):
            # ZeRO-3 gathers W_g only inside the gate module's own call.
            return torch.log_softmax(self.gate_logits(hidden).to(dtype), dim=-1)
        with _autocast_off(hidden.device.type):
            logits = nn.functional.linear(
                hidden.to(dtype), self.gate.weight.to(dtype), self.gate.bias.to(dtype)
            )
        return torch.log_softmax(logits, dim=-1)

    def expert_log_probs(
        self,
        hidden: torch.Tensor,
        offsets: slice | None = None,
        unembedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p_{s,a}(v) for the selected offsets: (..., d) -> (..., n', r, K), float32.

        K = V, or the draft vocabulary's size (entry j is then token ``draft_ids[j]``).
        ``unembedding``: those (K, d) rows of W_U when the caller already holds them (a decoder
        gathers the draft rows once per call, not once per iteration).

        Materialises n'·r·V numbers per position: meant for decoding, not for training. The
        logits W_U u are float32 products of the (upcast) expert states and W_U, never rounded
        to a bf16 / fp16 model's dtype (see ``_unembed_accurate``).
        """
        u = self.experts(hidden, offsets)  # (..., n', r, d)
        # One product for every selected expert row: W_U (or its K draft rows) is read once.
        weight = self._expert_unembedding() if unembedding is None else unembedding
        return torch.log_softmax(_unembed_accurate(u, weight), dim=-1)

    def marginal_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log P(x_{t+1} = v) = logsumexp_a(log w_a + log p_{1,a}(v)): (..., d) -> (..., V)."""
        return self.marginal_and_pieces(hidden)[0]

    def marginal_and_pieces(
        self, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next-token marginal with the pieces it is made of (a drafter reuses them).

        Args:
            hidden: (..., d) hidden states.

        Returns:
            marginal: (..., V) log P(x_{t+1}); log_w: (..., r) log gate weights;
            log_p1: (..., r, V) log p_{1,a}, the experts' next-token log-probabilities.
        """
        log_w = self.log_gate(hidden)  # (..., r)
        log_p1 = self.expert_log_probs(hidden, slice(0, 1))[..., 0, :, :]  # (..., r, V)
        return torch.logsumexp(log_w[..., None] + log_p1, dim=-2), log_w, log_p1

    def next_token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's next-token scores: (..., d) -> (..., V).

        ``marginal`` mode: the CP marginal's normalised log-probabilities (float32). ``base``
        mode: the wrapped model's own logits, exactly ``lm_head(hidden)`` (its dtype).
        """
        if self.config.next_token == "base":
            return self.base_logits(hidden)
        return self.marginal_log_probs(hidden)

    # ------------------------------------------------------------------ targets
    def loss_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The targets the loss scores: (..., T) labels -> (..., T, n) ids, ``ignore_index``
        where a target is not scored.

        Entry [..., t, s-1] is ``labels[..., t + s]`` (past the end: ignored). With a draft
        vocabulary, targets outside it are ignored. For a ``token_conditioned`` head, offset 1
        is the head's input, not a target, and a position whose x_{t+1} is ignored or past the
        end has no conditional to score: both are ignored.
        """
        cfg = self.config
        labels = labels.to(torch.int64)
        targets = shift_targets(labels, cfg.n_future, cfg.ignore_index)  # (..., T, n)
        if self.draft_ids is not None:
            outside = self.draft_position(targets.clamp(min=0)).to(targets.device) < 0
            targets = targets.masked_fill(outside, cfg.ignore_index)
        if cfg.token_conditioned:
            # x_{t+1} is read through the full vocabulary's embedding, inside the draft
            # vocabulary or not.
            missing = next_tokens(labels, cfg.ignore_index)[..., None] == cfg.ignore_index
            targets = targets.masked_fill(missing, cfg.ignore_index)
            targets[..., 0] = cfg.ignore_index
        return targets

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool = True,
        distill: tuple[float, float] | None = None,
    ) -> torch.Tensor | CPDMTPHeadOutput:
        """Next-token marginal, or the CP loss with statistics when ``labels`` is given.

        Empty inputs (B = 0 or T = 0) are valid: the marginal is empty and the loss is 0, still
        connected to every parameter so ``backward`` works. The expert statistics are taken over
        the positions with at least one target; when no position has one (T = 1, or every label
        ignored) over all positions, where the responsibility equals the prior w since nothing
        is observed; with no position at all they are 0.

        Args:
            hidden: (..., T, d) final hidden states of the trunk.
            labels: (..., T) token ids aligned with the input (see the class docstring).
            return_logits: with labels, whether to also compute the (..., T, V) next-token
                scores (``next_token_logits``).
            distill: ``(beta, gamma)`` for teacher-forced self-distillation: the loss becomes
                the mean over positions of sum_k gamma^(k-1) (beta·KL(p_k || q_k) + (1 - beta)·
                NLL_k) (``cpd_mtp.ops.distill.window_distill_loss``), where the teacher p_k of
                offset k at position t is the model's own next-token distribution
                softmax(W_U h_{t+k-1}) from the same ``hidden`` (the trunk is frozen), plus the
                balancing terms. None: the exact joint NLL.

        With a draft vocabulary the experts' softmax runs over its K ids, and targets outside
        them are ignored (marginalised out), since the drafts give them probability 0.

        A ``token_conditioned`` head reads z_t = h_t + C e(x_{t+1}) with x_{t+1} =
        ``labels[..., t + 1]`` (teacher forcing), and scores offsets 2..n only
        (``loss_targets``): the loss of position t is -log sum_a w_a(z_t) prod_{s>=2}
        p_{s,a}(x_{t+s} | z_t), a position whose x_{t+1} is ignored or past the end has no
        target, ``per_head_nll[0]`` is 0 and the distillation window starts at offset 2.

        Returns:
            Without labels: (..., T, V) ``next_token_logits``. With labels: a
            ``CPDMTPHeadOutput``.
        """
        self._check_hidden(hidden)
        if labels is None:
            return self.next_token_logits(hidden)
        cfg = self.config
        if hidden.dim() < 2 or tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])} "
                f"(hidden needs a sequence dimension), got labels {tuple(labels.shape)}"
            )
        # The one label check of a training step; the loss below runs unchecked.
        check_targets(labels, cfg.vocab_size, cfg.ignore_index, "labels")
        # In a narrow dtype ignore_index would wrap (uint8: -100 is 156) and alias a real id.
        labels = labels.to(torch.int64)

        h = hidden.reshape(-1, cfg.hidden_size)  # (N, d)
        targets = self.loss_targets(labels).reshape(-1, cfg.n_future)
        valid = targets != cfg.ignore_index  # (N, n)
        has_target = valid.any(dim=-1)  # (N,)
        if self.draft_ids is not None:  # ids -> positions in the draft vocabulary
            inside = self.draft_position(targets.clamp(min=0)).to(targets.device)
            targets = torch.where(valid, inside, cfg.ignore_index)
        # A token-conditioned head reads z = h + C e(x_{t+1}), x_{t+1} teacher-forced from the
        # labels, and scores offsets 2..n only: its experts of offset 1 are not computed.
        first, has_input = 0, None
        if cfg.token_conditioned:
            first, x_next = 1, next_tokens(labels, cfg.ignore_index).reshape(-1)  # (N,)
            has_input = x_next != cfg.ignore_index
            h = self.conditioned_state(h, torch.where(has_input, x_next, -1))

        gate_logits = self.gate_logits(h)  # (N, r)
        log_w = torch.log_softmax(gate_logits.to(accumulation_dtype(h.dtype)), dim=-1)
        u = self.experts(h, slice(first, cfg.n_future))  # (N, n - first, r, d)
        if torch.is_autocast_enabled(u.device.type):
            u = u.to(torch.get_autocast_dtype(u.device.type))
        weight = self._expert_unembedding()
        weight = weight if weight.dtype == u.dtype else weight.to(u.dtype)
        row_lp = row_logprobs_unchecked(
            u,
            weight,
            targets[:, first:],
            ignore_index=cfg.ignore_index,
            impl=cfg.loss_impl,
            chunk_bytes=cfg.chunk_bytes,
            grad_filter=cfg.grad_filter,
        )  # (N, n - first, r)
        if first:  # offset 1 observes nothing: log-probability 0 for every expert
            row_lp = torch.cat([row_lp.new_zeros(row_lp.shape[0], first, cfg.rank), row_lp], 1)
        nll, gamma = mixture_logsumexp(row_lp, log_w)  # (N,), (N, r)
        # A position without targets has -l_t = -logsumexp(log w) = 0 only up to rounding.
        nll = nll.masked_fill(~has_target, 0.0)

        num_positions = has_target.sum()
        num_targets = valid.sum()
        nll_sum = nll.sum()
        joint_nll = nll_sum / num_positions.clamp(min=1)
        objective, distill_kl = joint_nll, None
        if distill is not None:
            objective, distill_kl = self._distill_objective(
                hidden, u, weight, log_w, row_lp, valid, distill, has_input
            )

        pos_log_w, pos_gamma = log_w[has_target], gamma[has_target]
        aux = cfg.balance_coef * balance_loss(pos_log_w, pos_gamma, cfg.balance)
        if cfg.router_z_coef > 0:
            aux = aux + cfg.router_z_coef * router_z_loss(gate_logits[has_target])

        with torch.no_grad():
            head_lp = torch.logsumexp(log_w[:, None, :] + row_lp, dim=-1)  # (N, n)
            per_head_nll = -(head_lp * valid).sum(0) / valid.sum(0).clamp(min=1)
            # Over the positions with a target, or over all when none has one (gamma = w there).
            stat_rows = has_target | (num_positions == 0)
            stats = expert_statistics(log_w[stat_rows], gamma[stat_rows])

        logits = self.next_token_logits(hidden) if return_logits else None
        return CPDMTPHeadOutput(
            loss=objective + aux,
            logits=logits,
            joint_nll=joint_nll,
            joint_nll_per_target=(nll_sum / num_targets.clamp(min=1)).detach(),
            per_head_nll=per_head_nll,
            aux_loss=aux,
            position_nll=nll.detach().view(labels.shape),
            num_positions=num_positions,
            num_targets=num_targets,
            distill_kl=distill_kl,
            **stats,
        )

    def _distill_objective(
        self,
        hidden: torch.Tensor,
        u: torch.Tensor,
        weight: torch.Tensor,
        log_w: torch.Tensor,
        row_lp: torch.Tensor,
        observed: torch.Tensor,
        distill: tuple[float, float],
        has_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean teacher-forced window loss over positions, and the mean KL per offset (n,).

        ``has_input`` (N,): for a token-conditioned head (whose ``u`` holds offsets 2..n only),
        whether the position has its input x_{t+1}. The window then starts at offset 2, since
        x_{t+1} is the input: offset 1 has no KL term (0 in the per-offset means), and a
        position without x_{t+1} has none at all.
        """
        beta, gamma = distill
        first = 0 if has_input is None else 1
        n_future, seq_len = self.config.n_future, hidden.shape[-2]
        # The teacher of offset k at position t is h_{t+k-1} of the same sequence.
        pad = hidden.new_zeros((*hidden.shape[:-2], n_future, hidden.shape[-1]))
        padded = torch.cat([hidden, pad], dim=-2)  # (..., T + n, d)
        teacher = torch.stack([padded[..., k : k + seq_len, :] for k in range(n_future)], dim=-2)
        position = torch.arange(seq_len, device=hidden.device)
        teacher_ok = (position[:, None] + torch.arange(n_future, device=hidden.device)) < seq_len
        teacher_ok = teacher_ok.expand(*hidden.shape[:-2], seq_len, n_future).reshape(-1, n_future)
        teacher = teacher.reshape(-1, n_future, hidden.shape[-1])
        if first:
            # Offset 1 is the input: no KL, and none at a position without x_{t+1} (where
            # every target is ignored, so ``observed`` is all False).
            teacher_ok = teacher_ok & has_input[:, None]
            teacher_ok[:, :first] = False
        loss, kl, _ = window_distill_loss(
            u,
            weight,
            log_w,
            row_lp[:, first:],
            observed[:, first:],
            teacher[:, first:].to(u.dtype).detach(),
            teacher_ok[:, first:],
            beta=beta,
            gamma=gamma,
            chunk_bytes=self.config.chunk_bytes,
        )
        if first:
            kl = torch.cat([kl.new_zeros(kl.shape[0], first), kl], dim=1)
        counted = teacher_ok.sum(0).clamp(min=1)
        return loss.sum() / max(loss.shape[0], 1), kl.sum(0) / counted

    # ------------------------------------------------------------------ drafting
    @torch.no_grad()
    def draft_state(
        self,
        hidden: torch.Tensor,
        next_token: torch.Tensor | None = None,
        *,
        depth: int | None = None,
        first: tuple[torch.Tensor, torch.Tensor] | None = None,
        unembedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything the conditionals need at one position per row.

        Args:
            hidden: (B, d) hidden state at the last accepted position.
            next_token: (B,) x_{t+1}, the verifier's token: required by a ``token_conditioned``
                head (its gate and experts read it), ignored by the others.
            depth: the offsets computed are 1..depth + 1 (None: all n).
            first: (log_w (B, r), log p_1 (B, r, K)) already computed at ``hidden`` (a
                marginal-mode decoder has them from its verification forward): only offsets
                2.. are computed then.
            unembedding: the (K, d) rows of W_U the experts' softmax runs over, when the caller
                holds them already (a decoder gathers the draft rows once per call).

        Returns:
            log_w: (B, r) log gate weights; log_p: (B, depth + 1, r, K) per-expert
            log-probabilities of offsets 1..depth + 1, float32. For a token-conditioned head
            ``log_p[:, 0]`` is 0: offset 1 is its input, not a draft, so x_{t+1} adds no
            evidence to the posterior over experts.
        """
        self._check_hidden(hidden)
        n = self.config.n_future if depth is None else depth + 1
        if not 1 <= n <= self.config.n_future:
            raise ValueError(f"depth must lie in [0, {self.config.n_future - 1}], got {depth}")
        if self.token_proj is not None:
            z = self.conditioned_state(hidden, next_token)
            log_w = self.log_gate(z)
            if n == 1:
                return log_w, log_w.new_zeros(hidden.shape[0], 1, self.config.rank,
                                              self.config.draft_vocab)  # fmt: skip
            rest = self.expert_log_probs(z, slice(1, n), unembedding)  # (B, n - 1, r, K)
            return log_w, torch.cat([torch.zeros_like(rest[:, :1]), rest], dim=1)
        if first is None:
            return self.log_gate(hidden), self.expert_log_probs(hidden, slice(0, n), unembedding)
        log_w, log_p1 = first
        if n == 1:
            return log_w, log_p1[:, None].float()
        rest = self.expert_log_probs(hidden, slice(1, n), unembedding)
        return log_w, torch.cat([log_p1[:, None].to(rest.dtype), rest], dim=1)

    @staticmethod
    def posterior(
        log_prior: torch.Tensor, log_p: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The posterior over experts after one more observed token (the CP conditional's state).

            log pi'_a = log_softmax_a(log pi_a + log p_a(x))

        Args:
            log_prior: (..., r) log posterior (or log gate weights) before the token.
            log_p: (..., r, K) the experts' log-probabilities at the token's offset.
            positions: (...) the token's index among the K ids; -1 (a token outside the draft
                vocabulary, whose probability the experts do not model) adds no evidence.

        Returns:
            (..., r) log posterior.
        """
        index = positions.clamp(min=0)[..., None, None].expand(*positions.shape, log_p.shape[-2], 1)
        evidence = log_p.gather(-1, index).squeeze(-1)  # (..., r)
        evidence = torch.where((positions >= 0)[..., None], evidence, torch.zeros_like(evidence))
        return torch.log_softmax(log_prior + evidence, dim=-1)

    @staticmethod
    def next_offset(log_posterior: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        """log q(v) = logsumexp_a(log pi_a + log p_a(v)): (..., r) and (..., r, K) -> (..., K)."""
        return torch.logsumexp(log_posterior[..., None] + log_p, dim=-2)

    @staticmethod
    def conditional(
        log_w: torch.Tensor,
        log_p: torch.Tensor,
        chosen: torch.Tensor,
        known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior over experts given the chosen tokens, and the next offset's conditional.

        With k = chosen.shape[-1] tokens x_{t+1..t+k} already chosen:

            log pi_a = log_softmax_a(log w_a + sum_{s<=k} log p_{s,a}(x_{t+s}))
            log q_{k+1}(v) = logsumexp_a(log pi_a + log p_{k+1,a}(v))

        (:meth:`posterior` once per chosen token, then :meth:`next_offset`.)

        Args:
            log_w: (B, r) log gate weights.
            log_p: (B, n, r, V) per-expert log-probabilities.
            chosen: (B, k) token ids (positions in ``log_p``'s last axis), 0 <= k < n.
            known: (B, k) bool; a chosen token marked False adds no evidence (a token outside
                the draft vocabulary, whose probability the experts do not model). None: all.

        Returns:
            log_pi: (B, r); log_q: (B, V), the log-probabilities of x_{t+k+1}.
        """
        k, n_future = chosen.shape[-1], log_p.shape[1]
        if not 0 <= k < n_future:
            raise ValueError(f"chosen must hold 0..{n_future - 1} tokens, got {k}")
        log_pi = torch.log_softmax(log_w, dim=-1)
        for s in range(k):
            positions = (
                chosen[:, s] if known is None else torch.where(known[:, s], chosen[:, s], -1)
            )
            log_pi = CPDMTPHead.posterior(log_pi, log_p[:, s], positions)
        return log_pi, CPDMTPHead.next_offset(log_pi, log_p[:, k])


# ---------------------------------------------------------------------- decoding precision

# Upper bound on the temporary float32 copy of a W_U chunk in ``_unembed_accurate``.
_UPCAST_CHUNK_BYTES = 64 * 2**20


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast where it is on, so upcast matmuls really run in float32."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _unembed_accurate(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits W_U u in float32 (float64 for float64), without rounding them to u's dtype.

    A bf16 / fp16 matmul would round every logit to 8 / 11 mantissa bits: near-equal logits
    would become exact ties, and decoders that see slightly different hidden states (other
    GEMM shapes) would break them differently. So u and W_U are upcast first; W_U in chunks of
    at most ``_UPCAST_CHUNK_BYTES`` vocabulary rows, so no full float32 copy of a large W_U is
    ever held (and none is kept in the model).

    Args:
        u: (..., d) states.
        weight: (V, d) unembedding W_U.

    Returns:
        (..., V) logits, float32 (float64 when u is float64).
    """
    dtype = accumulation_dtype(u.dtype)
    with _autocast_off(u.device.type):
        u = u.to(dtype)
        # A decoder's few expert rows: ``few_row_linear`` reads W_U at bandwidth on a CPU.
        if weight.dtype == dtype:
            return few_row_linear(u, weight)
        rows = max(1, _UPCAST_CHUNK_BYTES // (weight.shape[1] * dtype.itemsize))
        if rows >= weight.shape[0]:
            return few_row_linear(u, weight.to(dtype))
        chunks = weight.split(rows, dim=0)
        return torch.cat([few_row_linear(u, chunk.to(dtype)) for chunk in chunks], dim=-1)
