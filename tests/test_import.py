"""The model imports and trains with torch alone; the optional layers name their extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Every optional dependency of the extras (hf, train, bench).
BLOCKED = (
    "transformers",
    "deepspeed",
    "wandb",
    "datasets",
    "omegaconf",
    "tokenizers",
    "safetensors",
    "matplotlib",
)

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Refuse())

    import torch
    import torch.nn.functional as F

    import cpd_mtp
    from cpd_mtp import CPDMTPConfig, CPDMTPHead, ops

    torch.manual_seed(0)
    vocab, d = 11, 8

    # n = 1, r = 1 is a plain LM head: the loss is torch's cross-entropy of W_U phi(h).
    config = CPDMTPConfig(
        hidden_size=d, vocab_size=vocab, n_future=1, rank=1, balance="none", loss_impl="chunked"
    )
    head = CPDMTPHead(config).double()
    hidden = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 5))
    labels[1, 2] = -100
    out = head(hidden, labels=labels)
    out.loss.backward()
    logits = head.experts(hidden)[..., 0, 0, :] @ head.weight.T  # (B, T, V)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.logits, torch.log_softmax(logits, -1))
    torch.testing.assert_close(head(hidden), torch.log_softmax(logits, -1))  # the marginal
    assert hidden.grad is not None and head.weight.grad is not None

    # The loss op itself, chunked, against the same cross-entropy.
    u = torch.randn(6, 1, 1, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (6, 1))
    log_w = torch.zeros(6, 1, dtype=torch.float64)
    nll = ops.mixture_nll(u, head.weight, log_w, targets, impl="chunked", chunk_bytes=1)
    nll.sum().backward()
    ce = F.cross_entropy(u[:, 0, 0] @ head.weight.T, targets[:, 0], reduction="none")
    torch.testing.assert_close(nll, ce)
    assert u.grad is not None

    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked

    from cpd_mtp.utils.extras import MissingExtraError

    for use in (
        lambda: cpd_mtp.CPDMTPForCausalLM,
        lambda: cpd_mtp.CPDMTPModelConfig,
        lambda: cpd_mtp.generate,
        lambda: cpd_mtp.load_causal_lm,
        lambda: importlib.import_module("cpd_mtp.hf"),
    ):
        try:
            use()
        except MissingExtraError as err:
            assert "pip install 'cpd_mtp[hf]'" in str(err), str(err)
        else:
            raise AssertionError("no MissingExtraError")
    print("OK")
    """
)


def test_core_works_with_every_optional_dependency_unimportable():
    script = "import importlib\n" + SCRIPT.format(blocked=BLOCKED)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")


def test_hf_names_resolve_with_the_extra_installed():
    import cpd_mtp
    import cpd_mtp.hf
    from cpd_mtp.hf.modeling import CPDMTPForCausalLM, CPDMTPModelConfig

    assert cpd_mtp.CPDMTPForCausalLM is CPDMTPForCausalLM is cpd_mtp.hf.CPDMTPForCausalLM
    assert cpd_mtp.CPDMTPModelConfig is CPDMTPModelConfig is cpd_mtp.hf.CPDMTPModelConfig
    from cpd_mtp.hf.loading import load_causal_lm

    assert cpd_mtp.load_causal_lm is load_causal_lm
    assert "tiny_llama_config" not in dir(cpd_mtp)


# --- The repository's kernels/ folder never shadows the PyPI package `kernels` ----------------
# transformers (>= 5.25) imports the PyPI package `kernels` and refuses `from_pretrained`
# without it. Python puts the current directory first on sys.path for `python -m`, `python -c`
# and scripts read from stdin, so these run from the repository root, as the Makefile and users
# do. Without the fix (a kernels/__init__.py) every check below fails.
ROOT = Path(__file__).resolve().parent.parent

SHADOW_PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys, tempfile
    spec = importlib.util.find_spec("kernels")
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50)
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        LlamaForCausalLM.from_pretrained(folder)  # the call that needs the real `kernels`
    import cpd_mtp.kernels.ops
    print(json.dumps({"kernels": spec.origin, "ours": cpd_mtp.kernels.ops.__file__,
                      "path0": sys.path[0]}))
    """
)


def _kernels_site_origin() -> str:
    dist = pytest.importorskip("importlib.metadata")
    try:
        dist.version("kernels")
    except dist.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed (transformers < 5.25)")
    return str(Path(dist.distribution("kernels").locate_file("kernels")).resolve())


def _check_probe(result: subprocess.CompletedProcess, site_kernels: str) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["path0"] in ("", str(ROOT)), report  # the repository root is on sys.path
    assert Path(report["kernels"]).resolve().is_relative_to(site_kernels), report
    assert not Path(report["kernels"]).resolve().is_relative_to(ROOT / "kernels"), report
    assert Path(report["ours"]).resolve() == ROOT / "kernels" / "ops.py", report


@pytest.mark.slow
@pytest.mark.parametrize("started_as", ["python -c", "python - (stdin)"])
def test_python_started_from_the_repository_root_finds_the_pypi_kernels(started_as):
    site_kernels = _kernels_site_origin()
    if started_as == "python -c":
        command, stdin = [sys.executable, "-c", SHADOW_PROBE], None
    else:
        command, stdin = [sys.executable, "-"], SHADOW_PROBE
    result = subprocess.run(
        command,
        input=stdin,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONSAFEPATH": ""},
    )
    _check_probe(result, site_kernels)


def test_python_m_cli_from_the_repository_root_runs():
    _kernels_site_origin()
    result = subprocess.run(
        [sys.executable, "-m", "cpd_mtp.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONSAFEPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "usage: cpd-mtp" in result.stdout
