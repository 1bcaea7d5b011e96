"""Mamba-2 SSD: the chunked matrix form equals the step-by-step recurrence; mamba-ssm's names and kernel."""
import pytest
import torch

from stemquery.model.mamba2 import Mamba2
from stemquery.model.ssd import chunked_scan, sequential_scan, ssd_scan


def random_inputs(batch=2, length=77, heads=4, headdim=8, d_state=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, headdim, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=g, dtype=dtype))
    A = -torch.rand(heads, generator=g, dtype=dtype) * 4
    B = torch.randn(batch, length, 1, d_state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, 1, d_state, generator=g, dtype=dtype)
    state = torch.randn(batch, heads, headdim, d_state, generator=g, dtype=dtype)
    return x, dt, A, B, C, state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("length, chunk", [(77, 16), (64, 32), (5, 64), (130, 64)])
def test_chunked_scan_equals_sequential_outputs_and_state(length, chunk):
    x, dt, A, B, C, state = random_inputs(length=length)
    y, final = chunked_scan(x, dt, A, B, C, chunk=chunk, initial_state=state)
    y_ref, final_ref = sequential_scan(x, dt, A, B, C, initial_state=state)
    assert y.shape == y_ref.shape and final.shape == final_ref.shape == state.shape
    assert relative_error(y, y_ref) <= 1e-5
    assert relative_error(final, final_ref) <= 1e-5


@pytest.mark.parametrize("length, chunk", [(32, 32), (29, 32), (77, 16)])
def test_ssd_scan_from_zero_state_equals_sequential_plus_skip(length, chunk):
    """`ssd_scan` asks for no final state, which skips the state passes on a one-chunk sequence (the band axis)."""
    x, dt, A, B, C, _ = random_inputs(length=length)
    D = torch.randn(x.shape[2])
    y_ref, _ = sequential_scan(x, dt, A, B, C)
    assert chunked_scan(x, dt, A, B, C, chunk=chunk, return_final_state=False)[1] is None
    assert relative_error(ssd_scan(x, dt, A, B, C, D, chunk=chunk), y_ref + x * D[:, None]) <= 1e-5


def test_chunked_scan_gradients_equal_sequential():
    inputs = random_inputs(length=45)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    other = [t.clone().requires_grad_(True) for t in inputs]
    weight = torch.randn(2, 45, 4, 8, generator=torch.Generator().manual_seed(1))
    y, final = chunked_scan(*leaves[:5], chunk=16, initial_state=leaves[5])
    ((y * weight).sum() + final.sum()).backward()
    y_ref, final_ref = sequential_scan(*other[:5], initial_state=other[5])
    ((y_ref * weight).sum() + final_ref.sum()).backward()
    for name, a, b in zip(["x", "dt", "A", "B", "C", "state"], leaves, other):
        assert relative_error(a.grad, b.grad) <= 1e-5, name


def test_mamba2_uses_mamba_ssm_parameter_names_and_shapes():
    layer = Mamba2(64, d_state=32, headdim=32, expand=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    # mamba_ssm.modules.mamba2.Mamba2(d_model=64, d_state=32, headdim=32, expand=2, ngroups=1, bias=False)
    assert shapes == {
        "in_proj.weight": (2 * 128 + 2 * 32 + 4, 64), "conv1d.weight": (192, 1, 4), "conv1d.bias": (192,),
        "dt_bias": (4,), "A_log": (4,), "D": (4,), "norm.weight": (128,), "out_proj.weight": (64, 128),
    }
    copy = Mamba2(64, d_state=32, headdim=32, expand=2)
    copy.load_state_dict(layer.state_dict(), strict=True)
    u = torch.randn(2, 50, 64)
    torch.testing.assert_close(copy(u), layer(u))


def test_causal_conv_equals_mamba_ssm_padded_conv1d_cut_to_length():
    layer = Mamba2(32, d_state=16, headdim=16)
    x = torch.randn(3, 21, layer.conv1d.in_channels)
    reference = layer.conv1d(x.transpose(1, 2))[..., :21].transpose(1, 2)
    torch.testing.assert_close(layer._causal_conv(x), reference, rtol=1e-5, atol=1e-6)


def test_mamba2_is_causal():
    layer = Mamba2(32, d_state=16, headdim=16, chunk=16).eval()
    u = torch.randn(1, 40, 32)
    changed = u.clone()
    changed[:, 30:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(layer(u)[:, :30], layer(changed)[:, :30])


def _mamba_ssm_kernel():
    if not torch.cuda.is_available():
        return None, "no CUDA device on this machine"
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as exc:
        return None, f"mamba-ssm not installed ({exc})"
    return mamba_chunk_scan_combined, ""


def test_cuda_kernel_parity_with_mamba_ssm():
    kernel, reason = _mamba_ssm_kernel()
    if kernel is None:
        pytest.skip(f"mamba-ssm parity needs its CUDA kernel: {reason}")
    x, dt, A, B, C, _ = (t.cuda() for t in random_inputs(length=256, headdim=64, d_state=64))
    D = torch.ones(4, device="cuda")
    expected = kernel(x, dt, A, B, C, chunk_size=64, D=D)
    y, _ = chunked_scan(x, dt, A, B, C, chunk=64)
    assert relative_error(y + x * D[:, None], expected) <= 1e-3
    assert relative_error(ssd_scan(x, dt, A, B, C, D), expected) <= 1e-5
