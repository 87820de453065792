"""Medusa-format draft heads from a rank-1 CP-MTP head, for engines that serve Medusa heads.

A Medusa checkpoint (Cai et al. 2024, in the layout of vLLM's Medusa model) is a folder with
``config.json`` (``model_type: "medusa"``, ``num_heads``, ``num_hidden_layers`` residual blocks
per head, ``hidden_size``, ``vocab_size`` = the full vocabulary V, ``truncated_vocab_size`` = K
when a ``token_map`` is used) and ``model.safetensors``: per head h the residual blocks
``blocks.{h}.layers.{l}.weight`` (x <- x + SiLU(W x), no bias unless ``medusa_fc_bias``),
``lm_heads.{h}.weight`` (K, d), and optionally ``token_map`` (K,), the full-vocabulary id of
each of the K draft rows. Given the target's final hidden state h_t at the last accepted
position t, head h drafts token t + h + 2 (the target itself gives token t + 1):

    x_h = h_t, then x_h <- x_h + SiLU(W_{h,l} x_h) for l = 0..L-1
    log q_h = log_softmax(lm_head_h x_h), put on the K ids of token_map (-inf elsewhere)

What maps exactly. A CP head of rank 1 has one expert per offset and a trivial gate, so its
drafter's conditional of offset s given any drafted path is that expert's own distribution
softmax(W_K phi_s(h_t)) over the K draft rows W_K of W_U (K = V without a draft vocabulary).
In ``next_token="base"`` mode offset 1 is the wrapped model's own lm_head (the target), so the
offsets s = 2..n are the drafts: Medusa head h = offset s = h + 2, ``num_heads`` = n - 1.

- ``linear`` experts, phi_s(h) = A_s h: ``num_hidden_layers`` = 0, lm_head_h = W_K A_s.
- ``lowrank`` experts, phi_s(h) = h + B_s A_s h: ``num_hidden_layers`` = 0,
  lm_head_h = W_K + (W_K B_s) A_s.
- ``resblock`` experts, phi_s(h) = h + A_s SiLU(B_s h): Medusa's block has no map after the
  SiLU, so this maps (``num_hidden_layers`` = 1, W = B_s, lm_head_h = W_K) only where
  A_s = I exactly; otherwise it is refused.

Everything else is refused with a one-line ``ValueError`` naming why: rank r > 1 (a mixture,
whose offsets are coupled through the expert posterior), ``next_token="marginal"`` (the
model's next token is not the wrapped model's lm_head, so no engine target is this model),
n = 1 (nothing to draft), parameters partitioned by ZeRO-3. The products are computed in
float64 and stored in ``dtype`` (float32 by default).

    python -m cpd_mtp.hf.medusa EXPORT OUT    # a saved CPDMTPForCausalLM -> a Medusa folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from cpd_mtp.config import CPDMTPConfig
from cpd_mtp.head import CPDMTPHead
from cpd_mtp.utils.files import fsync_path, swap_in_directory

__all__ = [
    "MEDUSA_CONFIG",
    "MEDUSA_WEIGHTS",
    "load_medusa",
    "main",
    "medusa_draft_logprobs",
    "medusa_state",
    "to_medusa",
]

MEDUSA_CONFIG = "config.json"
"""The Medusa folder's config file."""

MEDUSA_WEIGHTS = "model.safetensors"
"""The Medusa folder's weights file."""

_PREFIX = "medusa_heads."  # vLLM strips it from tensor names; we never write it


def _head_of(head_or_model: Any) -> CPDMTPHead:
    if isinstance(head_or_model, CPDMTPHead):
        return head_or_model
    head = getattr(head_or_model, "head", None)
    if isinstance(head, CPDMTPHead):
        return head
    raise ValueError(
        f"to_medusa takes a CPDMTPHead or a CPDMTPForCausalLM, got {type(head_or_model).__name__}"
    )


def _check_config(cfg: CPDMTPConfig) -> None:
    """The refusals a head's config alone decides: rank, next-token mode, n."""
    if cfg.rank != 1:
        raise ValueError(
            f"rank {cfg.rank} head: a rank-r mixture is not a product of independent heads "
            "(its offsets are coupled through the expert posterior), so it has no Medusa form; "
            "only rank-1 heads convert"
        )
    if cfg.next_token != "base":
        raise ValueError(
            f"next_token={cfg.next_token!r} head: its next token is the CP marginal "
            "softmax(W_U phi_1(h)), not the wrapped model's lm_head, so an engine serving "
            "that model with Medusa heads would verify against another model; only "
            "next_token='base' heads convert"
        )
    if cfg.n_future < 2:
        raise ValueError(
            "n_future=1 head: offset 1 is the base model's own token, so there are no "
            "offsets 2..n to draft as Medusa heads"
        )
    if cfg.token_conditioned:
        raise ValueError(
            "token_conditioned head: its experts read the next token's embedding as well as "
            "h, and a Medusa head reads h alone; only heads that are not token_conditioned "
            "convert"
        )


