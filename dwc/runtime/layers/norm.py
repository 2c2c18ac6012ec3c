"""RMSNorm, computed in float32 as Llama / Mistral / Qwen2 define it, alone or after the
residual add (the Triton version of both is in fused_triton.py)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [tokens, hidden]; weight: [hidden]."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); without a residual, (rms_norm(x), x)."""
    if residual is not None:
        x = x + residual
    return rms_norm(x, weight, eps), x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate/up output [tokens, 2 n]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
