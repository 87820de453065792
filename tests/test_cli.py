"""The cpd-mtp command: streamed generation equals HF greedy generate; clear usage errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from cpd_mtp import cli
from cpd_mtp.decoding.speculative import generate
from cpd_mtp.hf.modeling import CPDMTPForCausalLM
from cpd_mtp.training.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_llama_config):
    text = ["def add(a, b):\n    return a + b\n", "class Point:\n    x = 0\n    y = 0\n"] * 20
    tokenizer = train_bpe_tokenizer(text, vocab_size=300)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(tokenizer)))
    model = CPDMTPForCausalLM.from_causal_lm(base, n_future=3, rank=2).eval()
    # As the exports write them: the tokenizer's special ids in the generation config.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def test_generate_streams_the_greedy_continuation(saved_model, capsys):
    path, model, tokenizer = saved_model
    prompt = "def add(a, b):"
    cli.main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(
            ids,
            speculative=False,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert captured.out.startswith(prompt + tokenizer.decode(want[0, ids.shape[1] :]))
    assert "tokens/forward" in captured.err and "acceptance per draft depth" in captured.err


def test_generate_stops_at_the_model_eos_like_hf_and_the_library(saved_model, tmp_path, capsys):
    """A model whose generation_config EOS (not the tokenizer's) is a token its greedy
    continuation emits: HF ``model.generate``, ``cpd_mtp.generate`` without ``eos_token_id``
    and the CLI all stop there, with the same tokens."""
    _, model, tokenizer = saved_model
    prompt = "def add(a, b):"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        free = model.generate(
            ids,
            speculative=False,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :]
    # The first token that first appears after at least two others: the run stops early.
    k = next(k for k in range(2, 12) if int(free[k]) not in free[:k].tolist())
    eos = int(free[k])
    assert eos != tokenizer.eos_token_id
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = eos
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded = CPDMTPForCausalLM.from_pretrained(path).eval()
    assert loaded.generation_config.eos_token_id == eos

    with torch.no_grad():
        hf = loaded.generate(ids, max_new_tokens=12, do_sample=False, speculative=False)
    ours = generate(loaded, ids, 12)
    assert torch.equal(ours.sequences, hf)
    assert hf.shape[1] == ids.shape[1] + k + 1 and int(hf[0, -1]) == eos
    cli.main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "12"])
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt + tokenizer.decode(hf[0, ids.shape[1] :]))
    assert f"[{k + 1} tokens," in captured.err


def test_generate_rejects_nonsense_sampling_arguments(saved_model, capsys):
    path, _, _ = saved_model
    cases = [
        (["--top-p", "1.5"], "top_p"),
        (["--top-k", "-1"], "top_k"),
        (["--temperature", "nan"], "temperature"),
    ]
    for flags, name in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", "--model", str(path), "--prompt", "x", "--sample", *flags])
        assert exit_info.value.code == 2 and name in capsys.readouterr().err


def test_generate_lossy_acceptance_says_so_and_matches_the_library(saved_model, capsys):
    path, model, tokenizer = saved_model
    prompt = "def add(a, b):"
    # A fixed tree: lossy output depends on the tree, and "auto" sizes it by the clock.
    flags = ["--acceptance", "typical", "--typical-epsilon", "0.5", "--draft-tree", "6"]
    flags += ["--max-new-tokens", "12"]
    cli.main(["generate", "--model", str(path), "--prompt", prompt, *flags])
    captured = capsys.readouterr()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    want = generate(
        model, ids, 12, acceptance="typical", typical_epsilon=0.5, draft_tree=6,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    assert captured.out.startswith(prompt + tokenizer.decode(want.sequences[0, ids.shape[1] :]))
    assert "LOSSY typical(epsilon=0.5, delta=0.3)" in captured.err


def test_generate_rejects_bad_lossy_options_before_loading(tmp_path, capsys):
    cases = [
        (["--acceptance", "confident", "--confidence", "2"], "confidence must be"),
        (["--typical-delta", "0.5"], "applies to acceptance='typical'"),
        (["--acceptance", "typical", "--draft-tree", "0"], "draft_tree=0"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:  # the folder is empty: no load was tried
            cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_batch_prints_every_prompt(saved_model, capsys):
    path, _, _ = saved_model
    prompts = ["--prompt", "class", "--prompt", "def add(a"]
    sampling = ["--sample", "--top-k", "5", "--max-new-tokens", "5"]
    cli.main(["generate", "--model", str(path), *prompts, *sampling])
    out = capsys.readouterr().out
    assert out.count("\n---\n") == 2 and "class" in out and "def add(a" in out


@pytest.fixture(scope="module")
def retrofit_exports(tmp_path_factory):
    """What ``retrofit`` writes: a drafter-only export (the default) and a merged one, of a
    rank-1 head over a base saved as a Hugging Face folder."""
    from conftest import build_tiny_llama_config

    from cpd_mtp.hf.export import save_drafter, save_export
    from cpd_mtp.hf.loading import load_causal_lm

    root = tmp_path_factory.mktemp("exports")
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    torch.manual_seed(1)
    config = build_tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = root / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    base, tokenizer = load_causal_lm(folder, progress=False)
    model = CPDMTPForCausalLM.from_causal_lm(
        base, n_future=3, rank=1, next_token="base", freeze_trunk=True, expert_init_noise=0.1
    ).eval()
    save_drafter(model, tokenizer, root / "drafter", base_source=str(folder), progress=False)
    save_export(model, tokenizer, root / "merged")
    return root, folder, base, tokenizer


@pytest.mark.parametrize("kind", ["drafter", "merged"])
def test_generate_takes_every_export_retrofit_writes(retrofit_exports, kind, capsys):
    """The drafter-only export is what the README's commands use: the stream is the original
    base model's own greedy continuation."""
    root, _, base, tokenizer = retrofit_exports
    prompt = "def f3(x):"
    cli.main(["generate", "--model", str(root / kind), "--prompt", prompt,
              "--max-new-tokens", "10"])  # fmt: skip
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = base.generate(ids, max_new_tokens=10, do_sample=False)
    out = capsys.readouterr().out
    assert out.startswith(prompt + tokenizer.decode(want[0, ids.shape[1] :]))


def test_export_folders_that_cannot_load_are_one_line_errors(retrofit_exports, tmp_path, capsys):
    root, folder, _, _ = retrofit_exports
    with pytest.raises(
        SystemExit, match=r"holds a plain .llama. model, not a cpd_mtp export.*retrofit"
    ):
        cli.main(["generate", "--model", str(folder), "--prompt", "x"])
    # A drafter file cut short, without its checksum record: named before the base loads.
    import shutil

    from cpd_mtp.hf import loading
    from cpd_mtp.hf.export import DRAFTER_WEIGHTS, EXPORT_RECORD

    cut = shutil.copytree(root / "drafter", tmp_path / "cut")
    (cut / EXPORT_RECORD).unlink()
    data = (cut / DRAFTER_WEIGHTS).read_bytes()
    (cut / DRAFTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    original = loading.load_causal_lm

    def no_base(*args, **kwargs):
        raise AssertionError("the base was loaded before the drafter file was checked")

    loading.load_causal_lm = no_base
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["generate", "--model", str(cut), "--prompt", "x"])
    finally:
        loading.load_causal_lm = original
    message = str(exit_info.value)
    assert "drafter.safetensors is unreadable (cut short or corrupt?)" in message
    assert "\n" not in message
    from cpd_mtp.hf.export import ExportError

    with pytest.raises(ExportError, match="is unreadable"):  # the library path says the same
        CPDMTPForCausalLM.from_pretrained(cut)


def test_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a saved model folder"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def _usage_error(argv: list[str], capsys) -> str:
    """The one ``error:`` line of a refused command line (exit 2, argparse's format)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize(
    ("argv", "prog", "message"),
    [
        ([], "cpd-mtp", "the following arguments are required: COMMAND"),
        (["bench"], "cpd-mtp bench", "the following arguments are required: STUDY"),
        (["bench", "loss"], "cpd-mtp bench", "invalid choice: 'loss'"),
        (["train", "--bogus"], "cpd-mtp train", "unrecognized arguments: --bogus"),
        (["generate", "--prompt", "x"], "cpd-mtp generate", "required: --model"),
        (
            ["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "-1"],
            "cpd-mtp generate",
            "argument --max-new-tokens: must be >= 0, got -1",
        ),
        (["demo", "--prompts", "0"], "cpd-mtp demo", "argument --prompts: must be at least 1"),
        (
            ["bench", "ranks", "--seeds", "two"],
            "cpd-mtp bench ranks",
            "argument --seeds: expected an integer, got 'two'",
        ),
        (["bench", "ranks", "--size", "huge"], "cpd-mtp bench ranks", "invalid choice: 'huge'"),
    ],
)
def test_argument_errors_are_one_line_in_every_subcommand(argv, prog, message, capsys):
    line = _usage_error(argv, capsys)
    assert line.startswith(f"{prog}: error: ") and message in line


def test_module_entry_points_are_the_subcommands(monkeypatch):
    """``python -m cpd_mtp.training.trainer`` (the launch scripts) parses what ``cpd-mtp train``
    parses, and so does every module entry point, without importing the cli (downward only)."""
    from cpd_mtp.apps import demo, rank_study, retrofit_study, scratch_demo
    from cpd_mtp.training import retrofit, trainer

    def recorder(module, name, pick):
        calls = []
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(pick(*a, **k)))
        return calls

    def plain(args, *rest, **kwargs):
        return {
            k: v for k, v in vars(args).items() if k not in ("run", "parser", "command", "study")
        }

    cases = [
        (trainer, "run_command", lambda *a, **k: (a[:2], a[2] if len(a) > 2 else k.get("print_config")),
         ["--preset", "tiny", "--resume", "run.steps=2"], ["train"]),
        (retrofit, "run_command", lambda overrides: overrides,
         ["--model", "m", "--out", "o", "--rank", "2", "head.n_future=3"], ["retrofit"]),
        (demo, "run", plain, ["--skip-train"], ["demo"]),
        (scratch_demo, "run_command", plain, ["--skip-train", "run.steps=4"], ["demo-scratch"]),
        (rank_study, "run_command", plain, ["--size", "tiny"], ["bench", "ranks"]),
        (retrofit_study, "run_study", plain, ["--quick"], ["bench", "retrofit"]),
    ]  # fmt: skip
    for module, name, pick, argv, command in cases:
        calls = recorder(module, name, pick)
        module.main(argv)
        cli.main([*command, *argv])
        assert len(calls) == 2 and calls[0] == calls[1], (module.__name__, calls)
    assert cases[1][0] is retrofit


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "retrofit", "demo", "demo-scratch", "bench"):
        assert command in out


def test_overrides_may_follow_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_scratch_demo", lambda args: seen.update(vars(args)))
    parser_args = ["demo-scratch", "run.steps=4", "--prompts", "1", "run.out_dir=/tmp/x"]
    # run_demo is bound at parser build time: rebuild through main.
    cli.main(parser_args)
    assert seen["overrides"] == ["run.steps=4", "run.out_dir=/tmp/x"]
    assert seen["prompts"] == 1


def test_unknown_option_is_reported_by_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "cpd-mtp train: error: unrecognized arguments: --bogus"


# ---------------------------------------------------------------------- train
def test_train_overrides_may_follow_resume(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "run_train", lambda args: seen.update(vars(args)))
    cli.main(["train", "--resume", "run.steps=10", "--preset", "tiny", "head.rank=2"])
    assert seen["overrides"] == ["run.steps=10", "head.rank=2"]
    assert seen["resume"] is True and seen["preset"] == "tiny"


def test_print_config_prints_the_merged_config_and_exits(tmp_path, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from cpd_mtp.training import trainer
    from cpd_mtp.training.config import config_to_dict, load_train_config

    def no_training(*args, **kwargs):
        raise AssertionError("--print-config trained")

    monkeypatch.setattr(trainer, "train", no_training)
    overrides = [f"run.out_dir={tmp_path}", "run.steps=7", "head.rank=3"]
    cli.main(["train", "--preset", "tiny", "--print-config", *overrides])
    printed = OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))
    assert printed == config_to_dict(load_train_config("tiny", overrides))
    # The override, the preset and the built-in default of one key each:
    assert printed["run"]["steps"] == 7 and printed["trunk"]["num_layers"] == 2
    assert printed["optim"]["betas"] == [0.9, 0.95]
    assert not any(tmp_path.iterdir())


def test_train_help_lists_every_config_key_with_its_default(capsys):
    import dataclasses

    from cpd_mtp.training.config import TrainConfig, flatten

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out
    keys = flatten(dataclasses.asdict(TrainConfig()))
    assert len(keys) > 40
    for key, default in keys.items():
        shown = "null" if default is None else str(default).lower().replace(" ", "")
        rows = [line.split() for line in out.splitlines() if line.strip()]
        line = next((" ".join(r) for r in rows if r[0].startswith(f"{key}=")), None)
        assert line is not None, key
        assert line.split()[0] == f"{key}={shown}", (key, line)
        assert len(line.split()) > 1, f"{key} has no description"


def test_a_character_split_across_forwards_prints_whole(saved_model, monkeypatch, capsys):
    """Each forward's tokens used to be decoded alone: "☕" split over tokens printed "��"."""
    import cpd_mtp.decoding as decoding
    from cpd_mtp.decoding.output import GenerationOutput
    from cpd_mtp.decoding.stats import DecodingStats

    path, _, tokenizer = saved_model
    text = " café ☕ naïve"
    new = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in new), "the text must split a character"

    def one_token_per_forward(model, input_ids, max_new_tokens, streamer=None, **kwargs):
        streamer.put(input_ids)
        for token in new:
            streamer.put(torch.tensor([token]))
        streamer.end()
        stats = DecodingStats(forwards=len(new), row_forwards=[len(new)])
        stats.new_tokens_per_row = [len(new)]
        sequences = torch.cat([input_ids, torch.tensor([new])], dim=1)
        return GenerationOutput.from_stats(sequences, stats, 0.0)

    monkeypatch.setattr(decoding, "generate", one_token_per_forward)
    cli.main(["generate", "--model", str(path), "--prompt", "def", "--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert out.startswith("def" + text) and "\ufffd" not in out


# ------------------------------------------------------------------ one-line errors, not tracebacks
def _exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") or exit_info.value.code == 2, message
    return message


def test_generate_errors_are_one_line(saved_model, tmp_path, capsys):
    import shutil

    path, _, _ = saved_model
    # An empty prompt is a usage error.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", str(path), "--prompt", ""])
    assert exit_info.value.code == 2 and "--prompt must not be empty" in capsys.readouterr().err

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(path, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink(missing_ok=True)
    message = _exit_message(["generate", "--model", str(no_tokenizer), "--prompt", "x"])
    assert "has no tokenizer" in message and "\n" not in message

    no_weights = tmp_path / "no_weights"
    shutil.copytree(path, no_weights)
    (no_weights / "model.safetensors").unlink()
    message = _exit_message(["generate", "--model", str(no_weights), "--prompt", "x"])
    assert "no weights" in message and "\n" not in message

    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _exit_message(["generate", "--model", str(corrupt), "--prompt", "x"])
    assert "cannot load the model" in message and "\n" not in message


def test_a_plain_model_folder_is_refused_in_one_line(tmp_path, tiny_llama_config):
    plain = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=40))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"holds a plain 'llama' model, not a cpd_mtp model"):
        CPDMTPForCausalLM.from_pretrained(tmp_path / "plain")


