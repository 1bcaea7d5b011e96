"""The KL-NMF updates against the textbook multiplicative rules they shortcut."""
import pytest
import torch

from stemquery.model.engines.nmf import EPS, kl_nmf


def textbook_kl_nmf(v, w, h, iterations, fixed_columns):
    """Lee and Seung's KL updates, every product written out; the fixed bases' new values are thrown away."""
    ones = torch.ones_like(v)
    for _ in range(iterations):
        h = h * (w.mT @ (v / (w @ h + EPS))) / (w.mT @ ones + EPS)
        w_new = w * ((v / (w @ h + EPS)) @ h.mT) / (ones @ h.mT + EPS)
        w = torch.cat([w[..., :fixed_columns], w_new[..., fixed_columns:]], dim=-1)
        norms = w.sum(dim=-2, keepdim=True) + EPS
        w, h = w / norms, h * norms.mT
    return w, h


@pytest.mark.parametrize("fixed_columns", [0, 5, 10])
def test_kl_nmf_equals_the_textbook_updates(fixed_columns):
    generator = torch.Generator().manual_seed(3)
    v = torch.rand(2, 40, 30, generator=generator, dtype=torch.float64) ** 3
    w = torch.rand(2, 40, 12, generator=generator, dtype=torch.float64) + 0.1
    w = w / w.sum(dim=-2, keepdim=True)
    h = torch.rand(2, 12, 30, generator=generator, dtype=torch.float64) + 0.1
    w_fast, h_fast = kl_nmf(v, w, h, iterations=25, fixed_columns=fixed_columns)
    w_ref, h_ref = textbook_kl_nmf(v, w, h, 25, fixed_columns)
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h_fast, h_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w_fast[..., :fixed_columns], w[..., :fixed_columns] / (1 + EPS), rtol=1e-9, atol=0)
    # The decomposition fits: the divergence fell by a fifth or more from where it started.
    def divergence(w_, h_):
        approx = w_ @ h_ + EPS
        return (v * torch.log((v + EPS) / approx) - v + approx).sum()
    assert divergence(w_fast, h_fast) < 0.8 * divergence(w, h)
