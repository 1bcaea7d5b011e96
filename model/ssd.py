"""Mamba-2's selective state-space scan (SSD) in pure PyTorch, in its chunked matrix form.

For each head h with scalar decay a_t = exp(dt_t · A_h) the recurrence is

    state_t = a_t · state_{t-1} + dt_t · x_t ⊗ B_t        (headdim × d_state)
    y_t     = state_t · C_t + D_h · x_t

Chunked form (Dao & Gu, 2024): split time into chunks of Q steps. Inside a chunk the map x → y is a masked
matrix product (a "semiseparable" matrix built from cumulative log-decays); across chunks only the final
states travel, through a recurrence over the (few) chunk boundaries, also written as a matrix product. There is
no Python loop over time steps, so it runs at matmul speed on CPU. `sequential_scan` is the step-by-step
reference the tests compare against.

On CUDA, when mamba-ssm is installed, `ssd_scan` dispatches to its fused Triton kernel (same function to rounding).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from einops import rearrange


def _cuda_kernel():
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or no CUDA/Triton: the pure-torch path serves
        return None
    return mamba_chunk_scan_combined


@lru_cache(maxsize=32)
def _lower_mask(size: int, device: torch.device) -> torch.Tensor:
    return torch.tril(torch.ones(size, size, dtype=torch.bool, device=device))


def segment_decay(cumulative: torch.Tensor) -> torch.Tensor:
    """(..., Q) cumulative log-decays → (..., Q, Q) with [i, j] = exp(cum[i] - cum[j]) for j ≤ i, else 0.

    That is the decay from step j to step i. Within a chunk the cumulative sums stay small (Q steps), so the
    difference loses no meaningful precision in float32.
    """
    diff = cumulative[..., :, None] - cumulative[..., None, :]
    return torch.exp(diff.masked_fill(~_lower_mask(cumulative.shape[-1], cumulative.device), float("-inf")))


def chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk: int = 32,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SSD without D. x (b, l, h, p); dt (b, l, h) (already softplus'd); A (h,) negative; B, C (b, l, 1, n)
    (one group, shared by all heads).

    Returns y (b, l, h, p) and the final state (b, h, p, n), or None for it with `return_final_state=False`:
    then a sequence of one chunk from a zero state needs no states at all (the band-axis layers, a third of the
    separator's time, docs/performance.md). Written as batched matmuls over (batch, head, chunk), so no einsum
    reshuffles the operands behind our back.
    """
    batch, length, heads, headdim = x.shape
    if B.shape[2] != 1:
        raise ValueError("chunked_scan supports one group (ngroups = 1)")
    pad = (-length) % chunk
    if pad:  # dt = 0 on padding: no decay and no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    # Contiguous once: it is the right operand of two matmuls, which would each copy a strided view.
    xdt = rearrange(x * dt[..., None], "b (c q) h p -> b h c q p", q=chunk).contiguous()
    B = rearrange(B, "b (c q) g n -> b g c q n", q=chunk)  # g = 1 broadcasts over heads
    C = rearrange(C, "b (c q) g n -> b g c q n", q=chunk)
    cumulative = torch.cumsum(rearrange(dt * A, "b (c q) h -> b h c q", q=chunk), dim=-1)

    # 1. within each chunk: y = (C Bᵀ ∘ decay) x
    scores = (C @ B.transpose(-1, -2)) * segment_decay(cumulative)  # (b, h, c, q, q)
    y = scores @ xdt  # (b, h, c, q, p)
    if initial_state is None and not return_final_state and xdt.shape[2] == 1:
        return rearrange(y, "b h c q p -> b (c q) h p")[:, :length], None

    # 2. each chunk's contribution to the state at its end, as (n, p)
    to_end = torch.exp(cumulative[..., -1:] - cumulative)  # (b, h, c, q)
    chunk_states = (B.transpose(-1, -2) * to_end[..., None, :]) @ xdt  # (b, h, c, n, p)

    # 3. states across chunk boundaries: a small recurrence over chunks, as one matrix product
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, headdim, B.shape[-1])
    chunk_states = torch.cat([initial_state.transpose(-1, -2)[:, :, None], chunk_states], dim=2)
    boundaries = F.pad(cumulative[..., -1], (1, 0)).cumsum(dim=-1)  # (b, h, c+1)
    across = segment_decay(boundaries)  # (b, h, c+1, c+1)
    states = (across @ chunk_states.flatten(-2)).unflatten(-1, chunk_states.shape[-2:])
    entering, final_state = states[:, :, :-1], states[:, :, -1]

    # 4. the state entering each chunk, read out at every step of it
    y = y + (C * torch.exp(cumulative)[..., None]) @ entering
    y = rearrange(y, "b h c q p -> b (c q) h p")[:, :length]
    return y, final_state.transpose(-1, -2) if return_final_state else None


def sequential_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    *, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time: the reference `chunked_scan` must match (tests only; slow)."""
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    state = initial_state if initial_state is not None else x.new_zeros(batch, heads, headdim, d_state)
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(outputs, dim=1), state


def ssd_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    *, chunk: int = 32,
) -> torch.Tensor:
    """y = SSD(x) + D·x, on mamba-ssm's fused kernel for CUDA tensors when it is installed."""
    if x.is_cuda:
        kernel = _cuda_kernel()
        if kernel is not None:
            return kernel(x, dt, A, B, C, chunk_size=chunk, D=D)
    y, _ = chunked_scan(x, dt, A, B, C, chunk=chunk, return_final_state=False)
    return torch.addcmul(y, x, D[:, None])