PLAIN_FOLDER_PROBE = """
import resource, sys
# 3 GiB of address space: the default 7B-parameter model that a silent fallback would build
# needs 28 GB; the refusal needs what importing torch and transformers takes.
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from cpd_mtp import cli
cli.main(sys.argv[1:])
"""


def test_pointing_generate_at_a_plain_model_does_not_take_the_machine_down(
    tmp_path, tiny_llama_config
):
    import os
    import subprocess
    import sys

    from cpd_mtp.training.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x\n"] * 10, vocab_size=300)
    plain = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=len(tokenizer)))
    plain.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    argv = ["generate", "--model", str(tmp_path / "plain"), "--prompt", "def"]
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_FOLDER_PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "holds a plain 'llama' model" in last, last
    assert "cpd-mtp retrofit" in last
    assert "Traceback" not in result.stderr


def test_generate_takes_the_draft_tree(saved_model, capsys):
    path, _, _ = saved_model
    argv = ["generate", "--model", str(path), "--prompt", "def add(a", "--max-new-tokens", "8"]
    cli.main([*argv, "--draft-tree", "3", "--no-context-drafts"])
    err = capsys.readouterr().err
    sizes = err.split("draft nodes per forward: ")[1].split(",")
    assert all(int(part.split(" x")[0]) <= 3 for part in sizes if " x" in part)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--draft-tree", "wide"])
    assert exit_info.value.code == 2 and "'auto', 'chain' or an int" in capsys.readouterr().err


def test_generate_chat_puts_the_prompt_through_the_chat_template(saved_model, tmp_path, capsys):
    """--chat: the user message in the tokenizer's template, continued as HF generate would."""
    import shutil

    path, model, tokenizer = saved_model
    with pytest.raises(SystemExit) as exit_info:  # this tokenizer has no template
        cli.main(["generate", "--model", str(path), "--prompt", "hi", "--chat"])
    assert "has no chat template" in str(exit_info.value.code)
    chat = tmp_path / "chat"
    shutil.copytree(path, chat)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    tokenizer.chat_template = template
    tokenizer.save_pretrained(chat)
    cli.main(
        ["generate", "--model", str(chat), "--prompt", "def add", "--chat", "--max-new-tokens", "8"]
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def add"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<user>def add<assistant>"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        want = model.generate(
            ids, speculative=False, max_new_tokens=8, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith(text + tokenizer.decode(want[0, ids.shape[1] :]))
    tokenizer.chat_template = None
