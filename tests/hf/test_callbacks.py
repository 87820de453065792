"""``CPDMTPMetricsCallback`` under the Hugging Face ``Trainer`` (tiny Llama, CPU).

References are computed outside the head's loss path: ``torch.nn.functional.cross_entropy`` on
the model's next-token logits, the per-offset marginal built from ``log_gate`` and
``expert_log_probs``, and the gate's softmax averaged by hand. With ``learning_rate=0`` the
model does not move, so every logged step can be checked against the same references.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from cpd_mtp.hf import CPDMTPForCausalLM, CPDMTPMetricsCallback, add_metrics_callback

hf_logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB, N_FUTURE, RANK, SEQ, ROWS = 128, 3, 4, 12, 8
IGNORE = -100


def _model(tiny_llama_config, **head_kwargs) -> CPDMTPForCausalLM:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB))
    model = CPDMTPForCausalLM.from_causal_lm(base, n_future=N_FUTURE, rank=RANK, **head_kwargs)
    # Make the experts and the gate differ visibly, so usage is not uniform.
    with torch.no_grad():
        for p in model.head.parameters():
            if p is not model.head.weight:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _data(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """ROWS sequences; about a fifth of the labels ignored, so counts differ per offset."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    labels = ids.masked_fill(torch.rand(ROWS, SEQ, generator=gen) < 0.2, IGNORE)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]


@torch.no_grad()
def _reference(model: CPDMTPForCausalLM, rows: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted means over all rows, computed without the head's loss code."""
    model.eval()
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    ref = {}
    logits = model(input_ids=ids).logits  # (B, T, V)
    ref["next_token_nll"] = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    ).item()
    hidden, _ = model.trunk_hidden(input_ids=ids)
    head = model.head
    # The experts' softmax runs over the K draft ids when there are any; targets outside them
    # are not observed. (Without a draft vocabulary draft_position is the identity.)
    inside = head.draft_position(labels.clamp(min=0))
    targets = torch.where((labels != IGNORE) & (inside >= 0), inside, IGNORE)
    log_w = head.log_gate(hidden)  # (B, T, r)
    log_p = head.expert_log_probs(hidden)  # (B, T, n, r, K)
    for s in range(1, N_FUTURE + 1):
        log_q = torch.logsumexp(log_w[..., None] + log_p[:, :, s - 1], dim=-2)  # (B, T, K)
        ref[f"head_nll/{s}"] = torch.nn.functional.cross_entropy(
            log_q[:, :-s].reshape(-1, log_q.shape[-1]),
            targets[:, s:].reshape(-1),
            ignore_index=IGNORE,
        ).item()
    # Positions with at least one observed target among the next n.
    observed = targets != IGNORE
    has_target = torch.zeros_like(observed)
    for s in range(1, N_FUTURE + 1):
        has_target[:, :-s] |= observed[:, s:]
    w = torch.softmax(head.gate(hidden), dim=-1)[has_target]  # (P, r)
    for a in range(RANK):
        ref[f"expert_usage/{a}"] = w[:, a].mean().item()
    ref["gate_entropy"] = (-(w * w.log()).sum(-1)).mean().item()
    return ref


