"""How a token-conditioned head reads the next token: the state z = h + f(h, e(x_{t+1})).

A token-conditioned head (``CPDMTPConfig.token_conditioned``) drafts x_{t+2..t+n} given the
trunk's state h_t and the verifier's token x_{t+1}, through its input embedding e. Two ways
to fuse them (``CPDMTPConfig.token_fusion``):

- ``add``: z = h + C e, C a (d, d) map. The token can only shift the experts' inputs by a
  fixed vector, and e is small next to h (norms about 3 against 51 in SmolLM2).
- ``mlp``: z = h + W_2 SiLU(W_1 [h / rms(h); e / rms(e)] + b_1) + b_2, both inputs at unit
  scale, W_1 of shape (2d, 2d): the token's effect depends on the state (a nonlinear fusion,
  as EAGLE's drafter fuses its features with the token embedding).

Both start as the identity map (C = 0, W_2 = 0, b_2 = 0), so a new head computes exactly what
the same head without conditioning does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FUSIONS", "TokenFusion"]

FUSIONS = ("add", "mlp")


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class TokenFusion(nn.Module):
    """The shift f(h, e) added to h: (..., d) and (..., d) -> (..., d).

    Args:
        kind: ``add`` or ``mlp`` (module docstring).
        hidden_size: d.
    """

    def __init__(self, kind: str, hidden_size: int) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"token_fusion must be one of {FUSIONS}, got {kind!r}")
        self.kind = kind
        d = hidden_size
        if kind == "add":
            self.weight = nn.Parameter(torch.zeros(d, d))  # C: (d_out, d_in)
        else:
            self.fc_in = nn.Linear(2 * d, 2 * d)
            self.fc_out = nn.Linear(2 * d, d)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The identity start: C = 0, or W_2 = 0 and b_2 = 0 (W_1, b_1 as ``nn.Linear``)."""
        if self.kind == "add":
            self.weight.zero_()
            return
        self.fc_in.reset_parameters()
        self.fc_out.weight.zero_()
        self.fc_out.bias.zero_()

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """f(h, e) in the fusion's dtype (the caller casts and adds it to h)."""
        if self.kind == "add":
            return nn.functional.linear(embedded.to(self.weight.dtype), self.weight)
        dtype = self.fc_in.weight.dtype
        joined = torch.cat([_unit_rms(hidden.to(dtype)), _unit_rms(embedded.to(dtype))], dim=-1)
        return self.fc_out(nn.functional.silu(self.fc_in(joined)))
