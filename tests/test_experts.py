"""Expert maps: shapes, near-identity start, offset slicing, against explicit per-expert loops."""

from __future__ import annotations

import pytest
import torch

from cpd_mtp import CPDMTPConfig
from cpd_mtp.experts import ExpertStates


def experts(expert_type, noise=0.5, n=3, r=2, d=5, k=2):
    torch.manual_seed(0)
    cfg = CPDMTPConfig(
        hidden_size=d,
        vocab_size=7,
        n_future=n,
        rank=r,
        expert_type=expert_type,
        expert_inner_size=k,
        expert_init_noise=noise,
    )
    return ExpertStates(cfg).double()


def explicit(module, h):
    """u_{s,a} = phi_{s,a}(h) one expert at a time."""
    out = []
    for e in range(module.n_future * module.rank):
        if module.expert_type == "linear":
            out.append(h @ module.proj[e].T)
        elif module.expert_type == "resblock":
            out.append(h + torch.nn.functional.silu(h @ module.proj_in[e].T) @ module.proj_out[e].T)
        else:
            out.append(h + (h @ module.proj_in[e].T) @ module.proj_out[e].T)
    return torch.stack(out, -2).unflatten(-2, (module.n_future, module.rank))


@pytest.mark.parametrize("expert_type", ["linear", "resblock", "lowrank"])
def test_experts_match_explicit_loop_and_slices(expert_type):
    module = experts(expert_type)
    h = torch.randn(4, 3, 5, dtype=torch.float64)
    u = module(h)
    assert u.shape == (4, 3, 3, 2, 5)
    torch.testing.assert_close(u, explicit(module, h))
    torch.testing.assert_close(module(h, slice(1, 3)), u[..., 1:3, :, :])


@pytest.mark.parametrize("expert_type", ["linear", "resblock", "lowrank"])
def test_zero_noise_starts_at_identity_and_noise_breaks_symmetry(expert_type):
    h = torch.randn(6, 5, dtype=torch.float64)
    u = experts(expert_type, noise=0.0)(h)
    torch.testing.assert_close(u, h[:, None, None, :].expand_as(u))
    u = experts(expert_type, noise=0.01)(h)
    assert (u[:, :, 0] - u[:, :, 1]).abs().max() > 0  # experts differ
    assert ((u - h[:, None, None, :]).norm(dim=-1) / h.norm(dim=-1)[:, None, None]).max() < 0.1
