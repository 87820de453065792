"""Self-speculative decoding against autoregressive decoding of the same model, same run.

For greedy and sampling, batch 1 and batch 8: tokens per forward, per-position acceptance and
the wall-clock speedup of ``cpd_mtp.decoding.speculative.generate`` over Hugging Face ``generate`` (one
forward per token) on the same ``CPDMTPForCausalLM`` and the same held-out prompts. Runs of the
two decoders alternate (``cpd_mtp.decoding.speculative.compare_decoding``); times are p20/p50/p80 over
the runs. Results go to ``docs/benchmarks/decode.json`` and ``decode.png``; ``--quick`` runs
go to ``benchmarks/results/tmp/`` (git-ignored) unless ``--out`` is given.

    python benchmarks/bench_decode.py --model runs/demo/final     # a trained model + tokenizer
    python benchmarks/bench_decode.py --model DIR --prompts-file prompts.txt
    python benchmarks/bench_decode.py --quick                     # tiny random model, seconds

Prompts: ``--prompts-file`` (one prompt per blank-line-separated block), else the held-out
documents of the model's training corpus (the ``data`` section of ``train_config.json`` beside
the model, default the stdlib), split exactly as ``cpd_mtp.training.data.build_corpus`` splits it, cut
by ``cpd_mtp.training.data.held_out_prompts`` (without tokenizing the training split).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

ROOT = Path(__file__).resolve().parent.parent
MODES = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "temperature": 1.0}}


# ----------------------------------------------------------------------------- inputs


def quick_model(vocab: int = 64, n_future: int = 4, rank: int = 4, seed: int = 0):
    """A tiny random ``CPDMTPForCausalLM`` (d=32, 2 layers): for tests of the harness only."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpd_mtp.hf.modeling import CPDMTPForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    lm = AutoModelForCausalLM.from_config(config)
    return CPDMTPForCausalLM.from_causal_lm(lm, n_future=n_future, rank=rank).eval()


def read_prompts_file(path: Path) -> list[str]:
    """Prompts separated by blank lines (a file without blank lines: one prompt per line)."""
    text = path.read_text()
    blocks = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    return blocks if len(blocks) > 1 else [line for line in text.splitlines() if line.strip()]


def held_out_prompts(model_dir: Path, tokenizer: Any, n: int, prompt_tokens: int) -> list[str]:
    """Prompts from the validation documents of the corpus the model was trained on."""
    from cpd_mtp.training.data import DataConfig, split_documents
    from cpd_mtp.training.data import held_out_prompts as cut_prompts
    from cpd_mtp.training.sources import load_documents

    data: dict[str, Any] = {}
    train_config = model_dir / "train_config.json"
    if train_config.exists():
        data = json.loads(train_config.read_text()).get("data", {}) or {}
    defaults = DataConfig()
    docs, _ = load_documents(
        data.get("source", defaults.source),
        data.get("text_field", defaults.text_field),
        data.get("max_files", defaults.max_files),
    )
    _, val_index = split_documents(
        list(docs["name"]), data.get("val_fraction", defaults.val_fraction)
    )
    return cut_prompts(docs.select(val_index), tokenizer, n, prompt_tokens)


def load_inputs(args: argparse.Namespace) -> tuple[Any, list[torch.Tensor], int, dict[str, Any]]:
    """The model, the prompts as 1-D id tensors, the pad id and a description of the model."""
    if args.quick:
        model = quick_model().to(args.device)
        vocab = model.head.config.vocab_size
        g = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(1, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
            for _ in range(args.num_prompts)
        ]
        pad, source = 0, "random ids"
    else:
        from cpd_mtp.hf.modeling import CPDMTPForCausalLM
        from cpd_mtp.training.tokenizer import load_tokenizer

        model = CPDMTPForCausalLM.from_pretrained(args.model).to(args.device).eval()
        tokenizer = load_tokenizer(args.model)
        if args.prompts_file:
            texts = read_prompts_file(args.prompts_file)
            source = harness.portable_path(args.prompts_file)
        else:
            texts = held_out_prompts(
                Path(args.model), tokenizer, args.num_prompts, args.prompt_tokens
            )
            source = "held-out documents of the training corpus"
        texts = texts[: args.num_prompts]
        if not texts:
            raise SystemExit("no prompts found")
        prompts = [
            torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for t in texts
        ]
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    prompts = [p.to(args.device) for p in prompts if p.numel() > 0]
    cfg = model.head.config
    info = {
        "path": None if args.quick else harness.portable_path(args.model),
        "n_future": cfg.n_future,
        "rank": cfg.rank,
        "expert_type": cfg.expert_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": getattr(model.config.text_config, "num_hidden_layers", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": len(prompts),
        "prompt_tokens_mean": sum(p.numel() for p in prompts) / len(prompts),
        "prompt_source": source,
    }
    return model, prompts, int(pad), info


# ----------------------------------------------------------------------------- run


