"""Retrofit a pretrained causal LM with a CP-MTP drafting head, without changing its outputs.

    cpd-mtp retrofit --model path/to/hf_folder_or.gguf --out runs/retrofit --minutes 8
    cpd-mtp retrofit --model M.gguf --out runs/r --rank 4 --distill kl --tokens 200000
    cpd-mtp retrofit --model M.gguf --out runs/r head.expert_type=resblock optim.lr=1e-3
    python -m cpd_mtp.training.retrofit ...          # the same, for launchers (torchrun, deepspeed)

Every setting is a key of ``RetrofitConfig`` (``model``, ``head``, ``data``, ``optim``, ``run``;
``head`` holds every ``CPDMTPConfig`` field), set by a flag or a dotted override. The defaults
are the recipe: n = 4, r = 2, linear experts, a 4096-id draft vocabulary, the model's own
greedy continuations as data (``generated``), 128-token blocks.

The model is loaded (``cpd_mtp.hf.loading.load_causal_lm``) and frozen; only a new head (gate
and experts; W_U is the model's own, frozen) is trained:

1. **Data.** The corpus (``--data``, default the embedded standard-library corpus) is tokenised
   with the model's tokenizer and packed into blocks; ``--tokens`` selects that many tokens of
   training blocks, a function of ``--seed``. ``--distill none`` trains on those blocks with
   the exact joint NLL; ``kl`` adds the teacher-forced KL to the model's own next-token
   distributions (``CPDMTPHead.forward(..., distill=(beta, gamma))``); ``generated`` cuts
   prompts from the blocks, lets the model continue them (greedy, or sampled at
   ``--temperature``) and trains on the continuations (``--tokens`` then counts generated
   tokens); ``generated_kl`` trains on the same continuations with the KL term too (soft
   labels: the model's own distributions along its own text). Validation blocks come from the
   validation split.
2. **Budget.** ``--minutes M`` (``run.minutes``) bounds data, state caching and training
   together (``cpd_mtp.training.budget``): data is made until ``run.data_share`` of the budget
   is spent, counting the state caching still to come, and the steps are what fits in the
   rest, timed on the head itself; ``--tokens`` is then a cap. The plan (blocks, steps) is
   stored with every checkpoint, so a resume trains on the same data to the same step.
3. **Draft vocabulary.** ``--draft-vocab K``: the K most frequent ids of the head's training
   targets.
4. **Training.** The trunk's final hidden states of every block are computed once and
   memory-mapped (``cached_trunk_states``); the head trains on (hidden, labels) batches
   through a DeepSpeed engine (any ZeRO stage, AdamW, warmup + cosine), with ``cpd-mtp
   train``'s crash safety: an exclusive lock on the output folder, refusal to mix with an
   earlier run without ``--resume`` / ``--overwrite``, sealed checkpoints, exact resume (the
   data order is a function of seed and step), ``metrics.jsonl``, progress and validation.
5. **Export.** The drafter alone (``cpd_mtp.hf.export.save_drafter``: the head, its config,
   the tokenizer and the base model's identity, a few MB) to ``<out>/final``;
   ``CPDMTPForCausalLM.from_pretrained`` attaches it to its base. ``--merged`` writes the whole
   model instead (``CPDMTPForCausalLM.from_causal_lm(base, ..., next_token="base")``). In base mode the model's
   forward gives the original model's logits bit for bit: the head only drafts, and
   self-speculative decoding verifies every draft against the original distribution (greedy
   tokens identical up to the precision contract of ``docs/concepts.md``).
6. **Measurement.** The export against the original model's ``generate`` on held-out prompts
   (``run.measure_prompts``), with a plain warning when decoding got slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.training.budget import (
    EXPORT_RESERVE_S,
    TimeBudget,
    blocks_that_fit,
    seconds_per_call,
    steps_that_fit,
)
from cpd_mtp.training.checkpoint import CheckpointError
from cpd_mtp.training.config import (
    DEFAULT_DRAFT_VOCAB,
    GENERATED_MODES,
    KL_MODES,
    RetrofitConfig,
    check_retrofit_config,
    config_to_dict,
    load_retrofit_config,
)
from cpd_mtp.training.engine import deepspeed_config, init_distributed, quiet_library_bars
from cpd_mtp.training.loop import (
    LoopSettings,
    evaluate,
    micro_batch_indices,
    param_groups,
    train_loop,
)
from cpd_mtp.training.run_dir import (
    EXPORT_STAMP,
    OutDirError,
    ResumeRules,
    RunDirectory,
    note,
    sealed_info,
)
from cpd_mtp.training.state_cache import CacheError, sweep_stale_temporaries

__all__ = ["RetrofitConfig", "RetrofitTrainer", "load_retrofit_config", "retrofit"]

IGNORE_INDEX = -100
# Keys of the head's state that the export takes from the wrapped model, not from training.
_SHARED_KEYS = ("weight",)
# What a resume must keep: the model, the head's shape and the data (see ``ResumeRules``).
RETROFIT_RESUME_RULES = ResumeRules(
    # The budget chose the data and the steps: a resume keeps them (stored with the checkpoint).
    fixed=("model.", "head.", "data.", "run.seed", "run.minutes", "run.data_share"),
    free=(
        "head.loss_impl",
        "head.chunk_bytes",
        "head.grad_filter",
        "data.epochs",  # sets the steps: a schedule key
        "data.eval_blocks",
        "data.generate_batch_size",
        "data.state_batch_size",
        "data.cache_dir",
    ),
    schedule=("run.steps", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio"),
)
# A generated budget this far below data.tokens is worth a warning (continuations ending early).
SHORT_BUDGET = 0.5


def select_blocks(num_blocks: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct block ids out of ``num_blocks``, a function of ``seed``, ascending."""
    if not 1 <= count <= num_blocks:
        raise ValueError(f"cannot select {count} of {num_blocks} blocks")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7]))
    return np.sort(rng.choice(num_blocks, size=count, replace=False))


