"""Retrofit a pretrained causal LM with a CP-MTP drafting head, without changing its outputs.

    cpd-mtp retrofit --model path/to/hf_folder_or.gguf --out runs/retrofit --minutes 8
    cpd-mtp retrofit --model M.gguf --out runs/r --prompts my_prompts.jsonl --minutes 20
    cpd-mtp retrofit --model M.gguf --out runs/r head.rank=4 optim.lr=1e-3
    python -m cpd_mtp.training.retrofit ...          # the same, for launchers (torchrun, deepspeed)

Every setting is a key of ``RetrofitConfig`` (``model``, ``head``, ``data``, ``optim``, ``run``;
``head`` holds every ``CPDMTPConfig`` field), set by a flag or a dotted override. The defaults
are the recipe: n = 4, r = 2, linear experts, a head that reads the verifier's next token
through an MLP fusion, a 4,096-id draft vocabulary, the model's own greedy answers to chat
prompts (through its chat template) and code prompts as data.

Three parts, in order:

1. **Data** (``cpd_mtp.training.retrofit_data``): the tokenizer and the corpus first (their
   sizes are checked before the model is loaded), then the model, then its own answers to the
   prompts with the trunk states the decoder computed for them. ``--distill kl`` / ``none``
   train on corpus blocks and their cached trunk states instead.
2. **Training** (``cpd_mtp.training.loop``): the model is built once
   (``CPDMTPForCausalLM.from_causal_lm``, base mode, trunk frozen) and only its head's gate,
   experts and fusion train, through a DeepSpeed engine, in the run folder's crash-safe
   checkpoints (``cpd_mtp.training.run_dir``).
3. **Export and measurement**: the drafter alone (``cpd_mtp.hf.export.save_drafter``) or the
   whole model (``--merged``) to ``<out>/final``; then the model decodes held-out chat and
   code prompts against the original model and the alternatives that need no training
   (``cpd_mtp.decoding.measure``), written to ``<out>/measurement.json``, with a plain warning
   when the head adds nothing.

``--minutes M`` (``cpd_mtp.training.budget``) bounds the whole command, the measurement
included: data until ``run.data_share`` of it, training sized from its real steps and stopped
at its deadline, and ``run.measure_share`` kept for the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.training.budget import (
    EXPORT_RESERVE_S,
    MIN_USEFUL_STEPS,
    MIN_USEFUL_TOKENS,
    TimeBudget,
    blocks_that_fit,
    minutes_for_a_useful_head,
    seconds_per_call,
    steps_that_fit,
)
from cpd_mtp.training.checkpoint import CheckpointError
from cpd_mtp.training.config import (
    DEFAULT_DRAFT_VOCAB,
    GENERATED_MODES,
    KL_MODES,
    MODEL_SIZED_FIELDS,
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
from cpd_mtp.training.retrofit_data import (
    BlockBatches,
    ExampleBatches,
    chat_prompts,
    make_prompts,
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

# What a resume must keep: the model, the head's shape and the data (see ``ResumeRules``).
RETROFIT_RESUME_RULES = ResumeRules(
    # The budget chose the data and the steps: a resume keeps them (stored with the checkpoint).
    fixed=(
        "model.",
        "head.",
        "data.",
        "run.seed",
        "run.minutes",
        "run.data_share",
        "run.measure_share",
    ),
    free=(
        "head.loss_impl",
        "head.chunk_bytes",
        "head.grad_filter",
        "data.epochs",  # sets the steps: a schedule key
        "data.eval_blocks",
        "data.state_batch_size",
        "data.cache_dir",
    ),
    schedule=("run.steps", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio"),
)
# Re-plan a budgeted run's steps from its real ones after this many.
REPLAN_AFTER = 8
# One generated example in this many is held out for validation (at least one).
VALIDATION_EVERY = 32
# The most prompts listed for self-generation.
MAX_PROMPTS = 2048


def select_blocks(num_blocks: int, count: int, seed: int) -> np.ndarray:
    """``count`` distinct block ids out of ``num_blocks``, a function of ``seed``, ascending."""
    if not 1 <= count <= num_blocks:
        raise ValueError(f"cannot select {count} of {num_blocks} blocks")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1EC7]))
    return np.sort(rng.choice(num_blocks, size=count, replace=False))


def retrofit_head_config(cfg: RetrofitConfig, hidden_size: int, vocab_size: int) -> CPDMTPConfig:
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


def load_corpus(cfg: RetrofitConfig, tokenizer: Any, progress: bool = False) -> Any:
    """The corpus of ``cfg.data`` tokenized with the model's tokenizer (cached)."""
    from cpd_mtp.training.data import DataConfig, build_corpus

    data = cfg.data
    return build_corpus(
        DataConfig(
            source=data.source,
            text_field=data.text_field,
            tokenizer=save_tokenizer(tokenizer, data.cache_dir),
            block_size=data.block_size,
            val_fraction=data.val_fraction,
            cache_dir=data.cache_dir,
            max_files=data.max_files,
            progress=progress,
        )
    )