def run_case(
    model: Any, prompts: list[torch.Tensor], pad: int, mode: str, batch: int, args
) -> dict[str, Any]:
    from cpd_mtp.apps.compare import compare_decoding

    raw = compare_decoding(
        model,
        prompts,
        args.max_new_tokens,
        batch_size=batch,
        pad_token_id=pad,
        repeats=args.repeats,
        warmup=1,
        seed=args.seed,
        **MODES[mode],
    )
    spec_tps = [t / s for t, s in zip(raw["new_tokens"], raw["spec_time_s"])]
    ar_tps = [t / s for t, s in zip(raw["ar_new_tokens"], raw["ar_time_s"])]
    spec_time = harness.percentiles(raw["spec_time_s"])
    ar_time = harness.percentiles(raw["ar_time_s"])
    row = {
        "mode": mode,
        "batch": batch,
        "label": f"{mode}, batch {batch}",
        "max_new_tokens": args.max_new_tokens,
        "spec": {
            "time_s": spec_time,
            "tokens_per_s": harness.percentiles(spec_tps),
            "tokens_per_forward": harness.percentiles(raw["tokens_per_forward"]),
            "new_tokens": raw["new_tokens"][0],
            "acceptance_rate": [None if math.isnan(r) else r for r in raw["acceptance_rate"]],
            "proposed_counts": raw["proposed_counts"],
            "accepted_counts": raw["accepted_counts"],
            "expected_tokens_per_step": raw["expected_tokens_per_step"],
        },
        "ar": {
            "time_s": ar_time,
            "tokens_per_s": harness.percentiles(ar_tps),
            "new_tokens": raw["ar_new_tokens"][0],
        },
        "speedup": ar_time["p50"] / spec_time["p50"],
    }
    if "identical" in raw:
        row["identical_to_autoregressive"] = raw["identical"]
    return row


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    labels = [r["label"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    tpf = [r["spec"]["tokens_per_forward"]["p50"] for r in results]
    axes[0].bar(labels, tpf, color="tab:blue")
    axes[0].axhline(1.0, color="gray", ls="--", lw=1, label="autoregressive")
    axes[0].set_title("tokens per forward (median)")
    axes[0].legend()
    speed = [r["speedup"] for r in results]
    errs = [
        [r["speedup"] - r["ar"]["time_s"]["p20"] / r["spec"]["time_s"]["p80"] for r in results],
        [r["ar"]["time_s"]["p80"] / r["spec"]["time_s"]["p20"] - r["speedup"] for r in results],
    ]
    axes[1].bar(labels, speed, yerr=[[max(e, 0) for e in err] for err in errs], color="tab:green")
    axes[1].axhline(1.0, color="gray", ls="--", lw=1)
    axes[1].set_title("wall-clock speedup vs HF generate (p50; p20-p80 range)")
    for r in results:
        rates = [x if x is not None else float("nan") for x in r["spec"]["acceptance_rate"]]
        axes[2].plot(range(2, len(rates) + 2), rates, marker="o", label=r["label"])
    axes[2].set_xticks(range(2, payload["model"]["n_future"] + 1))
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xlabel("drafted offset (token t+j)")
    axes[2].set_title("acceptance rate per draft position")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=20)
    m = payload["model"]
    fig.suptitle(
        f"self-speculative decoding, n={m['n_future']} r={m['rank']} d={m['hidden_size']} "
        f"V={m['vocab_size']}, {payload['config']['max_new_tokens']} new tokens, "
        f"on {payload['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved CPDMTPForCausalLM dir + tokenizer")
    parser.add_argument("--quick", action="store_true", help="tiny random model (seconds)")
    parser.add_argument("--prompts-file", type=Path, help="prompts separated by blank lines")
    count = harness.positive_int  # bad counts are usage errors (exit 2), not silent defaults
    parser.add_argument("--num-prompts", type=count, default=8)
    parser.add_argument("--prompt-tokens", type=count, default=48)
    parser.add_argument("--max-new-tokens", type=count, default=None)
    parser.add_argument("--batch-sizes", type=count, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=count, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=count, default=None, help="torch threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: docs/benchmarks/decode.json, or "
        "benchmarks/results/tmp/decode.json with --quick)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = (harness.SCRATCH_DIR if args.quick else ROOT / "docs" / "benchmarks") / (
            "decode.json"
        )
    if not args.quick and args.model is None:
        parser.error("give --model PATH (a saved model) or --quick")
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.quick else 64
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.quick:
        args.num_prompts = min(args.num_prompts, 8)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, prompts, pad, info = load_inputs(args)
    env = harness.environment(args.device)
    results = []
    for mode in args.modes:
        for batch in args.batch_sizes:
            row = run_case(model, prompts, pad, mode, batch, args)
            results.append(row)
            rates = ", ".join(
                "-" if r is None else f"{r:.2f}" for r in row["spec"]["acceptance_rate"]
            )
            print(
                f"{row['label']:>16s}  tokens/forward {row['spec']['tokens_per_forward']['p50']:.2f}"
                f"  speedup {row['speedup']:.2f}x  acceptance [{rates}]"
                + ("" if row.get("identical_to_autoregressive", True) else "  OUTPUT DIFFERS")
            )
    config = {
        k: (harness.portable_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }
    payload = {
        **env,
        "benchmark": "self-speculative decoding vs HF generate",
        "config": config,
        "model": info,
        "results": results,
    }
    harness.write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return payload


if __name__ == "__main__":
    main()