def head_config(cfg: RetrofitConfig, hidden_size: int, vocab_size: int) -> CPDMTPConfig:
    """The head's ``CPDMTPConfig``: every ``head`` key, with the model's sizes; a draft
    vocabulary as large as the model's is the whole vocabulary."""
    settings = dataclasses.asdict(cfg.head)
    k = settings["draft_vocab_size"]
    if k == DEFAULT_DRAFT_VOCAB and k > vocab_size:  # the default on a small vocabulary
        k = settings["draft_vocab_size"] = vocab_size
    if k is not None and k > vocab_size:
        raise ValueError(
            f"head.draft_vocab_size={k} (--draft-vocab) exceeds the model's vocabulary of "
            f"{vocab_size}"
        )
    if k is not None and k == vocab_size:
        settings["draft_vocab_size"] = None
    try:
        return CPDMTPConfig(hidden_size=hidden_size, vocab_size=vocab_size, **settings)
    except ValueError as err:
        raise ValueError(str(err).replace("CPDMTPConfig.", "head.")) from None


def save_tokenizer(tokenizer: Any, cache_dir: str | None) -> Path:
    """The tokenizer saved as a local folder (what ``DataConfig.tokenizer`` reads), cached."""
    from cpd_mtp.training.tokenizer import tokenizer_fingerprint
    from cpd_mtp.utils.files import atomic_directory, cache_root

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


def held_out_prompt_ids(
    cfg: RetrofitConfig, tokenizer: Any, n: int, prompt_tokens: int
) -> list[torch.Tensor]:
    """``n`` prompts of ``prompt_tokens`` tokens from the validation documents of the corpus
    split ``cfg`` trains on (code its head never saw), as 1-D token-id tensors.

    Raises:
        ValueError: the validation split gives no prompt.
    """
    from cpd_mtp.training.data import DataConfig, build_corpus

    data = cfg.data
    corpus = build_corpus(
        DataConfig(
            source=data.source,
            text_field=data.text_field,
            tokenizer=save_tokenizer(tokenizer, data.cache_dir),
            block_size=data.block_size,
            val_fraction=data.val_fraction,
            cache_dir=data.cache_dir,
            max_files=data.max_files,
            progress=False,
        )
    )
    texts = corpus.held_out_prompts(n, prompt_tokens=prompt_tokens)
    if not texts:
        raise ValueError(
            f"the validation split of {len(corpus.validation_files)} document(s) gives no "
            "prompt to measure on; raise --max-files"
        )
    return [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]