def held_out_prompts(
    cfg: RetrofitConfig, tokenizer: Any, per_kind: int, corpus: Any = None
) -> dict[str, list[torch.Tensor]]:
    """The prompts a retrofit of ``cfg`` never trains on, per kind: chat turns through the
    template (when the model has one and ``data.chat_share`` > 0; ``text`` for the plain
    prompts of a JSONL) and code from the corpus's validation documents; 1-D token-id tensors.

    Raises:
        ValueError: no held-out prompt at all.
    """
    found: dict[str, list[torch.Tensor]] = {}
    if cfg.data.distill in GENERATED_MODES:
        _, held, _, templated = chat_prompts(
            cfg.data, tokenizer, seed=cfg.run.seed, total=0, held=4 * per_kind
        )
        if held:
            found["chat" if templated else "text"] = [
                torch.tensor(p) for p in sorted(held, key=len)[:per_kind]
            ]
    corpus = corpus if corpus is not None else load_corpus(cfg, tokenizer)
    code = corpus.held_out_prompts(per_kind, prompt_tokens=48)
    if code and cfg.data.chat_share < 1.0:
        found["code"] = [tokenizer(t, return_tensors="pt").input_ids[0] for t in code]
    if not found:
        raise ValueError("no held-out prompt to measure on: raise --max-files or give --prompts")
    return found


class _TrainingCopies:
    """The head trains in float32 on copies of the shared W_U and input embedding (ZeRO-3 must
    not partition the trunk's own tensors); :meth:`restore` puts the shared ones back and the
    head's own modules in the model's dtype."""

    def __init__(self, head: CPDMTPHead) -> None:
        self.head = head
        self.weight, self.embedding = head.weight, head.token_embedding
        self.dtype = head.weight.dtype
        copy = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
        head.weight = copy
        if head.token_embedding is not None:
            tied = head.token_embedding is self.weight
            head.token_embedding = (
                copy
                if tied
                else torch.nn.Parameter(
                    head.token_embedding.detach().float().clone(), requires_grad=False
                )
            )
        for module in head.children():  # gate, experts, fusion
            module.float()

    def restore(self) -> None:
        head = self.head
        head.weight = self.weight
        if self.embedding is not None:
            head.token_embedding = self.embedding
        for module in head.children():
            module.to(self.dtype)


