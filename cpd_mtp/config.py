"""Configuration of a CP-MTP head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

ExpertType = Literal["linear", "resblock", "lowrank"]
BalanceType = Literal["switch", "importance", "none"]
LossImpl = Literal["auto", "reference", "chunked", "triton"]
NextToken = Literal["marginal", "base"]
TokenFusionType = Literal["add", "mlp"]

# Labels with this value are marginalised out (PyTorch's and Hugging Face's convention); the
# default of ``CPDMTPConfig.ignore_index`` and of every data pipeline that builds labels.
IGNORE_INDEX = -100
EXPERT_TYPES = ("linear", "resblock", "lowrank")
BALANCE_TYPES = ("switch", "importance", "none")
LOSS_IMPLS = ("auto", "reference", "chunked", "triton")
NEXT_TOKEN_MODES = ("marginal", "base")


@dataclass
class CPDMTPConfig:
    """Hyper-parameters of a rank-r CP multi-token prediction head.

    Args:
        hidden_size: d, the trunk's hidden size.
        vocab_size: V, the size of the shared unembedding.
        n_future: n, how many future tokens are predicted jointly (n = 1 is a plain LM head).
        rank: r, the number of mixture components (experts). Rank 1 is independent heads.
        expert_type: ``linear`` (u = A h), ``resblock`` (u = h + A SiLU(B h)) or
            ``lowrank`` (u = h + B A h with inner size ``expert_inner_size``).
        expert_inner_size: k for ``lowrank`` experts; ignored by the others.
        expert_init_noise: std of the noise that breaks the symmetry between experts.
        balance: load-balancing loss, ``switch`` (r·Σ f_a P_a), ``importance`` (r·Σ P_a²)
            or ``none``.
        balance_coef: weight of the balancing loss in ``loss``.
        router_z_coef: weight of the router z-loss mean_t (logsumexp_a z_{t,a})².
        ignore_index: label value whose target is marginalised out.
        loss_impl: ``auto`` (``triton`` on CUDA, ``chunked`` elsewhere), ``reference``,
            ``chunked`` or ``triton``.
        chunk_bytes: memory budget of one chunk of logits in the ``chunked`` loss.
        grad_filter: gradient filtering in the ``triton`` loss's backward (off by default):
            vocabulary tiles whose probabilities are all negligible are skipped, within the
            bound of ``docs/kernels.md``. Opt in only for a peaked softmax (a trained model);
            near the start of training it drops most of the gradient's softmax part.
        next_token: which distribution is the model's next-token distribution. ``marginal``:
            the CP marginal sum_a w_a p_{1,a} (models trained with the CP loss). ``base``: the
            wrapped model's own lm_head, softmax(W_U h) (the forward's logits bit for bit);
            the CP head only drafts (retrofits: decoding verifies every draft against it).
        draft_vocab_size: K, the size of the draft vocabulary: the experts' softmax runs over
            K token ids (the head's ``draft_ids``, by default the K most frequent of its
            training tokens), so drafting and head training cost O(K) per expert row; the
            drafts have probability 0 outside them. None (or V) means all V ids. K < V needs
            ``next_token="base"`` (the marginal must cover the whole vocabulary).
        token_conditioned: whether the gate and experts also see the next token x_{t+1}
            (``next_token="base"``, n_future >= 2): they read z = h_t + C e(x_{t+1}) instead of
            h_t, with e the model's own frozen input embedding and C a learned (d, d) map that
            starts at zero (so a new head is the unconditioned one). Offset 1 is then the head's
            input, not a target: it drafts x_{t+2..t+n} given (h_t, x_{t+1}), trained with
            x_{t+1} teacher-forced from the labels and drafting from the verifier's token.
        token_fusion: how a ``token_conditioned`` head fuses h_t and e(x_{t+1})
            (``cpd_mtp.fusion``): ``add`` (z = h + C e) or ``mlp`` (z = h + an MLP of both,
            each at unit scale). Both start as z = h. Ignored without ``token_conditioned``.
    """

    hidden_size: int
    vocab_size: int
    n_future: int = 4
    rank: int = 4
    expert_type: ExpertType = "resblock"
    expert_inner_size: int = 64
    expert_init_noise: float = 1e-2
    balance: BalanceType = "switch"
    balance_coef: float = 0.01
    router_z_coef: float = 0.0
    ignore_index: int = IGNORE_INDEX
    loss_impl: LossImpl = "auto"
    chunk_bytes: int = 64 * 2**20
    grad_filter: bool = False
    next_token: NextToken = "marginal"
    draft_vocab_size: int | None = None
    token_conditioned: bool = False
    token_fusion: TokenFusionType = "add"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "vocab_size", "n_future", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CPDMTPConfig.{name} must be an integer >= 1, got {value!r}")
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(
                f"CPDMTPConfig.expert_type must be one of {EXPERT_TYPES}, got {self.expert_type!r}"
            )
        if self.expert_type == "lowrank" and not (self.expert_inner_size >= 1):
            raise ValueError(
                f"CPDMTPConfig.expert_inner_size must be >= 1, got {self.expert_inner_size!r}"
            )
        if self.balance not in BALANCE_TYPES:
            raise ValueError(
                f"CPDMTPConfig.balance must be one of {BALANCE_TYPES}, got {self.balance!r}"
            )
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(
                f"CPDMTPConfig.loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}"
            )
        for name in ("balance_coef", "router_z_coef", "expert_init_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"CPDMTPConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.grad_filter, bool):
            raise ValueError(
                f"CPDMTPConfig.grad_filter must be True or False, got {self.grad_filter!r}"
            )
        if self.chunk_bytes < 1:
            raise ValueError(f"CPDMTPConfig.chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.next_token not in NEXT_TOKEN_MODES:
            raise ValueError(
                f"CPDMTPConfig.next_token must be one of {NEXT_TOKEN_MODES}, got {self.next_token!r}"
            )
        k = self.draft_vocab_size
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.vocab_size:
                raise ValueError(
                    f"CPDMTPConfig.draft_vocab_size must be an int in [1, vocab_size="
                    f"{self.vocab_size}] or None, got {k!r}"
                )
            if k < self.vocab_size and self.next_token != "base":
                raise ValueError(
                    "CPDMTPConfig.draft_vocab_size < vocab_size needs next_token='base': the "
                    "marginal of a head restricted to a draft vocabulary is 0 outside it"
                )
        if not isinstance(self.token_conditioned, bool):
            raise ValueError(
                "CPDMTPConfig.token_conditioned must be True or False, got "
                f"{self.token_conditioned!r}"
            )
        if self.token_fusion not in ("add", "mlp"):
            raise ValueError(
                f"CPDMTPConfig.token_fusion must be 'add' or 'mlp', got {self.token_fusion!r}"
            )
        if self.token_conditioned and self.next_token != "base":
            raise ValueError(
                "CPDMTPConfig.token_conditioned needs next_token='base': a head that reads "
                "x_{t+1} cannot also be the distribution x_{t+1} is drawn from (the base "
                f"model's lm_head gives it), got next_token={self.next_token!r}"
            )
        if self.token_conditioned and self.n_future < 2:
            raise ValueError(
                "CPDMTPConfig.token_conditioned needs n_future >= 2: offset 1 is the head's "
                f"input, so it drafts offsets 2..n, got n_future={self.n_future}"
            )

    @property
    def draft_vocab(self) -> int:
        """K, the number of ids the experts' softmax runs over (V without a draft vocabulary)."""
        return self.vocab_size if self.draft_vocab_size is None else self.draft_vocab_size

    @property
    def has_draft_vocab(self) -> bool:
        """Whether the experts run over a strict subset of the vocabulary."""
        return self.draft_vocab < self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CPDMTPConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown CPDMTPConfig keys: {sorted(unknown)}")
        return cls(**values)