# ---------------------------------------------------------------------- the run
class RetrofitTrainer:
    """One retrofit run: base model, data, cached states, head engine, the shared loop, export.

    The run folder (lock, resume, checkpoints, metrics) is a :class:`RunDirectory` and the loop
    :func:`cpd_mtp.training.loop.train_loop`, as for ``cpd-mtp train``; only the batches (cached
    trunk states and labels) and the export (the drafter) are the retrofit's own.
    """

    def __init__(
        self,
        cfg: RetrofitConfig,
        base: tuple[Any, Any] | None = None,
        *,
        data_blocks: int | None = None,
        data_seconds: float = 0.0,
    ) -> None:
        """``base``: the (model, tokenizer) of ``cfg.model.path`` when the caller already loaded
        them (a study training many heads for one model); they are frozen, not copied.

        ``data_blocks`` and ``data_seconds`` (with ``run.minutes``): train on the first
        ``data_blocks`` training blocks, as an earlier run of the same data made them in
        ``data_seconds``, which this run's budget is charged (a study giving every head the
        same data and the same minutes)."""
        check_retrofit_config(cfg)
        self.cfg = cfg
        # The budget's clock starts with the run: loading, data, caching and training count.
        self.budget = (
            TimeBudget(cfg.run.minutes, cfg.run.data_share, time.monotonic() - data_seconds)
            if cfg.run.minutes is not None
            else None
        )
        # The budget's blocks and steps, once known.
        self.plan: dict[str, int] | None = None
        if data_blocks is not None:
            if self.budget is None:
                raise ValueError("data_blocks applies to a run with run.minutes only")
            self.plan = {"blocks": data_blocks}
        self._preloaded = base
        self.rank, self.world, self.device = init_distributed()
        self.run_dir = RunDirectory(cfg.run.out_dir, self.rank, self.world)
        self.out_dir = self.run_dir.path
        self.run_dir.claim(cfg.run.resume, cfg.run.overwrite)
        if self.rank == 0:  # what killed runs left in the caches (a live run's are kept)
            from cpd_mtp.utils.files import cache_root

            sweep_stale_temporaries(cache_root(cfg.data.cache_dir))
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.run_dir.close()

    def _start(self) -> None:
        from cpd_mtp.hf.loading import load_causal_lm

        cfg = self.cfg
        show = cfg.run.progress and self.rank == 0
        self.step = 0
        # A resume is checked against the checkpoint before anything is loaded or computed.
        self.resume_point = None
        if cfg.run.resume:
            self.resume_point = self.run_dir.resume_point(
                self.checkpoint_config(), RETROFIT_RESUME_RULES
            )
            if self.budget is not None:  # the data and steps the budget chose at the start
                self.plan = self._stored_plan(self.resume_point)
        if self._preloaded is not None:
            self.base, self.tokenizer = self._preloaded
        else:
            self.base, self.tokenizer = load_causal_lm(
                cfg.model.path, cfg.model.dtype, progress=show
            )
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

        # Rank 0 builds every cache first (tokens, continuations, states); the others read them,
        # as many training blocks as rank 0 made within a budget.
        deciding = self.budget is not None and self.plan is None
        if self.rank != 0:
            torch.distributed.barrier()
            if deciding:
                self.plan = {"blocks": self._broadcast(0)}
        start = time.perf_counter()
        self.train_data, self.val_data, self.draft_ids = self._build_data(show)
        self.cache_time_s = time.perf_counter() - start
        # Seconds of the budget spent when the data was ready (loading, generation, caching).
        self.data_ready_s = self.budget.seconds - self.budget.left() if self.budget else None
        if self.rank == 0:
            torch.distributed.barrier()
            if deciding:
                self._broadcast(len(self.train_data))

        run, optim = cfg.run, cfg.optim
        torch.manual_seed(run.seed)
        head = self._build_head(lm_head)
        global_batch = run.micro_batch_size * run.grad_accum * self.world
        if self.budget is None:
            steps = run.steps or max(
                1, math.ceil(cfg.data.epochs * len(self.train_data) / global_batch)
            )
        else:
            if "steps" not in (self.plan or {}):
                self.plan = {"blocks": len(self.train_data), "steps": self._steps_in_budget(head)}
            steps = self.plan["steps"]
            if self.rank == 0:
                epochs = steps * global_batch / len(self.train_data)
                note(
                    f"budget {self.budget.minutes:g} min: {len(self.train_data)} training blocks "
                    f"({self.training_tokens:,} target tokens) ready after "
                    f"{self.budget.used_minutes():.1f} min; {steps} steps ({epochs:.1f} epochs) "
                    f"fit in the {max(0.0, self.budget.left()) / 60:.1f} min left"
                )
        warmup = optim.warmup_steps if optim.warmup_steps is not None else max(1, steps // 20)
        # The settings the engine and the schedule use, with the derived ones filled in.
        self.resolved = dataclasses.replace(
            cfg,
            run=dataclasses.replace(run, steps=steps),
            optim=dataclasses.replace(optim, warmup_steps=warmup),
        )
        if self.resume_point is not None:
            schedule = self._checkpoint_info()["schedule"]
            self.run_dir.warn_reshaped_schedule(
                self.resume_point, schedule, RETROFIT_RESUME_RULES, steps
            )
        self.complete = self._run_complete()
        if self.complete:
            return
        import deepspeed

        self.ds_config = deepspeed_config(self.resolved, torch.cuda.is_available())
        self.engine, _, _, _ = deepspeed.initialize(
            model=head,
            model_parameters=param_groups(head, optim.weight_decay),
            config=self.ds_config,
        )
        if self.resume_point is not None:
            client = self.run_dir.load(self.engine, self.resume_point)
            self.step = int(client["step"])
            torch.set_rng_state(client["torch_rng"])
            note(f"resumed from step {self.step} of {steps} (checkpoint {self.resume_point.path})")
            self.run_dir.cut_metrics(self.step)
        elif run.overwrite:
            self.run_dir.give_up_earlier_run()  # only now, with everything built

    def _build_head(self, lm_head: torch.nn.Linear) -> CPDMTPHead:
        """A new head (initialised from the torch seed) over a frozen float32 copy of W_U."""
        # W_U as a frozen float32 copy: the head trains in float32 whatever the model's dtype.
        weight = torch.nn.Parameter(lm_head.weight.detach().float(), requires_grad=False)
        embedding = None
        if self.head_cfg.token_conditioned:
            # The input embedding a token-conditioned head reads x_{t+1} through, frozen and
            # float32 too: W_U's copy itself when the model ties them. Not saved with the head.
            source = self.base.get_input_embeddings().weight
            embedding = weight
            if source is not lm_head.weight:
                embedding = torch.nn.Parameter(source.detach().float(), requires_grad=False)
        head = CPDMTPHead(self.head_cfg, unembedding=weight, token_embedding=embedding)
        if self.draft_ids is not None:
            head.set_draft_vocab(self.draft_ids)
        return head.to(self.device)

    # ------------------------------------------------------------------ the budget
    def _stored_plan(self, point: Any) -> dict[str, int]:
        from cpd_mtp.training import checkpoint

        plan = checkpoint.read_record(self.run_dir.checkpoints, point.tag).get("budget")
        if not isinstance(plan, dict) or {"blocks", "steps"} - set(plan):
            raise CheckpointError(
                f"checkpoint {point.path} stores no budget plan (blocks, steps) to resume "
                "run.minutes with; start a new run"
            )
        return {"blocks": int(plan["blocks"]), "steps": int(plan["steps"])}

    def _steps_in_budget(self, head: CPDMTPHead) -> int:
        """The optimizer steps that fit in what is left of the budget: the head's forward and
        backward timed on a real micro-batch (its gradients dropped after), the validation
        passes and the checkpoints reserved. Every process gets rank 0's answer."""
        run, data = self.cfg.run, self.cfg.data
        distill = (data.beta, data.gamma) if data.distill in KL_MODES else None
        index = np.arange(min(run.micro_batch_size, len(self.train_data)))
        hidden, labels = self.train_data.batch(index, self.device)

        def train_micro() -> None:
            head(hidden, labels, return_logits=False, distill=distill).loss.backward()

        def eval_micro() -> None:
            with torch.no_grad():
                head(hidden, labels, return_logits=False)

        rng = torch.get_rng_state()  # the timing leaves the run's random stream as it was
        step_s = run.grad_accum * seconds_per_call(train_micro)
        head.zero_grad(set_to_none=True)
        eval_s = math.ceil(len(self.val_data) / (run.micro_batch_size * self.world)) * (
            seconds_per_call(eval_micro, repeats=3, warmup=1)
        )
        torch.set_rng_state(rng)
        left = self.budget.left()
        steps = steps_that_fit(left, step_s, 2 * eval_s + EXPORT_RESERVE_S)
        # Validation every eval_every steps and checkpoints every save_every cost time too.
        extra = (steps // run.eval_every) * eval_s + (steps // run.save_every) * EXPORT_RESERVE_S
        return self._broadcast(steps_that_fit(left, step_s, 2 * eval_s + EXPORT_RESERVE_S + extra))

    def _broadcast(self, value: int) -> int:
        """Rank 0's ``value`` on every process."""
        if self.world == 1:
            return value
        shared = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.broadcast(shared, 0)
        return int(shared.item())

    # ------------------------------------------------------------------ resume
    def checkpoint_config(self) -> dict[str, Any]:
        """The settings stored in every checkpoint and compared on resume."""
        return config_to_dict(self.cfg)

    def _checkpoint_info(self) -> dict[str, Any]:
        resolved = config_to_dict(self.resolved)
        info = sealed_info(self.checkpoint_config(), resolved, RETROFIT_RESUME_RULES)
        if self.plan is not None:
            info["budget"] = self.plan
        return info

    def _run_complete(self) -> bool:
        more = "Raise --steps or --epochs to train further."
        return self.run_dir.is_complete(
            self.resume_point, self.resolved.run.steps, self.cfg.run.export, more
        )

    # ------------------------------------------------------------------ data
    def _build_data(self, show: bool) -> tuple[HeadData, HeadData, torch.Tensor | None]:
        from cpd_mtp.training.data import DataConfig, build_corpus
        from cpd_mtp.training.draft_vocab import most_frequent_ids, token_counts
        from cpd_mtp.training.self_distill import distillation_blocks, generate_continuations
        from cpd_mtp.training.state_cache import cached_trunk_states
        from cpd_mtp.utils.files import cache_root

        data = self.cfg.data
        corpus = build_corpus(
            DataConfig(
                source=data.source,
                text_field=data.text_field,
                tokenizer=save_tokenizer(self.tokenizer, data.cache_dir),
                block_size=data.block_size,
                val_fraction=data.val_fraction,
                cache_dir=data.cache_dir,
                max_files=data.max_files,
                progress=show,
            )
        )
        self.corpus = corpus  # its held-out documents give the measurement's prompts
        blocks = corpus.train.blocks
        generated = data.distill in GENERATED_MODES
        per_block = data.block_size - data.prompt_length if generated else data.block_size
        wanted = math.ceil(data.tokens / per_block)
        if wanted > len(blocks):
            raise ValueError(
                f"data.tokens={data.tokens} (--tokens) needs {wanted} training blocks of "
                f"{data.block_size} tokens but the training split has {len(blocks)}; lower "
                "--tokens or --block-size, or add data"
            )
        seed = self.cfg.run.seed
        chosen = np.asarray(blocks[select_blocks(len(blocks), wanted, seed)], dtype=np.int64)
        # In a random order (a function of the seed): a budget that stops early keeps a
        # random part of the corpus, not its first files.
        chosen = chosen[np.random.default_rng([seed, 0x0DE7]).permutation(len(chosen))]
        cache = cache_root(data.cache_dir)
        budget, planned = self.budget, self.plan["blocks"] if self.plan else None
        val_blocks = corpus.validation.blocks
        val = np.asarray(val_blocks[: min(data.eval_blocks, len(val_blocks))], dtype=np.int64)
        # With a budget to size the data by: the seconds the trunk takes per block (its states
        # are cached after the data is made, within the data's share of the budget).
        per_state = self._seconds_per_block(chosen) if budget and planned is None else None
        if per_state is not None and self.rank == 0:
            note(
                f"budget {budget.minutes:g} min: making data until "
                f"{budget.data_share * budget.minutes:.1f} min (run.data_share="
                f"{budget.data_share:g}; the trunk caches a block in {per_state:.2f} s), then "
                "training in what is left"
            )
        if generated:
            prompts = [row[: data.prompt_length].tolist() for row in chosen]
            continuations = generate_continuations(
                self.base,
                prompts,
                data.block_size - data.prompt_length,
                cache,
                temperature=data.temperature,
                batch_size=data.generate_batch_size,
                seed=seed,
                pad_token_id=self.tokenizer.pad_token_id,
                progress=show,
                stop=self._generation_stop(per_state, len(val)) if per_state else None,
                max_examples=planned,
            )
            pad = self.tokenizer.pad_token_id
            ids, labels = distillation_blocks(
                continuations, data.block_size, 0 if pad is None else pad
            )
            made = continuations.generated_tokens
            full = len(continuations.ids) == len(prompts)  # not cut short by the budget
            if full and made < SHORT_BUDGET * data.tokens and self.rank == 0:
                warnings.warn(
                    f"the model generated {made:,} tokens, far below data.tokens={data.tokens:,} "
                    "(--tokens): its continuations end early (EOS); raise --tokens or use "
                    "--distill kl",
                    stacklevel=2,
                )
        else:
            if budget is not None:  # as many blocks as the trunk caches before the deadline
                if planned is None:  # the validation blocks are cached in the same time
                    seconds = budget.data_deadline - time.monotonic() - len(val) * per_state
                    planned = blocks_that_fit(seconds, per_state, len(chosen))
                chosen = chosen[:planned]
            ids, labels = chosen, chosen.copy()
        self.training_tokens = int((labels != IGNORE_INDEX).sum())
        if self.head_cfg.draft_vocab_size is not None:
            targets = labels[labels != IGNORE_INDEX]
            counts = token_counts([targets], self.head_cfg.vocab_size)
            draft_ids = most_frequent_ids(counts, self.head_cfg.draft_vocab_size)
        else:
            draft_ids = None

        def states(array: np.ndarray) -> Any:
            return cached_trunk_states(
                self.base,
                array,
                cache,
                batch_size=data.state_batch_size,
                store_dtype=data.store_dtype,
                progress=show,
            )

        return HeadData(states(ids), labels), HeadData(states(val), val.copy()), draft_ids

    def _seconds_per_block(self, blocks: np.ndarray) -> float:
        """Seconds the trunk takes per block of ``blocks`` (timed on one state batch)."""
        batch = torch.from_numpy(blocks[: self.cfg.data.state_batch_size]).to(self.device)
        with torch.no_grad():
            return seconds_per_call(lambda: self.base(batch), repeats=1, warmup=1) / len(batch)

    def _generation_stop(self, per_block: float, val_blocks: int):
        """When self-generation must stop so that the next batch, then caching the states of
        every block made and of the validation blocks, end by the data deadline."""
        deadline, batch = self.budget.data_deadline, self.cfg.data.generate_batch_size

        def stop(done: int, last_batch_s: float) -> bool:
            cached = (done + batch + val_blocks) * per_block
            return time.monotonic() + last_batch_s + cached > deadline

        return stop

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> dict[str, float | None]:
        """``val/`` + the head's named metrics on the validation blocks, split across processes;
        with a draft vocabulary every NLL counts the targets inside it (``val/draft_coverage``
        is their fraction)."""
        data, per_rank = self.val_data, self.cfg.run.micro_batch_size

        def forward(batch: int):
            start = (batch * self.world + self.rank) * per_rank
            index = np.arange(start, min(start + per_rank, len(data)))
            # One past the end runs a block of its own and drops it (weight 0).
            hidden, labels = data.batch(index if len(index) else np.arange(1), self.device)
            out = self.engine(hidden, labels, return_logits=False)
            return out, labels, float(len(index) > 0)

        batches = math.ceil(len(data) / (per_rank * self.world))
        return evaluate(self.engine, self.engine.module, batches, forward, self.device)

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict[str, float | None]:
        """Run to the last step (or ``stop_after`` more steps); returns the last validation."""
        if getattr(self, "complete", False):
            return {}  # said so at start-up
        cfg, run = self.cfg, self.resolved.run
        distill = (cfg.data.beta, cfg.data.gamma) if cfg.data.distill in KL_MODES else None
        if self.step == 0 and self.resume_point is None:  # the untrained head, as the baseline
            self.run_dir.log({"step": 0, **self.evaluate()})

        def loss_fn(step: int, micro: int):
            index = micro_batch_indices(
                step, micro, self.rank, self.world, run.micro_batch_size, run.grad_accum,
                len(self.train_data), run.seed,
            )  # fmt: skip
            hidden, labels = self.train_data.batch(index, self.device)
            out = self.engine(hidden, labels, return_logits=False, distill=distill)
            return out.loss, out, labels

        settings = LoopSettings.from_run(run, self.world, cfg.data.block_size, "retrofit")
        result = train_loop(
            self.engine, self.engine.module, self.run_dir, settings, self.step, loss_fn,
            self.evaluate, self._checkpoint_info, self.device, stop_after=stop_after,
        )  # fmt: skip
        self.step = result.step
        self.tokens_per_s = result.tokens_per_s
        if self.rank == 0 and self.tokens_per_s is not None:
            blocks, block = len(self.train_data), cfg.data.block_size
            steps_done = result.tokens // settings.tokens_per_step
            print(
                f"trained the head: {steps_done} steps x {settings.tokens_per_step // block} "
                f"blocks of {block} positions = {result.tokens:,} positions in "
                f"{result.train_seconds:.1f} s ({self.tokens_per_s:,.0f} positions/s), over a "
                f"training set of {blocks} blocks holding {self.training_tokens:,} target "
                f"tokens (data.tokens={cfg.data.tokens:,}); states cached in "
                f"{self.cache_time_s:.1f} s",
                flush=True,
            )
            if self.budget is not None:
                print(
                    f"budget: {self.budget.used_minutes():.1f} of {self.budget.minutes:g} "
                    "minutes used (the measurement after the export is not counted)",
                    flush=True,
                )
        if self.step >= run.steps and run.export:
            self.export(self.run_dir.final)
            if run.measure_prompts > 0:
                self.measurement = self.measure()
        return result.last_eval

    # ------------------------------------------------------------------ what it gives
    def measure(self) -> dict[str, Any] | None:
        """Decode held-out prompts with the export against the original model's own
        ``generate`` (greedy, interleaved), print the report and warn when decoding got
        slower; written to ``OUT/measurement.json``. Rank 0 only."""
        from cpd_mtp.decoding.measure import format_report, measure_retrofit, slower_warning
        from cpd_mtp.hf.modeling import CPDMTPForCausalLM
        from cpd_mtp.utils.files import atomic_write_text

        measured = None
        run = self.cfg.run
        if self.rank == 0:
            texts = self.corpus.held_out_prompts(run.measure_prompts, prompt_tokens=48)
            if not texts:
                note("no held-out document gives a prompt to measure on; skipping the measurement")
            else:
                prompts = [self.tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
                model = CPDMTPForCausalLM.from_pretrained(
                    self.run_dir.final, base_model=self.base
                ).eval()
                measured = measure_retrofit(
                    model, self.base, prompts, run.measure_tokens, temperature=None
                )
                print(format_report(measured, len(prompts), run.measure_tokens, 1), flush=True)
                warning = slower_warning(measured)
                if warning is not None:
                    note(warning)
                path = self.run_dir.path / "measurement.json"
                atomic_write_text(path, json.dumps(measured, indent=1) + "\n")
                print(
                    f"measured on {len(prompts)} held-out prompts (more: cpd-mtp measure "
                    f"--model {self.run_dir.final}); written to {path}",
                    flush=True,
                )
        self.run_dir.barrier()
        return measured

    # ------------------------------------------------------------------ export
    def export(self, path: Path) -> None:
        """The drafter (default) or the whole model (``run.merged``) at ``path``.

        ``CPDMTPForCausalLM.from_pretrained(path)`` loads either; in base mode its next-token
        logits are the base model's own. Gathers ZeRO-3 partitions first.
        """
        import deepspeed

        from cpd_mtp.hf.export import save_drafter, save_export
        from cpd_mtp.hf.loading import transformers_progress
        from cpd_mtp.hf.modeling import CPDMTPForCausalLM

        module = self.engine.module
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.cfg.run.zero_stage == 3
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
            settings = self.head_cfg.to_dict()
            for name in ("hidden_size", "vocab_size"):  # from_causal_lm reads the model's
                settings.pop(name)
            model = CPDMTPForCausalLM.from_causal_lm(self.base, freeze_trunk=True, **settings)
            missing, unexpected = model.head.load_state_dict(state, strict=False)
            if set(missing) != set(_SHARED_KEYS) or unexpected:
                raise RuntimeError(
                    f"the trained head does not fit the export: missing {missing}, "
                    f"unexpected {unexpected}"
                )
            extra = {
                "retrofit_config.json": json.dumps(config_to_dict(self.resolved), indent=1),
                EXPORT_STAMP: self.run_dir.export_stamp(self.step),
            }
            with transformers_progress(self.cfg.run.progress):
                if self.cfg.run.merged:
                    save_export(model, self.tokenizer, path, extra_files=extra)
                else:
                    save_drafter(
                        model,
                        self.tokenizer,
                        path,
                        base_source=self.cfg.model.path,
                        extra_files=extra,
                        progress=self.cfg.run.progress,
                    )
            print(f"exported {path}", flush=True)
        torch.distributed.barrier()


def retrofit(
    cfg: RetrofitConfig, stop_after: int | None = None, base: tuple[Any, Any] | None = None
) -> dict[str, float | None]:
    """Run a retrofit per ``cfg``; returns the last validation metrics. ``base``: the
    already-loaded (model, tokenizer) of ``cfg.model.path``, see ``RetrofitTrainer``."""
    trainer = RetrofitTrainer(cfg, base=base)
    try:
        return trainer.train(stop_after=stop_after)
    finally:
        trainer.close()


def run_command(overrides: dict[str, Any]) -> None:
    """``cpd-mtp retrofit``: a bad setting or a taken out_dir is a one-line ``error:`` exit."""
    for key, flag in (("model.path", "--model"), ("run.out_dir", "--out")):
        if overrides.get(key) is None:
            sys.exit(f"error: {flag} ({key}) is required")
    try:
        cfg = load_retrofit_config(overrides)
        check_retrofit_config(cfg)
        quiet_library_bars()
        metrics = retrofit(cfg)
    except (ValueError, FileNotFoundError, OutDirError, CheckpointError, CacheError) as err:
        sys.exit(f"error: {' '.join(str(err).split())}")
    if int(os.environ.get("RANK", 0)) == 0 and metrics:
        print(json.dumps(metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.training.retrofit ...`` is ``cpd-mtp retrofit ...``."""
    from cpd_mtp.training.arguments import add_retrofit_arguments, retrofit_overrides
    from cpd_mtp.utils.args import parse_with_overrides

    parser = argparse.ArgumentParser(prog="cpd-mtp retrofit")
    add_retrofit_arguments(parser)
    run_command(retrofit_overrides(parse_with_overrides(parser, argv)))


if __name__ == "__main__":
    main()
