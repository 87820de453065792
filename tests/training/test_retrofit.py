"""``cpd-mtp retrofit``: heads-only training of a drafting head for a pretrained model.

A tiny random Llama with a BPE tokenizer trained on a few stdlib files is saved as a Hugging
Face folder and retrofitted for a few steps per distillation mode. The checks compare against
references computed here, outside the retrofit code: the head's validation NLL recomputed
from the export against an untrained head, the export's logits against the original model's
(``torch.equal``), greedy decoding against HF ``generate``, the draft vocabulary against a
``bincount`` of the cached training tokens, and a killed-then-resumed run against a straight
one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cpd_mtp.training.config import RetrofitConfig, load_retrofit_config
from cpd_mtp.training.retrofit import retrofit, select_blocks

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
N_FUTURE, RANK, BLOCK = 3, 2, 32


@pytest.fixture(scope="module")
def tiny_model(tiny_pretrained_folder) -> Path:
    """A random 2-layer Llama and a 320-token BPE, saved together as an HF folder."""
    return tiny_pretrained_folder


def config(model: Path, out: Path, **overrides) -> RetrofitConfig:
    """The test's settings, by dotted key (``head.rank``, ``data.tokens``, ...)."""
    settings = {
        "model.path": str(model),
        "run.out_dir": str(out),
        "head.n_future": N_FUTURE,
        "head.rank": RANK,
        "head.token_conditioned": False,  # the plain head here; the default in its own file
        "data.tokens": 2048,
        "run.seed": 0,
        "data.distill": "none",
        "data.max_files": 12,
        "data.block_size": BLOCK,
        "run.micro_batch_size": 8,
        "run.steps": 12,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 2,
        "run.eval_every": 6,
        "run.save_every": 6,
        "data.eval_blocks": 8,
        "run.progress": False,
        "run.merged": True,
        "run.measure_prompts": 0,
    }
    settings.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_retrofit_config(settings)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def validation_blocks(model: Path, cfg: RetrofitConfig) -> torch.Tensor:
    """The first ``eval_blocks`` validation blocks, built here from the model's own tokenizer."""
    from cpd_mtp.training.data import DataConfig, build_corpus

    corpus = build_corpus(
        DataConfig(
            tokenizer=model,
            block_size=cfg.data.block_size,
            max_files=cfg.data.max_files,
            progress=False,
        )
    )
    blocks = corpus.validation.blocks[: cfg.data.eval_blocks]
    return torch.from_numpy(np.asarray(blocks, dtype=np.int64))


