"""Expert maps phi_{s,a}: the trunk state h to one state u_{t,s,a} per (offset s, expert a).

All n·r experts of a type are stored stacked, so one einsum computes them together.
Every type starts near the identity (so a head built from a trained lm_head starts near that
model) with small noise that breaks the symmetry between experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cpd_mtp.config import CPDMTPConfig


class ExpertStates(nn.Module):
    """phi: (..., d) -> (..., n, r, d).

    ``linear``: u = A h. ``resblock``: u = h + A SiLU(B h). ``lowrank``: u = h + B A h.
    """

    def __init__(self, config: CPDMTPConfig) -> None:
        super().__init__()
        self.expert_type = config.expert_type
        self.n_future = config.n_future
        self.rank = config.rank
        self.noise = config.expert_init_noise
        d, experts = config.hidden_size, config.n_future * config.rank
        if self.expert_type == "linear":
            self.proj = nn.Parameter(torch.empty(experts, d, d))  # (E, d_out, d_in)
        elif self.expert_type == "resblock":
            self.proj_in = nn.Parameter(torch.empty(experts, d, d))  # B: (E, d_mid, d_in)
            self.proj_out = nn.Parameter(torch.empty(experts, d, d))  # A: (E, d_out, d_mid)
        else:
            k = config.expert_inner_size
            self.proj_in = nn.Parameter(torch.empty(experts, k, d))  # A: (E, k, d)
            self.proj_out = nn.Parameter(torch.empty(experts, d, k))  # B: (E, d, k)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.expert_type == "linear":
            d = self.proj.shape[-1]
            eye = torch.eye(d, dtype=self.proj.dtype, device=self.proj.device)
            self.proj.copy_(eye + torch.randn_like(self.proj) * (self.noise / math.sqrt(d)))
            return
        fan_in, fan_mid = self.proj_in.shape[-1], self.proj_out.shape[-1]
        self.proj_in.normal_(0.0, 1.0 / math.sqrt(fan_in))
        # The residual branch starts small: u ≈ h plus noise of relative size `noise`.
        self.proj_out.normal_(0.0, self.noise / math.sqrt(fan_mid))

    def forward(self, hidden: torch.Tensor, offsets: slice | None = None) -> torch.Tensor:
        """Expert states for every offset, or only those in ``offsets`` (e.g. ``slice(0, 1)``).

        Args:
            hidden: (..., d).

        Returns:
            (..., n', r, d) with n' the number of offsets selected.
        """
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        params = self._stacked(offsets)
        if self.expert_type == "linear":
            u = torch.einsum("td,eod->teo", h, params[0])  # (N, E', d)
        elif self.expert_type == "resblock":
            mid = torch.nn.functional.silu(torch.einsum("td,ekd->tek", h, params[0]))
            u = h[:, None, :] + torch.einsum("tek,eok->teo", mid, params[1])
        else:
            inner = torch.einsum("td,ekd->tek", h, params[0])  # (N, E', k)
            u = h[:, None, :] + torch.einsum("tek,eok->teo", inner, params[1])
        # The explicit offset count keeps zero rows (B = 0 or T = 0) reshapeable.
        return u.reshape(*lead, u.shape[1] // self.rank, self.rank, h.shape[-1])

    def _stacked(self, offsets: slice | None) -> list[torch.Tensor]:
        names = ["proj"] if self.expert_type == "linear" else ["proj_in", "proj_out"]
        params = [getattr(self, name) for name in names]
        if offsets is None:
            return params
        # Experts are stored offset-major: index e = s·r + a.
        start, stop, _ = offsets.indices(self.n_future)
        return [p[start * self.rank : stop * self.rank] for p in params]
