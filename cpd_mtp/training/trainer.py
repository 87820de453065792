"""Train a CP-MTP model with DeepSpeed: one CPU, one GPU, or many GPUs across nodes.

    python -m cpd_mtp.training.trainer --preset demo run.steps=500 head.rank=8
    torchrun --nproc_per_node 2 -m cpd_mtp.training.trainer --preset tiny run.zero_stage=3  # CPU, gloo
    deepspeed --num_gpus 8 -m cpd_mtp.training.trainer --preset small                      # GPUs

Every run goes through a DeepSpeed engine (ZeRO stage 0-3 from the package's
``presets/deepspeed/``) with AdamW, warmup + cosine LR, gradient accumulation and clipping.
The data order is a pure function of (seed, step), so ``run.resume=true`` continues a killed
run exactly. Each checkpoint's record stores the run's config: a resume that would change the
model or its data is refused with the key named, one that re-shapes the LR schedule is warned
about, and one of a finished run says so and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.training import checkpoint
from cpd_mtp.training.config import (
    TrainConfig,
    check_config,
    config_help,
    config_to_dict,
    config_to_yaml,
    data_config,
    head_config,
    load_train_config,
)
from cpd_mtp.training.engine import (
    deepspeed_config,
    init_distributed,
    quiet_library_bars,
    silence_dependency_noise,
    use_project_ops_dir,
)
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
    ResumeMismatchError,
    ResumeRules,
    RunDirectory,
    json_line,
    lock_out_dir,
    note,
    sealed_info,
)

__all__ = [
    "OutDirError",
    "ResumeMismatchError",
    "Trainer",
    "build_model",
    "deepspeed_config",
    "json_line",
    "lock_out_dir",
    "micro_batch_indices",
    "silence_dependency_noise",
    "train",
    "use_project_ops_dir",
]


# ---------------------------------------------------------------------- the model
def trunk_config(cfg: TrainConfig, vocab_size: int):
    """The ``LlamaConfig`` of the ``trunk`` section, for a vocabulary of ``vocab_size``."""
    from transformers import LlamaConfig

    t = cfg.trunk
    if t.hidden_size % t.num_heads:
        raise ValueError(
            f"trunk.hidden_size={t.hidden_size} must be divisible by trunk.num_heads={t.num_heads}"
        )
    # Default MLP width: 4 d, rounded up to a multiple of 8.
    intermediate = t.intermediate_size or -(-4 * t.hidden_size // 8) * 8
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads or t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_model(cfg: TrainConfig, vocab_size: int):
    """A Llama-shaped trunk from the preset (or a local model) with a CP head on top."""
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    t = cfg.trunk
    if t.init_from:
        base = base_from_export(t.init_from)
    else:
        if t.vocab_size is not None and t.vocab_size != vocab_size:
            raise ValueError(
                f"trunk.vocab_size={t.vocab_size} does not match the tokenizer's {vocab_size} "
                "tokens; drop trunk.vocab_size or use a matching tokenizer"
            )
        base = AutoModelForCausalLM.from_config(trunk_config(cfg, vocab_size))
    if base.config.vocab_size != vocab_size:
        raise ValueError(
            f"the model has vocab_size={base.config.vocab_size} but the tokenizer has "
            f"{vocab_size} tokens; they must match"
        )
    head = head_config(cfg.head, int(base.config.hidden_size), vocab_size).to_dict()
    for name in ("hidden_size", "vocab_size"):  # from_causal_lm takes them from the model
        head.pop(name)
    return CPDMTPForCausalLM.from_causal_lm(base, freeze_trunk=t.freeze_trunk, **head)


def base_from_export(path: str):
    """A local HF causal LM; from a cpd_mtp export, its trunk and W_U as a plain causal LM
    (``trunk.init_from``; ``cpd_mtp.load_causal_lm`` loads a model to retrofit)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    if AutoConfig.from_pretrained(path, local_files_only=True).model_type != "cpd_mtp":
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    source = CPDMTPForCausalLM.from_pretrained(path, local_files_only=True)
    base = AutoModelForCausalLM.from_config(source.config.text_config)
    base.base_model.load_state_dict(source.trunk.state_dict())
    with torch.no_grad():
        base.get_output_embeddings().weight.copy_(source.head.weight)
    return base


