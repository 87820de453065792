"""Retrofit a pretrained causal LM with a CP-MTP drafting head, without changing its outputs.

    cpd-mtp retrofit --model path/to/hf_folder_or.gguf --out runs/retrofit \\
        --n-future 4 --rank 4 --tokens 200000 --seed 0 --draft-vocab 8192 --distill kl
    python -m cpd_mtp.training.retrofit ...          # the same, for launchers (torchrun, deepspeed)

The model is loaded (``cpd_mtp.hf.loading.load_causal_lm``) and frozen; only a new head (gate
and experts; W_U is the model's own, frozen) is trained:

1. **Data.** The corpus (``--data``, default the embedded standard-library corpus) is tokenised
   with the model's tokenizer and packed into blocks; ``--tokens`` selects that many tokens of
   training blocks, a function of ``--seed``. ``--distill none`` trains on those blocks with
   the exact joint NLL; ``kl`` adds the teacher-forced KL to the model's own next-token
   distributions (``CPDMTPHead.forward(..., distill=(beta, gamma))``); ``generated`` cuts
   prompts from the blocks, lets the model continue them (greedy, or sampled at
   ``--temperature``) and trains on the continuations (``--tokens`` then counts generated
   tokens). Validation blocks come from the validation split.
2. **Draft vocabulary.** ``--draft-vocab K``: the K most frequent ids of the head's training
   targets.
3. **Training.** The trunk's final hidden states of every block are computed once and
   memory-mapped (``cached_trunk_states``); the head trains on (hidden, labels) batches
   through a DeepSpeed engine (any ZeRO stage, AdamW, warmup + cosine), with ``cpd-mtp
   train``'s crash safety: an exclusive lock on the output folder, refusal to mix with an
   earlier run without ``--resume`` / ``--overwrite``, sealed checkpoints, exact resume (the
   data order is a function of seed and step), ``metrics.jsonl``, progress and validation.
4. **Export.** ``CPDMTPForCausalLM.from_causal_lm(base, ..., next_token="base")`` with the
   trained head, written with the tokenizer to ``<out>/final``. In base mode the model's
   forward gives the original model's logits bit for bit: the head only drafts, and
   self-speculative decoding verifies every draft against the original distribution (greedy
   tokens identical up to the precision contract of ``docs/concepts.md``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import torch

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead, shift_targets
from cpd_mtp.training.checkpoint import CheckpointError
from cpd_mtp.training.config import OptimSettings, RunSettings, TrainConfig
from cpd_mtp.training.trainer import (
    OutDirError,
    Trainer,
    deepspeed_config,
    existing_run,
    init_distributed,
    micro_batch_indices,
    param_groups,
)

DistillMode = Literal["kl", "generated", "none"]
DISTILL_MODES = ("kl", "generated", "none")
IGNORE_INDEX = -100
# Keys of the head's state that the export takes from the wrapped model, not from training.
_SHARED_KEYS = ("weight",)


@dataclass
class RetrofitConfig:
    """Everything a retrofit run needs; ``cpd-mtp retrofit`` flags map onto it by name.

    Attributes:
        model: a local Hugging Face model folder or a ``.gguf`` file.
        out_dir: the run folder: ``metrics.jsonl``, ``checkpoints/``, ``final/`` (the export).
        n_future: n, tokens drafted jointly.
        rank: r, experts of the CP head.
        tokens: the training token budget: tokens of training blocks (``kl``, ``none``) or
            generated tokens (``generated``).
        seed: selects the training blocks, the head's initialisation, the data order and the
            sampling of ``generated`` continuations.
        draft_vocab: K, the draft vocabulary size (the K most frequent training targets);
            None: the whole vocabulary.
        distill: ``kl``, ``generated`` or ``none`` (see the module docstring).
        beta: weight of the KL against the NLL in ``kl`` mode, in [0, 1].
        gamma: decay of the offsets' weights in ``kl`` mode, in (0, 1].
        temperature: ``generated`` mode: 0 continues greedily, > 0 samples.
        prompt_tokens: ``generated`` mode: corpus tokens of each prompt; None: block_size // 4.
        generate_batch_size: prompts per batched ``generate`` call.
        data: the corpus: ``"stdlib"`` (embedded), or a path / glob / directory, or a list.
        max_files: keep only the first ``max_files`` documents (quick runs).
        val_fraction: fraction of documents held out for validation.
        block_size: tokens per block.
        batch_size: blocks per micro-batch per process.
        grad_accum: micro-batches per optimizer step.
        epochs: passes over the selected training blocks (sets the steps).
        steps: optimizer steps; None: ``epochs`` passes over the training blocks.
        lr: peak learning rate (AdamW), reached after ``warmup_steps`` (linear).
        min_lr_ratio: the cosine's floor, as a fraction of ``lr``.
        warmup_steps: linear warmup steps (capped at ``steps``); None: 5% of the steps.
        weight_decay: AdamW weight decay of the head's matrices.
        grad_clip: gradient norm clipping.
        zero_stage: DeepSpeed ZeRO stage, 0-3.
        expert_type: ``linear``, ``resblock`` or ``lowrank`` (``CPDMTPConfig.expert_type``).
        balance_coef: weight of the gate's load-balancing loss (``CPDMTPConfig.balance_coef``).
        eval_every: validate every this many steps (and at the end).
        eval_blocks: validation blocks (at most; the split may hold fewer).
        save_every: checkpoint every this many steps (and at the end).
        keep_checkpoints: sealed checkpoints kept.
        resume: continue the run in ``out_dir`` from its latest sealed checkpoint.
        overwrite: replace the run in ``out_dir``.
        dtype: the base model's dtype (``float32``, ``bfloat16``, ...); None keeps its own.
        store_dtype: dtype of the cached hidden states (``float32`` or ``float16``).
        cache_dir: cache root for tokens, trunk states and continuations; None:
            ``$CPD_MTP_CACHE`` or ``~/.cache/cpd_mtp``.
        state_batch_size: blocks per trunk forward while caching the hidden states.
        export: write ``out_dir/final`` at the end.
        progress: progress bars.
    """

    model: str
    out_dir: str
    n_future: int = 4
    rank: int = 4
    tokens: int = 200_000
    seed: int = 0
    draft_vocab: int | None = None
    distill: DistillMode = "kl"
    beta: float = 0.9
    gamma: float = 0.8
    temperature: float = 0.0
    prompt_tokens: int | None = None
    generate_batch_size: int = 16
    data: Any = "stdlib"
    max_files: int | None = None
    val_fraction: float = 0.03
    block_size: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    steps: int | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0
    expert_type: str = "linear"
    balance_coef: float = 0.01
    eval_every: int = 100
    eval_blocks: int = 32
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    dtype: str | None = None
    store_dtype: str = "float32"
    cache_dir: str | None = None
    state_batch_size: int = 8
    export: bool = True
    progress: bool = True

    @property
    def prompt_length(self) -> int:
        """Corpus tokens of each ``generated`` prompt."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.block_size // 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_retrofit_config(cfg: RetrofitConfig) -> None:
    """Fail before any work on settings that cannot run (one-line ``ValueError`` messages)."""
    from cpd_mtp.config import EXPERT_TYPES
    from cpd_mtp.training.sources import check_max_files

    def positive(name: str) -> None:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    for name in (
        "n_future",
        "rank",
        "tokens",
        "generate_batch_size",
        "block_size",
        "batch_size",
        "grad_accum",
        "eval_every",
        "eval_blocks",
        "save_every",
        "keep_checkpoints",
        "state_batch_size",
    ):
        positive(name)
    for name in ("steps", "draft_vocab", "prompt_tokens"):
        if getattr(cfg, name) is not None:
            positive(name)
    if cfg.distill not in DISTILL_MODES:
        raise ValueError(f"distill must be one of {DISTILL_MODES}, got {cfg.distill!r}")
    if cfg.expert_type not in EXPERT_TYPES:
        raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {cfg.expert_type!r}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if not 0.0 <= cfg.beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {cfg.beta}")
    if not 0.0 < cfg.gamma <= 1.0:
        raise ValueError(f"gamma must lie in (0, 1], got {cfg.gamma}")
    if not 0.0 <= cfg.balance_coef < float("inf"):
        raise ValueError(f"balance_coef must be a finite number >= 0, got {cfg.balance_coef}")
    if not (cfg.temperature >= 0.0 and math.isfinite(cfg.temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {cfg.temperature}")
    if cfg.temperature > 0 and cfg.distill != "generated":
        raise ValueError("temperature applies to --distill generated only")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a finite number > 0, got {cfg.lr}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if (cfg.warmup_steps or 0) < 0 or cfg.weight_decay < 0 or cfg.grad_clip <= 0:
        raise ValueError("warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
    if not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        raise ValueError(f"epochs must be a finite number > 0, got {cfg.epochs}")
    check_max_files(cfg.max_files)
    if cfg.block_size < 2:
        raise ValueError(f"block_size must be >= 2 (offset 1 needs a target), got {cfg.block_size}")
    if cfg.n_future >= cfg.block_size:
        raise ValueError(
            f"n_future={cfg.n_future} must be < block_size={cfg.block_size}: offsets >= the "
            "block size never have a target"
        )
    if cfg.distill == "generated" and not 1 <= cfg.prompt_length < cfg.block_size - 1:
        raise ValueError(
            f"prompt_tokens={cfg.prompt_length} must lie in [1, block_size - 2 = "
            f"{cfg.block_size - 2}] so that each block has room for a continuation"
        )
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other; pick one")
    if cfg.store_dtype not in ("float32", "float16"):
        raise ValueError(f"store_dtype must be float32 or float16, got {cfg.store_dtype!r}")
    if not Path(cfg.model).expanduser().exists():
        raise FileNotFoundError(f"--model {cfg.model} does not exist")


def select_blocks(num_blocks: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct block ids out of ``num_blocks``, a function of ``seed``, ascending."""
    if not 1 <= count <= num_blocks:
        raise ValueError(f"cannot select {count} of {num_blocks} blocks")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7]))
    return np.sort(rng.choice(num_blocks, size=count, replace=False))


def head_config(cfg: RetrofitConfig, hidden_size: int, vocab_size: int) -> CPDMTPConfig:
    """The head's ``CPDMTPConfig`` in base mode, with the draft vocabulary when K < V."""
    k = cfg.draft_vocab
    if k is not None and k > vocab_size:
        raise ValueError(f"--draft-vocab {k} exceeds the model's vocabulary of {vocab_size}")
    return CPDMTPConfig(
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        n_future=cfg.n_future,
        rank=cfg.rank,
        expert_type=cfg.expert_type,
        balance_coef=cfg.balance_coef,
        next_token="base",
        draft_vocab_size=k if k is not None and k < vocab_size else None,
    )


def save_tokenizer(tokenizer: Any, cache_dir: str | None) -> Path:
    """The tokenizer saved as a local folder (what ``DataConfig.tokenizer`` reads), cached."""
    from cpd_mtp.training.tokenizer import cache_root, tokenizer_fingerprint
    from cpd_mtp.utils.files import atomic_directory

    path = cache_root(cache_dir) / "retrofit_tokenizers" / tokenizer_fingerprint(tokenizer)
    if not (path / "tokenizer_config.json").is_file():
        with atomic_directory(path) as tmp:
            tokenizer.save_pretrained(str(tmp))
    return path


@dataclass
class HeadData:
    """Trunk states and labels of a set of blocks: the head's training or validation data.

    ``hidden[i]`` is (T, d) (memory-mapped), ``labels[i]`` (T,) int64 aligned with the ids.
    """

    states: Any  # cpd_mtp.training.state_cache.TrunkStates
    labels: np.ndarray  # (N, T) int64

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, T, d) float32, labels (B, T) int64) of the blocks ``index``."""
        hidden = np.asarray(self.states.hidden[index], dtype=np.float32)
        return (
            torch.from_numpy(hidden).to(device),
            torch.from_numpy(self.labels[index]).to(device),
        )


# ---------------------------------------------------------------------- the run
class RetrofitTrainer(Trainer):
    """One retrofit run: base model, data, cached states, head engine, loop, export.

    It reuses the trainer's run-folder lock, checkpoints (save, sealed; resume with the metrics
    cut back to the checkpoint) and metrics log; ``self.cfg`` is the ``TrainConfig`` view
    (``run`` and ``optim``) those helpers read, ``self.retrofit`` the full settings.
    """

    # What a resume must keep: the model, the data and the head's shape (see ``Trainer``).
    FIXED_KEYS = (
        "model", "data", "max_files", "val_fraction", "block_size", "tokens", "seed",
        "distill", "beta", "gamma", "temperature", "prompt_tokens", "n_future", "rank",
        "draft_vocab", "expert_type", "balance_coef", "dtype", "store_dtype",
    )  # fmt: skip
    FREE_KEYS = ()

    def __init__(self, cfg: RetrofitConfig, base: tuple[Any, Any] | None = None) -> None:
        """``base``: the (model, tokenizer) of ``cfg.model`` when the caller already loaded
        them (a study training many heads for one model); they are frozen, not copied."""
        check_retrofit_config(cfg)
        self.retrofit = cfg
        self._preloaded = base
        self.cfg = _train_view(cfg)
        self.rank, self.world, self.device = init_distributed()
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.wandb = None
        self._lock: IO[str] | None = None
        self._claim_out_dir()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        from cpd_mtp.hf.loading import load_causal_lm

        cfg = self.retrofit
        show = cfg.progress and self.rank == 0
        if self._preloaded is not None:
            self.base, self.tokenizer = self._preloaded
        else:
            self.base, self.tokenizer = load_causal_lm(cfg.model, cfg.dtype, progress=show)
        self.base.requires_grad_(False)
        self.base.eval()
        lm_head = self.base.get_output_embeddings()
        if not isinstance(lm_head, torch.nn.Linear) or lm_head.bias is not None:
            raise ValueError("the model's output embedding must be a bias-free nn.Linear")
        vocab, hidden_size = lm_head.weight.shape
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model only {vocab}"
            )
        self.head_cfg = head_config(cfg, int(hidden_size), int(vocab))

        # Rank 0 builds every cache first (tokens, continuations, states); the others read them.
        if self.rank != 0:
            torch.distributed.barrier()
        start = time.perf_counter()
        self.train_data, self.val_data, self.draft_ids = self._build_data(show)
        self.cache_time_s = time.perf_counter() - start
        if self.rank == 0:
            torch.distributed.barrier()

        torch.manual_seed(cfg.seed)
        # W_U as a frozen float32 copy: the head trains in float32 whatever the model's dtype.
        weight = torch.nn.Parameter(lm_head.weight.detach().float(), requires_grad=False)
        head = CPDMTPHead(self.head_cfg, unembedding=weight)
        if self.draft_ids is not None:
            head.set_draft_vocab(self.draft_ids)
        global_batch = cfg.batch_size * cfg.grad_accum * self.world
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(self.train_data) / global_batch))
        self.cfg.run.steps = steps
        if cfg.warmup_steps is None:
            self.cfg.optim.warmup_steps = max(1, steps // 20)
        # The checkpoint is checked against the settings before the engine is built.
        self.resume_point = self._find_resume_point() if cfg.resume else None
        self.complete = self._run_complete()
        if self.complete:
            return
        import deepspeed

        self.ds_config = deepspeed_config(self.cfg, torch.cuda.is_available())
        self.engine, _, _, _ = deepspeed.initialize(
            model=head,
            model_parameters=param_groups(head, cfg.weight_decay),
            config=self.ds_config,
        )
        self.step = 0
        if cfg.resume:
            self._resume()
        elif cfg.overwrite:
            if self.rank == 0:  # only now, with everything built, is the old run given up
                for name in existing_run(self.out_dir):
                    path = self.out_dir / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            torch.distributed.barrier()

    def checkpoint_config(self) -> dict[str, Any]:
        """The retrofit settings, stored in every checkpoint and compared on resume."""
        return self.retrofit.to_dict()

    # ------------------------------------------------------------------ data
    def _build_data(self, show: bool) -> tuple[HeadData, HeadData, torch.Tensor | None]:
        from cpd_mtp.training.data import DataConfig, build_corpus
        from cpd_mtp.training.draft_vocab import most_frequent_ids, token_counts
        from cpd_mtp.training.self_distill import distillation_blocks, generate_continuations
        from cpd_mtp.training.state_cache import cached_trunk_states
        from cpd_mtp.training.tokenizer import cache_root

        cfg = self.retrofit
        corpus = build_corpus(
            DataConfig(
                source=cfg.data,
                tokenizer=save_tokenizer(self.tokenizer, cfg.cache_dir),
                block_size=cfg.block_size,
                val_fraction=cfg.val_fraction,
                cache_dir=cfg.cache_dir,
                max_files=cfg.max_files,
                progress=show,
            )
        )
        blocks = corpus.train.blocks
        if cfg.distill == "generated":
            new_tokens = cfg.block_size - cfg.prompt_length
            wanted = math.ceil(cfg.tokens / new_tokens)
        else:
            wanted = math.ceil(cfg.tokens / cfg.block_size)
        if wanted > len(blocks):
            raise ValueError(
                f"--tokens {cfg.tokens} needs {wanted} training blocks of {cfg.block_size} "
                f"tokens but the training split has {len(blocks)}; lower --tokens or "
                "--block-size, or add data"
            )
        chosen = np.asarray(blocks[select_blocks(len(blocks), wanted, cfg.seed)], dtype=np.int64)
        cache = cache_root(cfg.cache_dir)
        if cfg.distill == "generated":
            prompts = [row[: cfg.prompt_length].tolist() for row in chosen]
            continuations = generate_continuations(
                self.base,
                prompts,
                cfg.block_size - cfg.prompt_length,
                cache,
                temperature=cfg.temperature,
                batch_size=cfg.generate_batch_size,
                seed=cfg.seed,
                pad_token_id=self.tokenizer.pad_token_id,
                progress=show,
            )
            pad = self.tokenizer.pad_token_id
            ids, labels = distillation_blocks(
                continuations, cfg.block_size, 0 if pad is None else pad
            )
        else:
            ids, labels = chosen, chosen.copy()
        if self.head_cfg.draft_vocab_size is not None:
            targets = labels[labels != IGNORE_INDEX]
            counts = token_counts([targets], self.head_cfg.vocab_size)
            draft_ids = most_frequent_ids(counts, self.head_cfg.draft_vocab_size)
        else:
            draft_ids = None
        val_blocks = corpus.validation.blocks
        val = np.asarray(val_blocks[: min(cfg.eval_blocks, len(val_blocks))], dtype=np.int64)

        def states(array: np.ndarray) -> Any:
            return cached_trunk_states(
                self.base,
                array,
                cache,
                batch_size=cfg.state_batch_size,
                store_dtype=cfg.store_dtype,
                progress=show,
            )

        return HeadData(states(ids), labels), HeadData(states(val), val.copy()), draft_ids

    def _indices(self, step: int, micro: int) -> np.ndarray:
        cfg = self.retrofit
        return micro_batch_indices(
            step,
            micro,
            self.rank,
            self.world,
            cfg.batch_size,
            cfg.grad_accum,
            len(self.train_data),
            cfg.seed,
        )

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Validation joint NLL (per position and per target), per-head NLL, expert usage.

        Over the validation blocks, split across processes; with a draft vocabulary every
        NLL counts the targets inside it (``val/draft_coverage`` is their fraction). A metric
        with no data is None.
        """
        n_future, rank = self.head_cfg.n_future, self.head_cfg.rank
        head = self.engine.module
        data = self.val_data
        sums = np.zeros(6 + 2 * n_future + rank)
        self.engine.eval()
        per_rank = self.retrofit.batch_size
        # Every process runs the same number of forwards (ZeRO-3 gathers are collective); one
        # past the end runs a block of its own and drops it (weight 0).
        for batch in range(math.ceil(len(data) / (per_rank * self.world))):
            start = (batch * self.world + self.rank) * per_rank
            index = np.arange(start, min(start + per_rank, len(data)))
            used = float(len(index) > 0)
            hidden, labels = data.batch(index if len(index) else np.arange(1), self.device)
            out = self.engine(hidden, labels, return_logits=False)
            targets = shift_targets(labels, n_future, IGNORE_INDEX)
            present = targets != IGNORE_INDEX
            inside = present
            if head.draft_ids is not None:
                inside = present & (head.draft_position(targets.clamp(min=0)) >= 0)
            counts = inside.sum(dim=(0, 1)).cpu().numpy() * used
            pos, n_targets = float(out.num_positions) * used, float(out.num_targets) * used
            sums[:6] += [
                float(out.joint_nll) * pos,
                pos,
                float(out.joint_nll_per_target) * n_targets,
                n_targets,
                float(out.gate_entropy) * pos,
                float(present.sum()) * used,
            ]
            sums[6 : 6 + n_future] += out.per_head_nll.cpu().numpy() * counts
            sums[6 + n_future : 6 + 2 * n_future] += counts
            sums[6 + 2 * n_future :] += out.expert_weight.cpu().numpy() * pos
        self.engine.train()
        s = np.array(self._all_reduce(sums.tolist()))

        def ratio(num: float, den: float) -> float | None:
            return float(num / den) if den > 0 else None

        per_head = [ratio(s[6 + k], s[6 + n_future + k]) for k in range(n_future)]
        result: dict[str, float | None] = {
            "val/joint_nll": ratio(s[0], s[1]),
            "val/joint_nll_per_target": ratio(s[2], s[3]),
            "val/gate_entropy": ratio(s[4], s[1]),
            "val/draft_coverage": ratio(s[3], s[5]),
        }
        result.update({f"val/head{k + 1}_nll": v for k, v in enumerate(per_head)})
        usage = s[6 + 2 * n_future :]
        result.update({f"val/expert{a}_weight": ratio(v, s[1]) for a, v in enumerate(usage)})
        return result

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict[str, float | None]:
        """Run to the last step (or ``stop_after`` more steps); returns the last validation."""
        from cpd_mtp.utils.progress import progress

        if getattr(self, "complete", False):
            return {}  # said so at start-up
        cfg, steps = self.retrofit, self.cfg.run.steps
        distill = (cfg.beta, cfg.gamma) if cfg.distill == "kl" else None
        if self.step == 0 and not cfg.resume:  # the untrained head, as the baseline
            record: dict[str, Any] = {"step": 0, **self.evaluate()}
            self._log(record)
        # A bar on a terminal; in a log, a plain line every 5 % (no carriage returns).
        bar = progress(
            total=steps,
            initial=self.step,
            desc="retrofit",
            unit="step",
            disable=self.rank != 0 or not cfg.progress,
        )
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world * cfg.block_size
        tokens, train_time = 0, 0.0
        last_eval: dict[str, float | None] = {}
        done = 0
        while self.step < steps and (stop_after is None or done < stop_after):
            step_start = time.perf_counter()
            sums = np.zeros(4)
            for micro in range(cfg.grad_accum):
                hidden, labels = self.train_data.batch(self._indices(self.step, micro), self.device)
                out = self.engine(hidden, labels, return_logits=False, distill=distill)
                self.engine.backward(out.loss)
                self.engine.step()
                sums += [
                    x.item() for x in (out.loss, out.joint_nll, out.per_head_nll[0], out.aux_loss)
                ]
            self.step += 1
            done += 1
            tokens += tokens_per_step
            step_time = time.perf_counter() - step_start
            train_time += step_time
            loss, joint, next_nll, aux = np.array(self._all_reduce(sums.tolist())) / (
                cfg.grad_accum * self.world
            )
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / train_time:,.0f}")
            bar.update(1)
            record = {
                "step": self.step,
                "loss": loss,
                "joint_nll": joint,
                "head1_nll": next_nll,
                "aux_loss": aux,
                "lr": self.engine.get_lr()[0],
                "tokens_per_s": tokens / train_time,
                "step_time_s": step_time,
            }
            if self.step % cfg.eval_every == 0 or self.step == steps:
                last_eval = self.evaluate()
                self._check_usage(last_eval)
                record.update(last_eval)
                if self.rank == 0:
                    value = last_eval["val/joint_nll_per_target"]
                    shown = "n/a" if value is None else f"{value:.3f}"
                    bar.write(f"step {self.step}: val joint NLL {shown} nats per target")
            self._log(record)
            if self.step % cfg.save_every == 0 or self.step == steps:
                self.save()
        bar.close()
        self.tokens_per_s = tokens / train_time if train_time > 0 else None
        if self.rank == 0 and self.tokens_per_s is not None:
            print(
                f"trained the head on {tokens:,} tokens in {train_time:.1f} s: "
                f"{self.tokens_per_s:,.0f} tokens/s (states cached in {self.cache_time_s:.1f} s)",
                flush=True,
            )
        if self.step >= steps and cfg.export:
            self.export(self.out_dir / "final")
        return last_eval

    # ------------------------------------------------------------------ export
    def export(self, path: Path) -> None:
        """The base model with the trained head, in base mode, and its tokenizer, at ``path``.

        ``CPDMTPForCausalLM.from_pretrained(path)`` loads it; its next-token logits are the
        base model's own. Gathers ZeRO-3 partitions first.
        """
        import deepspeed

        from cpd_mtp.hf.export import save_export
        from cpd_mtp.hf.loading import transformers_progress
        from cpd_mtp.hf.modeling import CPDMTPForCausalLM

        module = self.engine.module
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.retrofit.zero_stage == 3
            else nullcontext()
        )
        with gather:
            if self.rank == 0:
                state = {
                    k: v.detach().clone()
                    for k, v in module.state_dict().items()
                    if k not in _SHARED_KEYS
                }
        if self.rank == 0:
            cfg = self.head_cfg
            model = CPDMTPForCausalLM.from_causal_lm(
                self.base,
                n_future=cfg.n_future,
                rank=cfg.rank,
                freeze_trunk=True,
                expert_type=cfg.expert_type,
                balance_coef=cfg.balance_coef,
                next_token="base",
                draft_vocab_size=cfg.draft_vocab_size,
            )
            missing, unexpected = model.head.load_state_dict(state, strict=False)
            if set(missing) != set(_SHARED_KEYS) or unexpected:
                raise RuntimeError(
                    f"the trained head does not fit the export: missing {missing}, "
                    f"unexpected {unexpected}"
                )
            extra = {"retrofit_config.json": json.dumps(self.retrofit.to_dict(), indent=1)}
            with transformers_progress(self.retrofit.progress):
                save_export(model, self.tokenizer, path, extra_files=extra)
            print(f"exported {path}", flush=True)
        torch.distributed.barrier()


