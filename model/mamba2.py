"""A Mamba-2 layer with mamba-ssm's parameter names and shapes, so state dicts load strictly both ways
(`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj`; ngroups = 1, no biases on projections).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stemquery.model.ssd import ssd_scan


class GatedRMSNorm(nn.Module):
    """RMSNorm(x · silu(z)): mamba-ssm's RMSNormGated with norm_before_gate=False."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x * F.silu(z), (x.shape[-1],), self.weight, self.eps)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, *, d_state: int = 32, d_conv: int = 4, expand: int = 2, headdim: int = 32,
                 chunk: int = 32, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand·d_model = {self.d_inner} must be a multiple of headdim = {headdim}")
        self.d_state, self.headdim, self.chunk = d_state, headdim, chunk
        self.nheads = self.d_inner // headdim
        conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        # Step sizes start log-uniform in [dt_min, dt_max]: dt_bias is softplus⁻¹ of them (as mamba-ssm does).
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _causal_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The depthwise causal conv1d (kernel d_conv) on (batch, length, channels): `self.conv1d`'s weights on the
        input padded on the left only, so the output has the input's length and step t sees steps ≤ t.

        Computed as d_conv shifted multiply-adds in the (batch, length, channels) layout rather than by
        `F.conv1d`: the same numbers, without the two transposes, and on CPU about 1.7× faster (a depthwise
        convolution has too little work per output for the convolution kernels to pay off)."""
        weight = self.conv1d.weight[:, 0, :].to(x.dtype)  # (channels, kernel); x's dtype, as conv1d under autocast
        kernel, length = weight.shape[-1], x.shape[1]
        padded = F.pad(x, (0, 0, kernel - 1, 0))
        out = torch.addcmul(self.conv1d.bias.to(x.dtype), padded[:, :length], weight[:, 0])
        for k in range(1, kernel):
            out.addcmul_(padded[:, k:k + length], weight[:, k])
        return out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(batch, length, d_model) → same shape, causal in `length`."""
        z, xbc, dt = torch.split(self.in_proj(u), [self.d_inner, self.d_inner + 2 * self.d_state, self.nheads], -1)
        xbc = F.silu(self._causal_conv(xbc))
        x, B, C = torch.split(xbc, [self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        A = -torch.exp(self.A_log.float())
        y = ssd_scan(rearrange(x, "b l (h p) -> b l h p", p=self.headdim), dt, A, B[:, :, None], C[:, :, None],
                     self.D, chunk=self.chunk)
        return self.out_proj(self.norm(rearrange(y, "b l h p -> b l (h p)"), z))


class BiMamba2(nn.Module):
    """Pre-norm residual bidirectional Mamba-2: one layer reads forwards, one backwards, outputs summed."""

    def __init__(self, d_model: int, **mamba) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model)
        self.forward_layer = Mamba2(d_model, **mamba)
        self.backward_layer = Mamba2(d_model, **mamba)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.forward_layer(h) + self.backward_layer(h.flip(1)).flip(1)