# ---------------------------------------------------------------------- trainer
# What a resume must keep (a trailing "." is a whole section): the model's shape and its data.
TRAIN_RESUME_RULES = ResumeRules(
    fixed=(
        "trunk.",
        "head.",
        "data.source",
        "data.vocab_size",
        "data.tokenizer",
        "data.block_size",
        "data.val_fraction",
        "data.max_files",
        "data.text_field",
    ),
    # Keys under ``fixed`` that only pick how the same loss is computed.
    free=("head.loss_impl", "head.chunk_bytes", "head.grad_filter"),
    schedule=("run.steps", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio"),
)


class Trainer:
    """One ``cpd-mtp train`` run: corpus, model, DeepSpeed engine, the shared loop, export.

    The run folder (lock, resume, checkpoints, metrics) is a :class:`RunDirectory`; the loop
    is :func:`cpd_mtp.training.loop.train_loop`, fed one (input_ids, labels) batch at a time.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        check_config(cfg, torch.cuda.is_available())
        self.rank, self.world, self.device = init_distributed()
        self.run_dir = RunDirectory(cfg.run.out_dir, self.rank, self.world)
        self.out_dir = self.run_dir.path
        self.run_dir.claim(cfg.run.resume, cfg.run.overwrite)
        try:
            self._start()
        except BaseException:
            self.close()  # a run that failed to start must not keep the directory locked
            raise

    def close(self) -> None:
        """Release the lock on out_dir (also released when the process ends)."""
        self.run_dir.close()

    def _start(self) -> None:
        from cpd_mtp.training.data import build_corpus

        cfg, on_gpu = self.cfg, torch.cuda.is_available()
        self.step = 0
        self.wandb = None
        # The checkpoint is checked against the config before anything is built.
        self.resume_point = None
        if cfg.run.resume:
            self.resume_point = self.run_dir.resume_point(
                self.checkpoint_config(), TRAIN_RESUME_RULES
            )
            schedule = self._checkpoint_info()["schedule"]
            self.run_dir.warn_reshaped_schedule(
                self.resume_point, schedule, TRAIN_RESUME_RULES, cfg.run.steps
            )
        self.complete = self._run_complete()
        if self.complete:
            return
        data = data_config(cfg.data, progress=cfg.run.progress and self.rank == 0)
        # Rank 0 builds the caches first; the others then read them.
        if self.rank != 0:
            torch.distributed.barrier()
        self.corpus = build_corpus(data)
        if self.rank == 0:
            torch.distributed.barrier()
        if len(self.corpus.train) == 0:
            raise ValueError("the training split has no full block; lower data.block_size")

        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg, self.corpus.vocab_size)
        import deepspeed

        self.ds_config = deepspeed_config(cfg, on_gpu)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=self.ds_config,
        )
        if self.resume_point is not None:
            self._resume()
        elif cfg.run.overwrite:
            # Only now, with the corpus, model and engine built, is the old run given up.
            self.run_dir.give_up_earlier_run()
        self.wandb = self._init_wandb()

    # ------------------------------------------------------------------ pieces
    @property
    def head(self):
        return self.engine.module.head

    def _batch(self, step: int, micro: int, dataset) -> torch.Tensor:
        run = self.cfg.run
        idx = micro_batch_indices(
            step, micro, self.rank, self.world, run.micro_batch_size, run.grad_accum,
            len(dataset), run.seed,
        )  # fmt: skip
        return torch.stack([dataset[int(i)] for i in idx]).to(self.device)

    def _init_wandb(self):
        run = self.cfg.run
        if self.rank != 0 or run.wandb_project is None:
            return None
        mode = run.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        if mode == "disabled":
            return None
        import wandb

        return wandb.init(
            project=run.wandb_project,
            mode=mode,
            dir=str(self.out_dir),
            config=config_to_dict(self.cfg),
            resume="allow",
        )

    def _log_wandb(self, record: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    # ------------------------------------------------------------------ resume
    def checkpoint_config(self) -> dict[str, Any]:
        """The settings stored in every checkpoint and compared on resume."""
        return config_to_dict(self.cfg)

    def _checkpoint_info(self) -> dict[str, Any]:
        cfg = config_to_dict(self.cfg)
        return sealed_info(cfg, cfg, TRAIN_RESUME_RULES)

    def _run_complete(self) -> bool:
        more = "Raise run.steps to train further."
        return self.run_dir.is_complete(
            self.resume_point, self.cfg.run.steps, self.cfg.run.export, more
        )

    def _resume(self) -> None:
        """Load the resume point into the engine and cut ``metrics.jsonl`` back to its step."""
        point = self.resume_point
        client = self.run_dir.load(self.engine, point)
        self.step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        note(f"resumed from step {self.step} of {self.cfg.run.steps} (checkpoint {point.path})")
        self.run_dir.cut_metrics(self.step)

    # ------------------------------------------------------------------ validation
    def evaluate(self) -> dict[str, float | None]:
        """``val/`` + the head's named metrics (``cpd_mtp.metrics``) on the validation split."""
        run, dataset = self.cfg.run, self.corpus.validation
        per_rank = run.micro_batch_size
        batches = min(run.eval_batches, max(1, len(dataset) // (per_rank * self.world)))

        def forward(b: int):
            start = (b * self.world + self.rank) * per_rank
            idx = [i % len(dataset) for i in range(start, start + per_rank)]
            ids = torch.stack([dataset[i] for i in idx]).to(self.device)
            out = self.engine(input_ids=ids, labels=ids, return_logits=False).cp_output
            return out, ids, 1.0

        return evaluate(self.engine, self.head, batches, forward, self.device)

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict[str, float | None]:
        """Run to ``run.steps`` (or ``stop_after`` steps, to simulate preemption)."""
        run = self.cfg.run
        if getattr(self, "complete", False):
            return {}  # said so at start-up; nothing was built

        def loss_fn(step: int, micro: int):
            ids = self._batch(step, micro, self.corpus.train)
            out = self.engine(input_ids=ids, labels=ids, return_logits=False)
            return out.loss, out.cp_output, ids

        settings = LoopSettings.from_run(run, self.world, self.cfg.data.block_size, "train")
        result = train_loop(
            self.engine, self.head, self.run_dir, settings, self.step, loss_fn, self.evaluate,
            self._checkpoint_info, self.device, stop_after=stop_after, on_record=self._log_wandb,
        )  # fmt: skip
        self.step = result.step
        if self.step >= run.steps and run.export:
            self.export(self.run_dir.final)
        if self.wandb is not None:
            self.wandb.finish()
        return result.last_eval

    def export(self, path: Path) -> None:
        """An HF-format model and tokenizer; gathers ZeRO-3 partitions first.

        Written by ``cpd_mtp.hf.export.save_export``: the tokenizer's bos/eos/pad ids go into the
        model and generation configs, the files into a temporary folder renamed over ``path``
        only when complete, with a SHA-256 record that ``from_pretrained`` checks, and the
        checkpoint it was made from (which a resume compares with its own).
        """
        import deepspeed

        from cpd_mtp.hf.export import save_export

        module = self.engine.module
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.cfg.run.zero_stage == 3
            else nullcontext()
        )
        with gather:
            if self.rank == 0:
                extra = {"train_config.json": json.dumps(config_to_dict(self.cfg), indent=1)}
                if checkpoint.tag_for_step(self.step) in {
                    p.name for p in self.run_dir.checkpoints.glob("step*")
                }:
                    extra[EXPORT_STAMP] = self.run_dir.export_stamp(self.step)
                save_export(module, self.corpus.tokenizer, path, extra_files=extra)
        torch.distributed.barrier()


def train(cfg: TrainConfig, stop_after: int | None = None) -> dict[str, float | None]:
    """Train per ``cfg``; returns the last validation metrics."""
    trainer = Trainer(cfg)
    try:
        return trainer.train(stop_after=stop_after)
    finally:
        trainer.close()


def _one_line(err: BaseException) -> str:
    """An error's message on one line (a dependency's may span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def run_command(
    preset: str,
    overrides: list[str],
    print_config: bool = False,
    parser: argparse.ArgumentParser | None = None,
) -> None:
    """``cpd-mtp train``: every problem is one ``cpd-mtp train: error: ...`` line.

    The whole config is checked before anything heavy (DeepSpeed, the corpus, the model); a
    bad config, a taken out_dir or a checkpoint that does not fit the config exits 2, like
    argparse's own errors; a failure while running (a corrupt checkpoint, a full disk) exits 1.
    ``print_config`` prints the merged config as YAML and exits.
    """
    parser = parser or argparse.ArgumentParser(prog="cpd-mtp train")
    try:
        cfg = load_train_config(preset, overrides)
        check_config(cfg, torch.cuda.is_available())  # before any heavy work
    except (ValueError, FileNotFoundError) as err:
        parser.error(_one_line(err))
    if print_config:
        print(config_to_yaml(cfg), end="")
        return
    quiet_library_bars()
    try:
        metrics = train(cfg)
    except (ValueError, FileNotFoundError) as err:  # OutDirError, ResumeMismatchError, ...
        parser.error(_one_line(err))
    except checkpoint.CheckpointError as err:
        parser.exit(1, f"{parser.prog}: error: {_one_line(err)}\n")
    if int(os.environ.get("RANK", 0)) == 0 and metrics:
        print(json.dumps(metrics, indent=1))


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.training.trainer ...`` is ``cpd-mtp train ...`` (what launchers run)."""
    from cpd_mtp.training.arguments import add_train_arguments, train_overrides
    from cpd_mtp.utils.args import parse_with_overrides

    parser = argparse.ArgumentParser(
        prog="cpd-mtp train",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    args = parse_with_overrides(parser, argv)
    run_command(args.preset, train_overrides(args), args.print_config, parser)


if __name__ == "__main__":
    main()