def _train_view(cfg: RetrofitConfig) -> TrainConfig:
    """The ``run`` and ``optim`` sections the trainer's helpers read (steps set later)."""
    run = RunSettings(
        out_dir=cfg.out_dir,
        steps=cfg.steps or 1,
        micro_batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        zero_stage=cfg.zero_stage,
        dtype="fp32",
        eval_every=cfg.eval_every,
        save_every=cfg.save_every,
        keep_checkpoints=cfg.keep_checkpoints,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        seed=cfg.seed,
        wandb_project=None,
        progress=cfg.progress,
        export=cfg.export,
    )
    optim = OptimSettings(
        lr=cfg.lr,
        min_lr_ratio=cfg.min_lr_ratio,
        warmup_steps=cfg.warmup_steps or 1,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
    )
    return TrainConfig(run=run, optim=optim)


def retrofit(
    cfg: RetrofitConfig, stop_after: int | None = None, base: tuple[Any, Any] | None = None
) -> dict[str, float | None]:
    """Run a retrofit per ``cfg``; returns the last validation metrics. ``base``: the
    already-loaded (model, tokenizer) of ``cfg.model``, see ``RetrofitTrainer``."""
    trainer = RetrofitTrainer(cfg, base=base)
    try:
        return trainer.train(stop_after=stop_after)
    finally:
        trainer.close()


def run_command(cfg: RetrofitConfig) -> None:
    """``cpd-mtp retrofit``: a bad setting or a taken out_dir is a one-line ``error:`` exit."""
    try:
        check_retrofit_config(cfg)
        metrics = retrofit(cfg)
    except (ValueError, FileNotFoundError, OutDirError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    if int(os.environ.get("RANK", 0)) == 0 and metrics:
        print(json.dumps(metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.training.retrofit ...`` is ``cpd-mtp retrofit ...``."""
    from cpd_mtp.cli import main as cli_main

    cli_main(["retrofit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