def head_nll_per_target(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(
            model(input_ids=ids, labels=ids, return_logits=False).cp_output.joint_nll_per_target
        )


# ---------------------------------------------------------------------- distill none
@pytest.fixture(scope="module")
def none_run(tiny_model, tmp_path_factory) -> tuple[RetrofitConfig, dict]:
    out = tmp_path_factory.mktemp("retrofit_none")
    cfg = config(tiny_model, out, head__draft_vocab_size=200, run__zero_stage=2)
    return cfg, retrofit(cfg)


def test_none_mode_lowers_validation_nll_against_an_untrained_head(tiny_model, none_run):
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    cfg, last = none_run
    final = Path(cfg.run.out_dir) / "final"
    trained = CPDMTPForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.manual_seed(123)
    untrained = CPDMTPForCausalLM.from_causal_lm(
        base, N_FUTURE, RANK, freeze_trunk=True, next_token="base", draft_vocab_size=200
    ).eval()
    untrained.head.set_draft_vocab(trained.head.draft_ids)
    ids = validation_blocks(tiny_model, cfg)
    after, before = head_nll_per_target(trained, ids), head_nll_per_target(untrained, ids)
    assert after < before - 0.01, (before, after)
    # The run's own validation measured the same thing on the same blocks.
    assert last["val/joint_nll_per_target"] == pytest.approx(after, rel=1e-4)
    records = metrics(Path(cfg.run.out_dir))
    assert records[0]["step"] == 0 and records[-1]["step"] == cfg.run.steps
    for k in range(1, N_FUTURE + 1):  # every offset's head improved over the step-0 head
        assert records[-1][f"val/head_nll/{k}"] < records[0][f"val/head_nll/{k}"]
    usage = [records[-1][f"val/expert_usage/{a}"] for a in range(RANK)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-5)
    assert all(r["tokens_per_s"] > 0 for r in records[1:])


def test_the_export_is_base_mode_and_its_logits_are_the_original_models(tiny_model, none_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpd_mtp import generate
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    cfg, _ = none_run
    final = Path(cfg.run.out_dir) / "final"
    model = CPDMTPForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert model.config.head_config["next_token"] == "base"
    assert model.config.head_config["draft_vocab_size"] == 200
    assert (final / "tokenizer.json").is_file()
    assert (
        AutoTokenizer.from_pretrained(final).get_vocab()
        == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    )
    ids = torch.randint(
        0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    prompt = ids[:1, :6]
    ours = generate(model, prompt, 24)
    theirs = base.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours.sequences, theirs)


def test_the_draft_vocabulary_is_the_most_frequent_training_targets(tiny_model, none_run):
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    cfg, _ = none_run
    draft = CPDMTPForCausalLM.from_pretrained(Path(cfg.run.out_dir) / "final").head.draft_ids
    # The training blocks, as the states cache stored them: ceil(tokens / block) of them.
    entries = [
        np.load(p)
        for p in (Path(os.environ["CPD_MTP_CACHE"]) / "trunk_states").glob("*/tokens.npy")
    ]
    wanted = -(-cfg.data.tokens // cfg.data.block_size)
    train = [t for t in entries if t.shape == (wanted, cfg.data.block_size)]
    assert train, "the training blocks' states were not cached"
    counts = np.bincount(train[-1].reshape(-1), minlength=320)
    inside = np.zeros(320, dtype=bool)
    inside[draft.numpy()] = True
    assert inside.sum() == 200 and torch.equal(draft, draft.sort().values)
    assert counts[inside].min() >= counts[~inside].max()


def test_the_training_blocks_are_a_function_of_the_seed():
    a, b, c = select_blocks(100, 10, 0), select_blocks(100, 10, 0), select_blocks(100, 10, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)


def test_a_second_run_in_the_same_folder_is_refused(tiny_model, none_run, capsys):
    from cpd_mtp.training.retrofit import run_command

    cfg, _ = none_run
    with pytest.raises(SystemExit) as exit_info:
        run_command({"model.path": str(tiny_model), "run.out_dir": cfg.run.out_dir})
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "already holds a run" in message and "--resume" in message


# ---------------------------------------------------------------------- kl, generated
def test_kl_mode_trains_and_exports(tiny_model, tmp_path):
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    cfg = config(tiny_model, tmp_path / "kl", data__distill="kl", run__zero_stage=3)
    last = retrofit(cfg)
    records = metrics(tmp_path / "kl")
    assert all(np.isfinite(r["loss"]) for r in records[1:])
    assert last["val/joint_nll_per_target"] < records[0]["val/joint_nll_per_target"]
    model = CPDMTPForCausalLM.from_pretrained(tmp_path / "kl" / "final")
    assert model.config.head_config["next_token"] == "base"
    assert model.head.draft_ids is None


def test_generated_mode_trains_on_the_models_own_answers_with_their_states(tiny_model, tmp_path):
    """The examples are the model's own greedy continuations (HF ``generate`` on the original
    model, the reference), their states the trunk's own (a teacher-forced forward), and the
    training labels the answers alone."""
    from transformers import AutoModelForCausalLM

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM
    from cpd_mtp.training.retrofit import RetrofitTrainer

    cfg = config(
        tiny_model,
        tmp_path / "gen",
        data__distill="generated",
        data__tokens=512,
        data__prompt_tokens=8,
        data__new_tokens=24,
        run__steps=4,
    )
    trainer = RetrofitTrainer(cfg)
    try:
        examples = trainer.train_data.examples
        assert trainer.training_tokens >= 512 - 24  # made until data.tokens
        original = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        for i in (0, len(examples) - 1):
            ids, prompt = torch.from_numpy(examples.ids[i]), examples.prompt_lengths[i]
            with torch.no_grad():
                want = original.generate(ids[None, :prompt], max_new_tokens=24, do_sample=False)
                states = original.model(input_ids=ids[None]).last_hidden_state[0, :-1]
            assert torch.equal(want[0, : len(ids)], ids)
            torch.testing.assert_close(
                torch.from_numpy(np.asarray(examples.states[i], dtype=np.float32)), states,
                rtol=1e-4, atol=1e-4,
            )  # fmt: skip
        hidden, labels = trainer.train_data.batch(np.arange(2), trainer.device)
        window = trainer.train_data.window(0)[1]
        j = trainer.train_data.indices[0]
        assert window[0] == -100 and list(window[1:]) == list(
            examples.ids[j][examples.prompt_lengths[j] :]
        )
        assert hidden.shape[:2] == labels.shape
        trainer.train()
    finally:
        trainer.close()
    records = metrics(tmp_path / "gen")
    assert [r["step"] for r in records] == list(range(cfg.run.steps + 1))
    assert all(np.isfinite(r["loss"]) for r in records[1:])
    model = CPDMTPForCausalLM.from_pretrained(tmp_path / "gen" / "final")
    assert model.config.head_config["next_token"] == "base"


def test_generated_kl_distils_the_models_own_continuations(tiny_model, tmp_path):
    """``generated_kl``: the data of ``generated``, and a first step whose loss is the
    untrained head's distillation objective (NLL + KL to the model's own next-token
    distributions) on the first micro-batch, recomputed here."""
    from cpd_mtp.training.loop import micro_batch_indices
    from cpd_mtp.training.retrofit import RetrofitTrainer

    common = {"data__tokens": 512, "data__prompt_tokens": 8, "data__new_tokens": 24,
              "run__steps": 2}  # fmt: skip
    plain = RetrofitTrainer(config(tiny_model, tmp_path / "g", data__distill="generated", **common))
    plain.close()
    cfg = config(tiny_model, tmp_path / "s", data__distill="generated_kl", **common)
    soft = RetrofitTrainer(cfg)
    try:
        everything = np.arange(len(soft.train_data))
        _, want = plain.train_data.batch(everything, plain.device)
        _, got = soft.train_data.batch(everything, soft.device)
        assert torch.equal(want, got) and (got == -100).any()  # the prompts are not targets
        run = soft.resolved.run
        index = micro_batch_indices(
            0, 0, 0, 1, run.micro_batch_size, run.grad_accum, len(soft.train_data), run.seed
        )
        hidden, labels = soft.train_data.batch(index, soft.device)
        with torch.no_grad():
            distill = (cfg.data.beta, cfg.data.gamma)
            out = soft.engine.module(hidden, labels, return_logits=False, distill=distill)
            nll = soft.engine.module(hidden, labels, return_logits=False)
        soft.train(stop_after=1)
    finally:
        soft.close()
    first = metrics(tmp_path / "s")[1]
    assert first["loss"] == pytest.approx(float(out.loss), rel=1e-5)
    assert float(out.loss) != pytest.approx(float(nll.loss), rel=1e-3)  # the KL is in it


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume", "--overwrite"], "exclude each other"),
        (["--distill", "kl", "--temperature", "0.5"], "temperature applies to --distill generated"),
        (["--n-future", "40"], "must be < data.block_size"),
        (["--beta", "1.5"], "data.beta must lie in [0, 1]"),
        (["--balance-coef", "-0.1"], "head.balance_coef"),
        (["--distill", "none", "--tokens", "10000000"], "lower --tokens"),
        (["--draft-vocab", "100000"], "exceeds the model's vocabulary"),
        (["--n-future", "1"], "can never draft in base mode"),
        (["--draft-vocab", "1"], "leaves nothing to choose"),
        (["head.next_token=marginal"], "head.next_token must be 'base'"),
        (["--distill", "magic"], "data.distill: Invalid value 'magic'"),
        (["head.no_such_key=1"], "head.no_such_key"),
        (["--resume"], "holds no run to continue"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_model, tmp_path, flags, message):
    from cpd_mtp.cli import main

    argv = ["retrofit", "--model", str(tiny_model), "--out", str(tmp_path / "run")]
    argv += ["--max-files", "12", "--block-size", str(BLOCK), "--no-progress", *flags]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text


def test_a_missing_model_is_a_one_line_error(tmp_path):
    from cpd_mtp.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["retrofit", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert str(exit_info.value.code) == f"error: --model {tmp_path / 'nope'} does not exist"
    with pytest.raises(SystemExit) as exit_info:
        main(["retrofit", "--out", str(tmp_path / "o")])
    assert str(exit_info.value.code) == "error: --model (model.path) is required"


def test_every_head_option_reaches_the_retrofit_config_by_its_dotted_key():
    """The ``head`` section is ``CPDMTPConfig``'s fields: a head option needs no retrofit code."""
    import dataclasses

    from cpd_mtp.config import CPDMTPConfig

    names = {f.name for f in dataclasses.fields(CPDMTPConfig)} - {"hidden_size", "vocab_size"}
    cfg = load_retrofit_config({"model.path": "m", "run.out_dir": "o"})
    assert {f.name for f in dataclasses.fields(cfg.head)} == names
    assert cfg.head.next_token == "base" and cfg.head.expert_type == "linear"
    cfg = load_retrofit_config(
        ["model.path=m", "run.out_dir=o", "head.router_z_coef=0.25", "head.expert_init_noise=0.5"]
    )
    assert (cfg.head.router_z_coef, cfg.head.expert_init_noise) == (0.25, 0.5)


# ---------------------------------------------------------------------- resume
def _launch(model: Path, out: Path, *flags: str, wait: bool = True):
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "cpd_mtp.training.retrofit", "--model", str(model)]
    cmd += ["--out", str(out), "--n-future", str(N_FUTURE), "--rank", str(RANK)]
    cmd += ["--tokens", "2048", "--max-files", "12", "--block-size", str(BLOCK), "--lr", "0.01"]
    cmd += ["--steps", "40", "--save-every", "4", "--eval-every", "20", "--no-progress", *flags]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_resume_after_a_kill_equals_a_straight_run(tiny_model, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    output = _launch(tiny_model, straight, "--distill", "kl")
    assert "positions/s" in output and "trained the head:" in output
    proc = _launch(tiny_model, killed, "--distill", "kl", wait=False)
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        pointer.exists() and pointer.read_text() >= "step00000004"
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed_from = int(pointer.read_text()[4:])
    assert resumed_from < 40, "the run finished before it was killed: nothing was tested"
    _launch(tiny_model, killed, "--distill", "kl", "--resume")
    assert_same_run(straight, killed, steps=40)


def assert_same_run(straight: Path, resumed: Path, steps: int) -> None:
    """The resumed run logged every step once, as the straight one did (loss, LR, validation),
    and exported the same weights."""
    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == list(range(steps + 1))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "lr", "val/joint_nll_per_target"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (key, ra, rb)
    files = sorted(p.name for p in (straight / "final").glob("*.safetensors"))
    assert files == sorted(p.name for p in (resumed / "final").glob("*.safetensors")) and files
    for file in files:
        wa, wb = load_file(straight / "final" / file), load_file(resumed / "final" / file)
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-6, atol=1e-7, msg=name)


# ---------------------------------------------------------------------- the run folder
def test_a_resume_is_checked_before_the_model_is_loaded(tiny_model, none_run, monkeypatch):
    """A changed fixed setting is refused at once, not after tokenising and caching."""
    import cpd_mtp.hf.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume was checked")

    monkeypatch.setattr(cpd_mtp.hf.loading, "load_causal_lm", no_loading)
    cfg, _ = none_run
    changed = config(
        tiny_model, Path(cfg.run.out_dir), run__resume=True, head__rank=RANK + 1,
        head__draft_vocab_size=200,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"head\.rank 2 -> 3"):
        retrofit(changed)


def test_a_failed_re_export_is_written_again_on_the_next_resume(tiny_model, tmp_path, monkeypatch):
    """Completion is the export's stamp matching the last checkpoint, not final/ existing."""
    import cpd_mtp.hf.export

    out = tmp_path / "run"
    retrofit(config(tiny_model, out, run__steps=4))
    stamp = json.loads((out / "final" / "cpd_mtp_run.json").read_text())
    assert stamp["step"] == 4

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cpd_mtp.hf.export, "save_export", full_disk)
    with pytest.raises(OSError):  # more steps, then the export dies
        retrofit(config(tiny_model, out, run__steps=6, run__resume=True))
    assert json.loads((out / "final" / "cpd_mtp_run.json").read_text())["step"] == 4
    monkeypatch.undo()
    retrofit(config(tiny_model, out, run__steps=6, run__resume=True))
    assert json.loads((out / "final" / "cpd_mtp_run.json").read_text())["step"] == 6
    saved = json.loads((out / "final" / "retrofit_config.json").read_text())
    assert saved["run"]["steps"] == 6
    assert [r["step"] for r in metrics(out)] == list(range(7))


def test_temporaries_of_killed_runs_are_swept_and_a_moved_export_is_put_back(tmp_path):
    from cpd_mtp.training.run_dir import RunDirectory

    out = tmp_path / "run"
    (out / ".final.tmp4242").mkdir(parents=True)
    (out / ".final.tmp4242" / "model.safetensors").write_bytes(b"x" * 100)
    (out / ".metrics.jsonl.tmp4243").write_text("torn")
    (out / ".final.old4244").mkdir()
    (out / ".final.old4244" / "config.json").write_text("{}")
    run_dir = RunDirectory(out)
    run_dir.claim(resume=True, overwrite=False)  # the moved-aside export is a run to continue
    try:
        assert sorted(p.name for p in out.iterdir()) == [".lock", "final"]
        assert (out / "final" / "config.json").read_text() == "{}"
    finally:
        run_dir.close()


def test_data_too_small_for_a_useful_head_is_warned_about(tiny_model, tmp_path, capsys):
    """--tokens 400 of answers: the run says the data is too small, and what to raise."""
    cfg = config(
        tiny_model, tmp_path / "short", data__distill="generated", data__tokens=400,
        data__prompt_tokens=8, data__new_tokens=16, run__steps=1, run__export=False,
    )  # fmt: skip
    retrofit(cfg)
    err = capsys.readouterr().err
    assert "too few for a useful head" in err and "raise --tokens" in err


# ---------------------------------------------------------------------- what the run gives
def test_a_run_ends_by_measuring_its_drafter_export_against_the_original(
    tiny_model, tmp_path, capsys
):
    """The default export is the drafter alone; the run decodes held-out prompts with it against
    the original model's own generate and the alternatives that need no training."""
    from cpd_mtp.hf.export import is_drafter_export

    out = tmp_path / "measured"
    cfg = config(
        tiny_model, out, run__merged=False, run__measure_prompts=2, run__measure_tokens=8,
        run__steps=4, data__val_fraction=0.25,  # held-out documents with prompts in them
    )  # fmt: skip
    retrofit(cfg)
    assert is_drafter_export(out / "final")
    assert not any((out / "final").glob("model*.safetensors"))  # no trunk copied
    measured = json.loads((out / "measurement.json").read_text())
    assert measured["identical"] is True
    code = measured["kinds"]["code"]
    assert code["prompts"] == 2 and code["vs_best_zero_training"]["n"] == 2
    assert set(code["decoders"]) == {"hf", "hf_packed", "hf_lookup", "context", "default"}
    assert code["decoders"]["default"]["tokens_per_forward"] >= 1.0
    printed = capsys.readouterr()
    assert "tokens/forward" in printed.out and "cpd-mtp measure --model" in printed.out
    slower = code["vs_best_zero_training"]["median"] < 1.0
    assert ("the head adds nothing" in printed.err) == slower


def test_the_training_message_says_what_its_token_counts_count(tiny_model, tmp_path, capsys):
    """--tokens is the training set's size; the positions trained on are steps x batch x block."""
    retrofit(config(tiny_model, tmp_path / "counts", run__steps=2, run__export=False))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trained the head")]
    assert len(line) == 1
    assert f"2 steps, {2 * 8 * BLOCK:,} positions in" in line[0]
    assert "holding 2,048 target tokens" in line[0]


def test_help_shows_every_flags_key_and_its_default(capsys):
    """--help names each flag's config key and the config's own default."""
    import dataclasses

    from cpd_mtp.cli import main
    from cpd_mtp.training.arguments import RETROFIT_FLAGS
    from cpd_mtp.training.config import RetrofitConfig, flatten

    with pytest.raises(SystemExit):
        main(["retrofit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = flatten(dataclasses.asdict(RetrofitConfig()))
    for _, key, _ in RETROFIT_FLAGS:
        assert f"{key}:" in text
        if defaults[key] not in (None, "???"):
            assert f"(default: {defaults[key]})" in text.split(f"{key}:")[1].split(" --")[0], key