def _check(
    record: dict[str, float], ref: dict[str, float], prefix: str, marginal: bool = True
) -> None:
    for key, value in ref.items():
        assert record[prefix + key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    usage = [record[f"{prefix}expert_usage/{a}"] for a in range(RANK)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-6)
    responsibility = [record[f"{prefix}expert_responsibility/{a}"] for a in range(RANK)]
    assert sum(responsibility) == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= record[prefix + "gate_entropy"] <= math.log(RANK) + 1e-9
    if marginal:  # the next-token scores are the CP marginal at offset 1
        assert record[prefix + "head_nll/1"] == pytest.approx(record[prefix + "next_token_nll"])


class _Recorder(TrainerCallback):
    """Keeps every ``logs`` dict as the callbacks after the metrics callback see it."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _args(tmp_path, **kwargs) -> TrainingArguments:
    # Two micro-batches of 4 per step: each optimizer step sees the whole data set once.
    return TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=ROWS // 2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=3,  # 3 + 3 + 2 rows: unequal batches
        learning_rate=0.0,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kwargs,
    )


def test_logged_statistics_match_references(tiny_llama_config, tmp_path) -> None:
    model = _model(tiny_llama_config)
    data = _data()
    recorder = _Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[recorder])
    callback = add_metrics_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    ref = _reference(model, data)
    train_records = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    for record in train_records:
        _check(record, ref, "cpd/")
        assert set(record) >= {f"cpd/head_nll/{s}" for s in range(1, N_FUTURE + 1)}
        assert {"cpd/joint_nll", "cpd/aux_loss"} <= set(record)
    # Callbacks behind it (printer, reporters) got the same keys in `logs`.
    seen = [r for r in recorder.logs if "loss" in r]
    assert len(seen) == 3 and all("cpd/next_token_nll" in r for r in seen)

    metrics = trainer.evaluate(eval_dataset=data)
    _check(metrics, ref, "eval_cpd/")
    assert "eval_cpd/next_token_nll" in recorder.logs[-1]
    assert trainer.state.log_history[-1]["eval_cpd/next_token_nll"] == pytest.approx(
        ref["next_token_nll"], rel=1e-5
    )
    # The Trainer's eval_loss is the joint loss over n tokens, not the next-token NLL.
    assert metrics["eval_loss"] > metrics["eval_cpd/next_token_nll"] + 0.5


def test_train_and_eval_statistics_stay_apart(tiny_llama_config, tmp_path) -> None:
    """Evaluation inside training does not leak into the training records, nor the reverse."""
    model = _model(tiny_llama_config)
    train, held_out = _data(seed=1), _data(seed=2)
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    add_metrics_callback(trainer)
    trainer.train()
    ref_train, ref_eval = _reference(model, train), _reference(model, held_out)
    history = trainer.state.log_history
    train_records = [r for r in history if "loss" in r]
    eval_records = [r for r in history if "eval_loss" in r]
    # Evaluation at step 2 and, as the Trainer does, at the last step.
    assert len(train_records) == 3 and [r["step"] for r in eval_records] == [2, 3]
    for record in train_records:
        assert record["cpd/next_token_nll"] == pytest.approx(ref_train["next_token_nll"], 1e-5)
    for record in eval_records:
        _check(record, ref_eval, "eval_cpd/")
        assert not any(k.startswith("cpd/") for k in record)


def test_callback_passed_to_trainer_fills_the_history(tiny_llama_config, tmp_path) -> None:
    """Passed in ``callbacks=``, it runs last: the stored history still gets the keys."""
    model = _model(tiny_llama_config)
    data = _data()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=data,
        callbacks=[CPDMTPMetricsCallback()],
    )
    trainer.train()
    ref = _reference(model, data)
    for record in (r for r in trainer.state.log_history if "loss" in r):
        _check(record, ref, "cpd/")


def test_warns_when_reporters_run_first(tiny_llama_config, tmp_path) -> None:
    model = _model(tiny_llama_config)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=["wandb"])
    callback = CPDMTPMetricsCallback()
    with pytest.warns(UserWarning, match="add_metrics_callback"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    installed = CPDMTPMetricsCallback()
    installed._first = True  # what add_metrics_callback sets
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        installed.on_train_begin(args, TrainerState(), TrainerControl(), model=model)


def test_model_without_cp_head_is_refused(tiny_llama_config) -> None:
    base = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB))
    with pytest.raises(ValueError, match="needs a model with a CPDMTPHead"):
        CPDMTPMetricsCallback().attach(base)


@settings(max_examples=12, deadline=None)
@given(
    cuts=st.lists(st.integers(1, ROWS - 1), max_size=3, unique=True),
    seed=st.integers(0, 2**16),
    draft=st.booleans(),
)
def test_any_batch_split_gives_the_whole_set_means(tiny_llama_config, cuts, seed, draft) -> None:
    """However the rows are split into batches, the eval record holds the token-weighted means.

    ``draft``: a ``next_token="base"`` head with a draft vocabulary of V/2 ids: the next-token
    NLL is the wrapped model's own, the per-head NLLs are the experts' over the draft ids.
    """
    head_kwargs = {"next_token": "base", "draft_vocab_size": VOCAB // 2} if draft else {}
    model = _model(tiny_llama_config, **head_kwargs)
    data = _data(seed)
    if draft:
        gen = torch.Generator().manual_seed(seed)
        model.head.set_draft_vocab(torch.randperm(VOCAB, generator=gen)[: VOCAB // 2])
    callback = CPDMTPMetricsCallback()
    callback.attach(model)
    model.eval()
    bounds = [0, *sorted(cuts), ROWS]
    with torch.no_grad():
        for lo, hi in itertools.pairwise(bounds):
            batch = data[lo:hi]
            model(
                input_ids=torch.stack([r["input_ids"] for r in batch]),
                labels=torch.stack([r["labels"] for r in batch]),
            )
    record = {"eval_runtime": 0.0}
    args = TrainingArguments("unused", use_cpu=True, report_to="none")
    callback.on_log(args, TrainerState(), TrainerControl(), logs=record)
    callback.detach()
    _check(record, _reference(model, data), "eval_cpd/", marginal=not draft)


# A process of a two-process gloo group: its own batch through a bare head, then one eval record.
_PROCESS = """
import json, os, types
import torch
from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.hf.callbacks import CPDMTPMetricsCallback

rank = int(os.environ["RANK"])
torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
head = CPDMTPHead(CPDMTPConfig(hidden_size=16, vocab_size=40, n_future=3, rank=3)).eval()
gen = torch.Generator().manual_seed(100 + rank)
rows = 2 + 3 * rank  # unequal shares: the means must weight them
hidden = torch.randn(rows, 10, 16, generator=gen)
labels = torch.randint(0, 40, (rows, 10), generator=gen)
labels[torch.rand(rows, 10, generator=gen) < 0.3] = -100
callback = CPDMTPMetricsCallback()
callback.attach(head)
out = {}
if os.environ.get("SINGLE"):  # one process sees both shares
    for r in (0, 1):
        g = torch.Generator().manual_seed(100 + r)
        n = 2 + 3 * r
        h, lab = torch.randn(n, 10, 16, generator=g), torch.randint(0, 40, (n, 10), generator=g)
        lab[torch.rand(n, 10, generator=g) < 0.3] = -100
        with torch.no_grad():
            head(h, labels=lab)
else:
    with torch.no_grad():
        head(hidden, labels=labels)
record = {"eval_runtime": 0.0}
callback.on_log(types.SimpleNamespace(device=torch.device("cpu")), types.SimpleNamespace(
    log_history=[], global_step=0), None, logs=record)
print(json.dumps(record))
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_processes_sum_before_averaging() -> None:
    """Two processes with unequal shares log the means over the union of their data."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def env(rank: int, world: int, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port if world == 2 else port + 1),
            **extra,
        }

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS], env=env(r, 2), stdout=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    records = [json.loads(p.communicate(timeout=240)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    single = subprocess.run(
        [sys.executable, "-c", _PROCESS],
        env=env(0, 1, SINGLE="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    want = json.loads(single.stdout.strip().splitlines()[-1])
    assert records[0] == pytest.approx(records[1])
    assert records[0] == pytest.approx(want, rel=1e-9)
    assert "eval_cpd/next_token_nll" in want and "eval_cpd/expert_usage/2" in want