# ---------------------------------------------------------------------- the run
class RetrofitTrainer:
    """One retrofit run: data, the model built once, its head trained, export, measurement.

    The run folder (lock, resume, checkpoints, metrics) is a :class:`RunDirectory` and the loop
    :func:`cpd_mtp.training.loop.train_loop`, as for ``cpd-mtp train``.

    Args:
        cfg: the run's config.
        base: the (model, tokenizer) of ``cfg.model.path`` when the caller already loaded them
            (a study training many heads for one model); frozen, not copied.
        data_examples: train on the first this many examples (or blocks), as an earlier run
            of the same data made them in ``data_seconds``, which this run's budget is charged
            (a study giving every head the same data and the same minutes).
        clock: the budget's clock (``time.monotonic``; a test gives its own).
    """

    def __init__(
        self,
        cfg: RetrofitConfig,
        base: tuple[Any, Any] | None = None,
        *,
        data_examples: int | None = None,
        data_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_retrofit_config(cfg)
        self.cfg = cfg
        self.clock = clock
        run = cfg.run
        self.budget = None
        if run.minutes is not None:
            share = run.measure_share if run.measure_prompts > 0 else 0.0
            self.budget = TimeBudget(
                run.minutes, run.data_share, clock() - data_seconds, share, clock
            )
        self.plan: dict[str, int] | None = None
        if data_examples is not None:
            if self.budget is None:
                raise ValueError("data_examples applies to a run with run.minutes only")
            self.plan = {"examples": data_examples}
        self._preloaded = base
        self.measurement: dict[str, Any] | None = None
        self.rank, self.world, self.device = init_distributed()
        self.run_dir = RunDirectory(run.out_dir, self.rank, self.world)
        self.out_dir = self.run_dir.path
        self.run_dir.claim(run.resume, run.overwrite)
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

    def _say(self, message: str) -> None:
        if self.rank == 0:
            note(message)

    # ------------------------------------------------------------------ set-up
    def _start(self) -> None:
        from cpd_mtp.hf.loading import load_causal_lm, load_tokenizer_only
        from cpd_mtp.hf.modeling import CPDMTPForCausalLM

        cfg = self.cfg
        show = cfg.run.progress and self.rank == 0
        self.step = 0
        self.resume_point = None
        if cfg.run.resume:  # checked against the checkpoint before anything is loaded
            self.resume_point = self.run_dir.resume_point(
                self.checkpoint_config(), RETROFIT_RESUME_RULES
            )
            if self.budget is not None:  # the data and steps the budget chose at the start
                self.plan = self._stored_plan(self.resume_point)
        # The tokenizer and the corpus first: a corpus too small is said before the model loads.
        tokenizer = (
            self._preloaded[1]
            if self._preloaded is not None
            else load_tokenizer_only(cfg.model.path)
        )
        self.tokenizer = tokenizer
        self.corpus = load_corpus(cfg, tokenizer, progress=show)
        generated = cfg.data.distill in GENERATED_MODES
        if not generated:
            self._check_block_counts()
        if self._preloaded is not None:
            self.base = self._preloaded[0]
        else:
            self.base, _ = load_causal_lm(
                cfg.model.path, cfg.model.dtype, progress=show, tokenizer=False
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
        self.head_cfg = retrofit_head_config(cfg, int(hidden_size), int(vocab))
        # The model, once: it makes the data, trains its head, is exported and measured.
        settings = {k: v for k, v in self.head_cfg.to_dict().items() if k not in MODEL_SIZED_FIELDS}
        torch.manual_seed(cfg.run.seed)
        self.model = CPDMTPForCausalLM.from_causal_lm(self.base, freeze_trunk=True, **settings)
        self.model.eval()
        set_special_tokens_from(self.model, self.tokenizer)
        self.setup_s = self.budget.seconds - self.budget.left() if self.budget else 0.0

        # Rank 0 makes the data (the caches); the others read it: as much as rank 0 made.
        deciding = self.budget is not None and self.plan is None
        if self.rank != 0:
            torch.distributed.barrier()
            if deciding:
                self.plan = {"examples": self._broadcast(0)}
        start = time.perf_counter()
        self.train_data, self.val_data, draft_ids = (
            self._generated_data(show) if generated else self._block_data(show)
        )
        self.data_s = time.perf_counter() - start
        if self.rank == 0:
            torch.distributed.barrier()
            if deciding:
                self._broadcast(self.data_items)
        if draft_ids is not None:
            self.model.head.set_draft_vocab(draft_ids)
        self.training_tokens = self.train_data.target_tokens
        if self.training_tokens < MIN_USEFUL_TOKENS and self.budget is None and self.rank == 0:
            note(
                f"warning: the data holds {self.training_tokens:,} target tokens, too few for a "
                f"useful head (about {MIN_USEFUL_TOKENS:,} at least): raise --tokens, or give "
                "more prompts or a larger corpus"
            )
        self._plan_steps()

    def _check_block_counts(self) -> None:
        """``kl`` / ``none`` modes: enough corpus blocks for ``data.tokens`` (a cap under a
        budget: the corpus's size is used and said)."""
        data = self.cfg.data
        blocks = len(self.corpus.train.blocks)
        wanted = math.ceil(data.tokens / data.block_size)
        if wanted > blocks:
            if self.budget is None:
                raise ValueError(
                    f"data.tokens={data.tokens} (--tokens) needs {wanted} training blocks of "
                    f"{data.block_size} tokens but the training split has {blocks}; lower "
                    "--tokens or --block-size, or add data"
                )
            self._say(
                f"data.tokens={data.tokens:,} is more than the corpus holds: using all "
                f"{blocks} training blocks ({blocks * data.block_size:,} tokens)"
            )

    # ------------------------------------------------------------------ data
    def _generated_data(self, show: bool) -> tuple[ExampleBatches, ExampleBatches, Any]:
        """The model's own answers to chat and code prompts, with their trunk states."""
        from cpd_mtp.training.self_generate import generate_examples
        from cpd_mtp.utils.files import cache_root

        cfg, data = self.cfg, self.cfg.data
        blocks = np.asarray(self.corpus.train.blocks)
        code = self.corpus.held_out_prompts(cfg.run.measure_prompts or 1, prompt_tokens=48)
        # Enough prompts for data.tokens at a short answer each (a budget stops before); at
        # most 2,048 (answers average well over 48 tokens, and each chat prompt is templated).
        total = min(max(64, math.ceil(data.tokens / 48)), MAX_PROMPTS)
        prompts = make_prompts(
            data,
            self.tokenizer,
            blocks if data.chat_share < 1.0 else None,
            code,
            seed=cfg.run.seed,
            total=total,
            measure_prompts=cfg.run.measure_prompts,
        )
        for line in prompts.notes:
            self._say(line)
        self.held_out = prompts.held_out
        # Prompt and answer within the positions the model was trained on.
        limit = getattr(self.base.config, "max_position_embeddings", None) or 10**9
        new_tokens = min(data.new_tokens, max(1, limit // 2))
        train_ids = [p for p in prompts.train if len(p) + new_tokens <= limit]
        planned = self.plan["examples"] if self.plan else None
        budget = self.budget
        deadline = budget.data_deadline if budget is not None and planned is None else None
        if deadline is not None and self.clock() > deadline:
            raise ValueError(
                f"--minutes {budget.minutes:g} is spent before any data is made (loading took "
                f"{self.setup_s:.0f} s): give at least "
                f"{math.ceil(2 * self.setup_s / 60 / budget.data_share) / 2:g} minutes"
            )
        self._say(
            f"data: the model answers {prompts.count('chat'):,} chat and "
            f"{prompts.count('code'):,} code prompts"
            + (f" until {budget.data_share * budget.minutes:.1f} min" if deadline else "")
            + f" (at most {data.tokens:,} new tokens, {new_tokens} per answer)"
        )
        made: list[int] = []

        def progress(done: int, total: int, tokens: int, seconds: float) -> None:
            made.append(tokens)
            if show:
                print(
                    f"  self-generation: {done:,} answers, {tokens:,} new tokens in "
                    f"{seconds:.0f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)",
                    flush=True,
                )

        examples = generate_examples(
            self.model,
            train_ids,
            new_tokens,
            cache_root(data.cache_dir),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            batch_size=data.generate_batch_size,
            store_dtype=data.store_dtype,
            deadline=deadline,
            max_tokens=None if planned else data.tokens,
            max_examples=planned,
            reuse_cut=planned is not None,
            progress=progress,
            clock=self.clock,
        )
        if planned is not None and len(examples) < planned:
            raise CacheError(
                f"the resumed run trained on {planned} examples but only {len(examples)} are "
                "in the cache"
            )
        self.data_rate = examples.made / examples.seconds if examples.seconds > 0 else None
        self.data_cut = examples.cut
        self.data_items = len(examples)  # what a resume or a study's next head reads back
        if self.rank == 0 and examples.seconds > 0:
            print(
                f"data: {len(examples):,} answers, {examples.generated_tokens:,} target tokens "
                f"({examples.made:,} made in {examples.seconds:.0f} s, "
                f"{self.data_rate:,.0f} tokens/s"
                + (", cut by the budget" if examples.cut else "")
                + ")",
                flush=True,
            )
        every = range(len(examples))
        val = [i for i in every if i % VALIDATION_EVERY == VALIDATION_EVERY - 1] or [
            len(examples) - 1
        ]
        train = [i for i in every if i not in set(val)] or list(every)
        train_data = ExampleBatches(examples, train, data.max_positions)
        val_data = ExampleBatches(examples, val[: data.eval_blocks], data.max_positions)
        draft_ids = self._draft_vocab(train_data.answer_ids())
        return train_data, val_data, draft_ids

    def _block_data(self, show: bool) -> tuple[BlockBatches, BlockBatches, Any]:
        """Corpus blocks and their cached trunk states (``kl`` / ``none``)."""
        from cpd_mtp.training.state_cache import cached_trunk_states
        from cpd_mtp.utils.files import cache_root

        data = self.cfg.data
        blocks = self.corpus.train.blocks
        self.held_out = {}
        wanted = min(math.ceil(data.tokens / data.block_size), len(blocks))
        seed = self.cfg.run.seed
        chosen = np.asarray(blocks[select_blocks(len(blocks), wanted, seed)], dtype=np.int64)
        # In a random order (a function of the seed): a budget that stops early keeps a
        # random part of the corpus, not its first files.
        chosen = chosen[np.random.default_rng([seed, 0x0DE7]).permutation(len(chosen))]
        val_blocks = self.corpus.validation.blocks
        val = np.asarray(val_blocks[: min(data.eval_blocks, len(val_blocks))], dtype=np.int64)
        planned = self.plan["examples"] if self.plan else None
        if planned is not None:
            chosen = chosen[:planned]
        elif self.budget is not None:  # as many as the trunk caches before the data deadline
            batch = torch.from_numpy(chosen[: data.state_batch_size]).to(self.device)
            with torch.no_grad():
                per_block = seconds_per_call(lambda: self.base(batch), repeats=1, warmup=1) / len(
                    batch
                )
            seconds = self.budget.data_deadline - self.clock() - len(val) * per_block
            chosen = chosen[: blocks_that_fit(seconds, per_block, len(chosen))]

        def states(array: np.ndarray) -> Any:
            return cached_trunk_states(
                self.base,
                array,
                cache_root(data.cache_dir),
                batch_size=data.state_batch_size,
                store_dtype=data.store_dtype,
                progress=show,
            )

        start = time.perf_counter()
        self.data_items = len(chosen)
        train = BlockBatches(states(chosen), chosen.copy())
        self.data_rate = train.target_tokens / max(time.perf_counter() - start, 1e-9)
        self.data_cut = planned is None and self.budget is not None
        draft_ids = self._draft_vocab([chosen])
        return train, BlockBatches(states(val), val.copy()), draft_ids

    def _draft_vocab(self, targets: list[np.ndarray]) -> torch.Tensor | None:
        from cpd_mtp.training.draft_vocab import most_frequent_ids, token_counts

        if self.head_cfg.draft_vocab_size is None:
            return None
        counts = token_counts(targets, self.head_cfg.vocab_size)
        return most_frequent_ids(counts, self.head_cfg.draft_vocab_size)

    # ------------------------------------------------------------------ the plan
    def _plan_steps(self) -> None:
        cfg, run, optim = self.cfg, self.cfg.run, self.cfg.optim
        global_batch = run.micro_batch_size * run.grad_accum * self.world
        self.copies = _TrainingCopies(self.model.head)
        head = self.model.head.to(self.device)
        if self.budget is None:
            steps = run.steps or max(
                1, math.ceil(cfg.data.epochs * len(self.train_data) / global_batch)
            )
        else:
            if "steps" not in (self.plan or {}):
                self.plan = {"examples": self.data_items, "steps": self._steps_in_budget(head)}
            steps = self.plan["steps"]
            if self.rank == 0:
                epochs = steps * global_batch / max(len(self.train_data), 1)
                note(
                    f"budget {self.budget.minutes:g} min: {len(self.train_data)} training "
                    f"examples ({self.training_tokens:,} target tokens) ready after "
                    f"{self.budget.used_minutes():.1f} min; {steps} steps ({epochs:.1f} epochs) "
                    f"fit before the export and the measurement"
                )
        warmup = optim.warmup_steps if optim.warmup_steps is not None else max(1, steps // 20)
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

    def _stored_plan(self, point: Any) -> dict[str, int]:
        from cpd_mtp.training import checkpoint

        plan = checkpoint.read_record(self.run_dir.checkpoints, point.tag).get("budget")
        if not isinstance(plan, dict) or {"examples", "steps"} - set(plan):
            raise CheckpointError(
                f"checkpoint {point.path} stores no budget plan (examples, steps) to resume "
                "run.minutes with; start a new run"
            )
        return {"examples": int(plan["examples"]), "steps": int(plan["steps"])}

    def _steps_in_budget(self, head: CPDMTPHead) -> int:
        """The optimizer steps that fit before the training deadline, from the head's forward
        and backward timed on a real micro-batch (its gradients dropped after), the validation
        passes and the checkpoints reserved; warns when that is too few for a useful head.
        Every process gets rank 0's answer."""
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
        self.step_s = run.grad_accum * seconds_per_call(train_micro)
        head.zero_grad(set_to_none=True)
        self.eval_s = math.ceil(len(self.val_data) / (run.micro_batch_size * self.world)) * (
            seconds_per_call(eval_micro, repeats=3, warmup=1)
        )
        torch.set_rng_state(rng)
        left = self.budget.train_deadline - self.clock()
        steps = steps_that_fit(left, self.step_s, 2 * self.eval_s + EXPORT_RESERVE_S)
        extra = (steps // run.eval_every) * self.eval_s + (
            steps // run.save_every
        ) * EXPORT_RESERVE_S
        steps = steps_that_fit(left, self.step_s, 2 * self.eval_s + EXPORT_RESERVE_S + extra)
        few_tokens = self.training_tokens < MIN_USEFUL_TOKENS
        if few_tokens and not self.data_cut and self.rank == 0:  # the data ran out, not the time
            note(
                f"warning: the data holds {self.training_tokens:,} target tokens (data.tokens="
                f"{self.cfg.data.tokens:,}, or all the prompts give), too few for a useful head "
                f"(about {MIN_USEFUL_TOKENS:,} at least): raise --tokens or give more prompts"
            )
        elif (steps < MIN_USEFUL_STEPS or few_tokens) and self.rank == 0:
            minutes = minutes_for_a_useful_head(
                self.setup_s,
                self.data_rate or 1.0,
                self.step_s,
                self.budget.data_share,
                self.budget.measure_share,
            )
            note(
                f"warning: --minutes {self.budget.minutes:g} leaves {steps} training steps over "
                f"{self.training_tokens:,} target tokens, too little for a useful head (it needs "
                f"about {MIN_USEFUL_STEPS} steps over {MIN_USEFUL_TOKENS:,} tokens): give about "
                f"{minutes:g} minutes (measured here: loading {self.setup_s:.0f} s, data "
                f"{self.data_rate or 0:,.0f} tokens/s, a step {self.step_s:.2f} s)"
            )
        return self._broadcast(steps)

    def _replan(self, step: int, mean_step_s: float) -> int | None:
        """After ``REPLAN_AFTER`` real steps, the total the training deadline holds at their
        pace; the LR schedule and the stored plan follow. Only a fresh budgeted run re-plans
        (a resume trains the stored plan)."""
        if self.budget is None or self.resume_point is not None or step != REPLAN_AFTER:
            return None
        run = self.cfg.run
        left = self.budget.train_deadline - self.clock()
        evals = self.eval_s * (1 + (self.plan["steps"] // run.eval_every))
        more = max(0, int((left - evals - EXPORT_RESERVE_S) / mean_step_s))
        total = self._broadcast(step + more)
        if total != self.plan["steps"]:
            self.plan["steps"] = total
            self.resolved = dataclasses.replace(
                self.resolved, run=dataclasses.replace(self.resolved.run, steps=total)
            )
            self.engine.lr_scheduler.total_num_steps = total
        return total

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

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> dict[str, float | None]:
        """``val/`` + the head's named metrics on the validation data, split across processes;
        with a draft vocabulary every NLL counts the targets inside it."""
        data, per_rank = self.val_data, self.cfg.run.micro_batch_size

        def forward(batch: int):
            start = (batch * self.world + self.rank) * per_rank
            index = np.arange(start, min(start + per_rank, len(data)))
            # One past the end runs a batch of its own and drops it (weight 0).
            hidden, labels = data.batch(index if len(index) else np.arange(1), self.device)
            out = self.engine(hidden, labels, return_logits=False)
            return out, labels, float(len(index) > 0)

        batches = math.ceil(len(data) / (per_rank * self.world))
        return evaluate(self.engine, self.engine.module, batches, forward, self.device)

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict[str, float | None]:
        """Run to the last step (or ``stop_after`` more steps); export and measure at the end.
        Returns the last validation."""
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

        positions = self.train_data.positions_per_item
        settings = LoopSettings.from_run(run, self.world, positions, "retrofit")
        if self.budget is not None and self.resume_point is None:
            settings.deadline = self.budget.train_deadline
        result = train_loop(
            self.engine, self.engine.module, self.run_dir, settings, self.step, loss_fn,
            self.evaluate, self._checkpoint_info, self.device, stop_after=stop_after,
            replan=self._replan, clock=self.clock,
        )  # fmt: skip
        self.step = result.step
        self.tokens_per_s = result.tokens_per_s
        if self.rank == 0 and self.tokens_per_s is not None:
            print(
                f"trained the head: {result.step} steps, {result.tokens:,} positions in "
                f"{result.train_seconds:.1f} s ({self.tokens_per_s:,.0f} positions/s), over "
                f"{len(self.train_data)} training items holding {self.training_tokens:,} "
                f"target tokens (data made in {self.data_s:.0f} s)",
                flush=True,
            )
        finished = self.step >= settings.steps
        if finished:
            self.copies.restore()
        if finished and run.export:
            self.export(self.run_dir.final)
            if run.measure_prompts > 0:
                self.measurement = self.measure()
        if self.budget is not None:
            self.used_minutes = self.budget.used_minutes()
            if self.rank == 0:
                print(
                    f"budget: {self.used_minutes:.1f} of {self.budget.minutes:g} minutes used, "
                    "the measurement included",
                    flush=True,
                )
        return result.last_eval

    # ------------------------------------------------------------------ what it gives
    def measure(self) -> dict[str, Any] | None:
        """Decode the held-out prompts with the model against the original model and the
        alternatives that need no training (``cpd_mtp.decoding.measure``), print the report and
        warn when the head adds nothing; written to ``OUT/measurement.json``. Rank 0 only."""
        from cpd_mtp.decoding.measure import format_report, head_adds_nothing, measure_decoders
        from cpd_mtp.utils.files import atomic_write_text

        measured = None
        run = self.cfg.run
        if self.rank == 0:
            prompts = {k: v[: run.measure_prompts] for k, v in (self.held_out or {}).items()}
            if not prompts:
                code = self.corpus.held_out_prompts(run.measure_prompts, prompt_tokens=48)
                if code:
                    prompts = {"code": [self.tokenizer(t, return_tensors="pt").input_ids[0]
                                        for t in code]}  # fmt: skip
            if not prompts:
                note("no held-out prompt to measure on; skipping the measurement")
            else:
                deadline = self.budget.end - 1.0 if self.budget is not None else None
                measured = measure_decoders(
                    self.model,
                    self.base,
                    prompts,
                    run.measure_tokens,
                    deadline=deadline,
                    progress=(lambda line: print(f"  {line}", flush=True))
                    if run.progress
                    else None,
                    deadline_clock=self.clock,
                )
                print(format_report(measured, run.measure_tokens), flush=True)
                warning = head_adds_nothing(measured)
                if warning is not None:
                    note(warning)
                path = self.run_dir.path / "measurement.json"
                atomic_write_text(path, json.dumps(measured, indent=1) + "\n")
                print(
                    f"measured on held-out prompts (more: cpd-mtp measure --model "
                    f"{self.run_dir.final}); written to {path}",
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

        module = self.engine.module
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.cfg.run.zero_stage == 3
            else nullcontext()
        )
        with gather:
            if self.rank == 0:
                extra = {
                    "retrofit_config.json": json.dumps(config_to_dict(self.resolved), indent=1),
                    EXPORT_STAMP: self.run_dir.export_stamp(self.step),
                }
                with transformers_progress(self.cfg.run.progress):
                    if self.cfg.run.merged:
                        save_export(self.model, self.tokenizer, path, extra_files=extra)
                    else:
                        save_drafter(
                            self.model,
                            self.tokenizer,
                            path,
                            base_source=self.cfg.model.path,
                            extra_files=extra,
                            progress=self.cfg.run.progress,
                        )
                print(f"exported {path}", flush=True)
        torch.distributed.barrier()


def set_special_tokens_from(model: Any, tokenizer: Any) -> None:
    """The tokenizer's EOS / pad ids on the model's configs (what the export writes too)."""
    from cpd_mtp.hf.export import set_special_tokens

    set_special_tokens(model, tokenizer)


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
    except (
        ValueError,
        FileNotFoundError,
        OutDirError,
        CheckpointError,
        CacheError,
        RuntimeError,
    ) as err:
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