def _check_maps(head: CPDMTPHead) -> None:
    """Raise a one-line ``ValueError`` unless ``head`` has an exact Medusa form."""
    cfg = head.config
    _check_config(cfg)
    tensors = [*head.experts.parameters(), head.weight]
    if any(hasattr(t, "ds_id") and t.numel() == 0 for t in tensors):
        raise ValueError(
            "the head's parameters are partitioned by DeepSpeed ZeRO-3: gather them "
            "(deepspeed.zero.GatheredParameters) or convert a saved export"
        )
    if cfg.expert_type == "resblock":
        eye = torch.eye(cfg.hidden_size, dtype=head.experts.proj_out.dtype)
        for s in range(2, cfg.n_future + 1):
            if not torch.equal(head.experts.proj_out[s - 1].detach().cpu(), eye):
                raise ValueError(
                    "resblock experts compute h + A SiLU(B h) and Medusa's residual block "
                    "h + SiLU(W h) has no map after the SiLU: they agree only where A = I, "
                    f"and offset {s}'s A is not the identity"
                )


@torch.no_grad()
def medusa_state(
    head_or_model: Any, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The Medusa tensors and config of a head with an exact Medusa form, without writing.

    Args:
        head_or_model: a ``CPDMTPHead`` or a ``CPDMTPForCausalLM`` (its ``head``).
        dtype: the stored dtype of the weights (the products are computed in float64).

    Returns:
        ``(tensors, config)``: CPU tensors named as vLLM's Medusa model loads them, and the
        ``config.json`` dict.

    Raises:
        ValueError: one line naming why the head does not map exactly (see the module).
    """
    head = _head_of(head_or_model)
    _check_maps(head)
    cfg = head.config
    experts = head.experts
    wide = torch.float64
    weight = head.weight.detach().to("cpu", wide)  # (V, d)
    draft_ids = None if head.draft_ids is None else head.draft_ids.detach().to("cpu").long()
    w_k = weight if draft_ids is None else weight[draft_ids]  # (K, d)
    num_layers = 1 if cfg.expert_type == "resblock" else 0
    tensors: dict[str, torch.Tensor] = {}
    for h in range(cfg.n_future - 1):
        e = h + 1  # offset s = h + 2; experts are stored offset-major, e = (s - 1) * r + 0
        if cfg.expert_type == "linear":
            lm_head = w_k @ experts.proj[e].detach().to("cpu", wide)
        elif cfg.expert_type == "lowrank":
            a = experts.proj_in[e].detach().to("cpu", wide)  # (k, d)
            b = experts.proj_out[e].detach().to("cpu", wide)  # (d, k)
            lm_head = w_k + (w_k @ b) @ a
        else:  # resblock with A = I (checked)
            lm_head = w_k
            block = experts.proj_in[e].detach().to("cpu", dtype)
            tensors[f"blocks.{h}.layers.0.weight"] = block.contiguous()
        tensors[f"lm_heads.{h}.weight"] = lm_head.to(dtype).contiguous()
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the converted {name} holds NaN or inf values; refusing to write it")
    if draft_ids is not None:
        tensors["token_map"] = draft_ids.contiguous()
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "truncated_vocab_size": cfg.draft_vocab,
        "num_heads": cfg.n_future - 1,
        "num_hidden_layers": num_layers,
        "medusa_fc_bias": False,
        "original_lm_head": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "cpd_mtp": {
            "source": f"rank-1 {cfg.expert_type} CP-MTP head, next_token='base'",
            "offsets": list(range(2, cfg.n_future + 1)),
        },
    }
    return tensors, config


def to_medusa(
    head_or_model: Any, out_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a rank-1 head's drafts as a Medusa folder: ``config.json`` + ``model.safetensors``.

    Medusa head h is the CP head's offset h + 2 (see the module docstring for the formulas).
    The folder is written beside ``out_dir`` under a temporary name and renamed into place
    when complete; an existing Medusa folder at ``out_dir`` is replaced only then. Any other
    existing, non-empty ``out_dir`` is refused.

    Args:
        head_or_model: a ``CPDMTPHead`` or a ``CPDMTPForCausalLM``.
        out_dir: the folder to write.
        dtype: the stored dtype of the weights.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ValueError: one line naming why the head does not map exactly, or why ``out_dir`` is
            not replaced.
    """
    from safetensors.torch import save_file

    target = Path(out_dir)
    tensors, config = medusa_state(head_or_model, dtype)
    if target.exists() and not _is_replaceable(target):
        raise ValueError(
            f"{target} exists and is not a Medusa folder (no config.json with "
            "model_type 'medusa'); refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    backup = target.with_name(f".{target.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process that had our pid
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / MEDUSA_WEIGHTS), metadata={"format": "pt"})
        (tmp / MEDUSA_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in (MEDUSA_WEIGHTS, MEDUSA_CONFIG):
            fsync_path(tmp / name)
        fsync_path(tmp)
        swap_in_directory(tmp, target, backup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def _is_replaceable(path: Path) -> bool:
    """An empty folder, or one holding a Medusa ``config.json``."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        config = json.loads((path / MEDUSA_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "medusa"


def load_medusa(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a Medusa folder back: ``(tensors, config)`` from its safetensors and config.json."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / MEDUSA_CONFIG).read_text(encoding="utf-8"))
    return load_file(str(directory / MEDUSA_WEIGHTS)), config


def medusa_draft_logprobs(
    tensors: dict[str, torch.Tensor], config: dict[str, Any], hidden: torch.Tensor
) -> torch.Tensor:
    """The Medusa heads' draft log-probabilities from a Medusa checkpoint's tensors alone.

    Plain torch, independent of the CP head's code: per head h, x <- x + SiLU(W x [+ b]) for
    each of ``num_hidden_layers`` blocks, logits = ``logit_scale`` * lm_head_h x, then the
    log-softmax over the K rows put on the full vocabulary through ``token_map`` (-inf at the
    other ids). As vLLM's Medusa model reads a checkpoint: a ``medusa_heads.`` prefix is
    ignored, ``token_map`` is used only when ``truncated_vocab_size`` < ``vocab_size``,
    ``original_lm_head`` shares ``lm_heads.0.weight``, and an lm_head with more rows than the
    token map is first restricted to its rows.

    Args:
        tensors: the checkpoint's tensors (``load_medusa(...)[0]``).
        config: its ``config.json`` dict.
        hidden: (..., d) target hidden states at the last accepted position.

    Returns:
        (..., num_heads, V) log-probabilities of tokens t + 2 .. t + num_heads + 1, in
        float32 (float64 for float64 ``hidden``).
    """
    tensors = {name.removeprefix(_PREFIX): t for name, t in tensors.items()}
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x0 = hidden.to(dtype)
    vocab = int(config["vocab_size"])
    truncated = int(config.get("truncated_vocab_size") or vocab)
    token_map = tensors.get("token_map") if truncated < vocab else None
    scale = float(config.get("logit_scale", 1.0))
    out = []
    for h in range(int(config["num_heads"])):
        x = x0
        for layer in range(int(config["num_hidden_layers"])):
            w = tensors[f"blocks.{h}.layers.{layer}.weight"].to(x.device, dtype)
            b = tensors.get(f"blocks.{h}.layers.{layer}.bias")
            pre = x @ w.T if b is None else x @ w.T + b.to(x.device, dtype)
            x = x + torch.nn.functional.silu(pre)
        name = "lm_heads.0.weight" if config.get("original_lm_head") else f"lm_heads.{h}.weight"
        lm_head = tensors[name].to(x.device, dtype)
        if token_map is not None and lm_head.shape[0] > token_map.shape[0]:
            lm_head = lm_head[token_map.long()]
        logprobs = torch.log_softmax(scale * (x @ lm_head.T), dim=-1)
        if token_map is not None:
            full = logprobs.new_full((*logprobs.shape[:-1], vocab), -torch.inf)
            full[..., token_map.long().to(x.device)] = logprobs
            logprobs = full
        out.append(logprobs)
    return torch.stack(out, dim=-2)


def main(argv: list[str] | None = None) -> None:
    """``python -m cpd_mtp.hf.medusa EXPORT OUT``: a saved model's head as a Medusa folder."""
    parser = argparse.ArgumentParser(
        prog="python -m cpd_mtp.hf.medusa",
        description="Write the drafts of a rank-1, next_token='base' CP-MTP head in Medusa "
        "format (config.json + model.safetensors), for engines that serve Medusa heads.",
    )
    parser.add_argument("export", type=Path, help="a saved CPDMTPForCausalLM folder")
    parser.add_argument("out", type=Path, help="the Medusa folder to write")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="stored dtype of the weights (default float32)",
    )
    args = parser.parse_args(argv)
    try:
        model = _load_model(args.export)
        out = to_medusa(model, args.out, dtype=getattr(torch, args.dtype))
    except ValueError as error:
        sys.exit(f"error: {error}")
    cfg = model.head.config
    heads = f"{cfg.n_future - 1} Medusa heads (offsets 2..{cfg.n_future})"
    print(f"{out}: {heads}, V={cfg.vocab_size}, K={cfg.draft_vocab}")


def _load_model(path: Path) -> Any:
    """A saved ``CPDMTPForCausalLM`` (drafter-only or merged), or a one-line ``ValueError``."""
    from cpd_mtp.hf.saved import open_export

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a saved model folder (no config.json)")
    try:  # refuse what the head's config alone decides before loading any weight
        values = json.loads((path / "config.json").read_text(encoding="utf-8"))["head_config"]
        cfg = CPDMTPConfig.from_dict(values)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not readable here: open_export names the problem
    else:
        _check_config(cfg)
    return open_export(path, tokenizer=False)[0]


if __name__ == "__main__":
    main()
