"""The query-conditioned band-split Mamba separator (Banquet-style band split, Mamba-2 sequence modelling).

    mix STFT → band split → N × [BiMamba2 over time in each band → BiMamba2 across bands → FiLM(query)
                                 → MatchAttention(mix band-frames → query band-frames)]
             → per-band complex mask → × mix STFT → iSTFT

The query reaches the network by two paths:
- **recognising** (what kind of sound): the query clips go through their own band split of log magnitudes and a
  BiMamba2 over time, pooled over time (mean and standard deviation) into one embedding (several clips: averaged).
  Conditioning is Hyper-FiLM (a hypernetwork turns the embedding into per-band scales and shifts for every block)
  or plain FiLM (one linear map per block, the same for every band), selectable for the ablation; and at the
  input, each bin's mix level against the query's long-term spectrum.
- **matching** (this very sound, `match_heads` > 0): the query goes through the separator's own band split, frame
  by frame, and in every block each band-frame of the mix attends to the query's frames of the same band
  (`MatchAttention`). Several clips are more frames, not an average. Target speaker extraction found the same:
  frame-level cross-attention to the enrolment's spectrogram features generalises out of domain where a pooled
  embedding does not (USEF-TSE, arXiv 2409.02615; arXiv 2410.16059 on a band-split RNN).

With `nmf_prior_iterations`, a query-supervised NMF's share of each bin joins the input and the output is a
learned blend of the network's mask and that share (`NMFPrior`): matching by decomposition beside matching by
attention. With `nmf_prior_exemplars`, a second share from the query's own frames as bases joins the same way.

The network works on spectrograms; the STFT and chunking live in the engine (`engines/bsmamba.py`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from stemquery.model.bands import BandSplit, MaskEstimator, musical_bands
from stemquery.model.mamba2 import BiMamba2
from stemquery.model.parallel import SliceParallel, whole


@dataclass(frozen=True)
class BSMambaConfig:
    sample_rate: int = 44100
    n_fft: int = 2048
    hop: int = 1024
    bands: int = 32
    channels: int = 2
    dim: int = 64
    layers: int = 4
    d_state: int = 32
    headdim: int = 32
    expand: int = 2
    query_dim: int = 128
    query_layers: int = 1
    conditioning: str = "hyperfilm"  # or "film"
    #: Heads of the matching path's cross-attention in every block (0: no matching path, as bsmamba-v2).
    match_heads: int = 0
    #: Iterations of the query-NMF prior (0: none, as bsmamba-v2/v3). With it, the network also reads the share of
    #: each bin that a query-supervised NMF gives the target (`NMFPrior`), and its output is a learned per
    #: band-frame blend of its own mask and that share.
    nmf_prior_iterations: int = 0
    #: Iterations that learn the prior's bases from the query (0: `nmf_prior_iterations`). Queries are short, so
    #: more here costs little at inference, where the mix's decomposition over minutes of audio dominates.
    nmf_prior_query_iterations: int = 0
    #: With the prior: the gate also reads, per band and case, how the network's mask and the NMF share compare
    #: (`NMFPrior.agreement`; bsmamba-v4 has no such input).
    nmf_prior_confidence: bool = False
    #: With the prior: a second share, from this many of the query's own frames as bases (`QueryNMF.exemplars`), read
    #: and blended in as the first is (0: none, as bsmamba-v6). Exemplars match a query that is the very sound in the
    #: mix far better than learned bases, and a different passage far worse: the network learns which to trust.
    nmf_prior_exemplars: int = 0
    #: With the exemplar share: its gate also reads how closely the share's estimate of each frame matches one of the
    #: query's own frames (`Prior.match`, `NMFPrior.match_features`): near-identical where the query is the very
    #: sound in the mix, only alike where it is another passage or another recording (bsmamba-v8).
    nmf_prior_match: bool = False
    #: With the match: both gates also read how closely the learned share's estimate and the mix itself match the
    #: query's frames (`Prior.sources`, `NMFPrior.source_features`). The mix's own match tells a query cut from this
    #: mix (it matches the rest too) from the clean target; the learned share's tells where it is the better one, which
    #: v8's first gate could not see (it shut to 0.14 on the README example, where that share was the best; v9).
    nmf_prior_match_sources: bool = False
    #: Scan chunk (the weights do not depend on it): 32 is the fastest on CPU for training and inference alike
    #: (docs/performance.md).
    chunk: int = 32

    def __post_init__(self) -> None:
        if self.nmf_prior_exemplars and not self.nmf_prior_iterations:
            raise ValueError("nmf_prior_exemplars needs the NMF prior (nmf_prior_iterations > 0)")
        if self.nmf_prior_match and not self.nmf_prior_exemplars:
            raise ValueError("nmf_prior_match needs the exemplar share (nmf_prior_exemplars > 0)")
        if self.nmf_prior_match_sources and not self.nmf_prior_match:
            raise ValueError("nmf_prior_match_sources needs the exemplar match (nmf_prior_match)")

    @property
    def prior_shares(self) -> int:
        """How many NMF shares the model reads (0 without the prior)."""
        return (1 + (self.nmf_prior_exemplars > 0)) if self.nmf_prior_iterations else 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BSMambaConfig":
        return cls(**data)


class FiLM(nn.Module):
    """Per block: (scale, shift) = Linear(query embedding), shared by every band."""

    def __init__(self, query_dim: int, dim: int, bands: int) -> None:
        super().__init__()
        self.proj = nn.Linear(query_dim, 2 * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(query)[:, None, None].chunk(2, dim=-1)
        return x * (1 + scale) + shift


class HyperFiLM(nn.Module):
    """Per block: a hypernetwork maps the query embedding to the weights of a linear map that turns each band's
    learned embedding into that band's (scale, shift). The query decides not only how much to scale but how the
    conditioning differs across frequency."""

    def __init__(self, query_dim: int, dim: int, bands: int, band_dim: int = 16) -> None:
        super().__init__()
        self.band_dim = band_dim
        self.band_embedding = nn.Parameter(torch.randn(bands, band_dim) / band_dim**0.5)
        self.hyper = nn.Sequential(nn.Linear(query_dim, query_dim), nn.SiLU(),
                                   nn.Linear(query_dim, 2 * dim * (band_dim + 1)))
        nn.init.zeros_(self.hyper[-1].weight)
        nn.init.zeros_(self.hyper[-1].bias)

    def forward(self, x: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        params = rearrange(self.hyper(query), "b (o i) -> b o i", i=self.band_dim + 1)
        weight, bias = params[..., :-1], params[..., -1]
        film = torch.einsum("boi,ki->bko", weight, self.band_embedding) + bias[:, None]  # (b, bands, 2·dim)
        scale, shift = film[:, :, None].chunk(2, dim=-1)
        return x * (1 + scale) + shift


CONDITIONING = {"film": FiLM, "hyperfilm": HyperFiLM}

#: The exemplar share's weight in the blend at the start (`BSMamba.exemplar_prior`).
EXEMPLAR_GATE_START = 0.1

#: What `NMFPrior.agreement` measures, per band and over the whole spectrum: the network mask's mean, the share's
#: mean, their correlation.
AGREEMENT_STATISTICS = 3

#: The exemplar gate's match inputs (`NMFPrior.match_features`): per frame and over the case.
MATCH_STATISTICS = 2
#: Whose frame match every gate reads with `nmf_prior_match_sources` (`NMFPrior.source_features`), in this order.
MATCH_SOURCES = ("exemplar share", "learned share", "mix")
#: Cosine similarities of matching frames crowd just below 1: −log(1 − cos) spreads them out, and this centre and
#: scale put 0.94 (about where, on 48 val_unseen cases, the exemplar share starts to beat the mask before it) at 0
#: and 0.70 … 0.99 at about −2 … +2.3.
MATCH_CENTRE, MATCH_SCALE = 2.8, 0.8


class Prior(NamedTuple):
    """What the query-NMF prior gives the network (`engines.bsmamba.QueryPrior.prior`): each kind of bases' share
    of every bin, and with `nmf_prior_match` how closely the exemplar share's estimate of each frame matches its
    nearest query frame (cosine similarity of square-root magnitudes); with `nmf_prior_match_sources` also the
    learned share's estimate's and the mix's."""

    shares: torch.Tensor  # (batch, shares, bins, frames), 0 to 1
    match: torch.Tensor | None = None  # (batch, frames), −1 to 1
    #: with `nmf_prior_match_sources`: the same for the learned share's estimate and for the mix itself
    sources: torch.Tensor | None = None  # (batch, 2, frames), −1 to 1


def relative_log_power(spec: torch.Tensor) -> torch.Tensor:
    """Complex STFT (b, c, f, t) → channel-averaged log10 power relative to the clip's mean power, halved
    (about −3 … 1.5; floor 60 dB under the mean): the same for a louder or quieter copy of the clip."""
    power = spec.abs().float().pow(2).mean(dim=1)
    reference = power.mean(dim=(1, 2), keepdim=True) + 1e-12
    return torch.log10(power / reference + 1e-6) / 2


class QueryCondition(NamedTuple):
    """What the separator is conditioned on: the query embedding (FiLM / Hyper-FiLM), the query's long-term
    spectrum (its mean relative log power per bin), which the mix's spectrum is compared with at the input, and
    the query's band-frames for the matching path (None without it)."""

    embedding: torch.Tensor  # (batch, query_dim)
    profile: torch.Tensor  # (batch, bins)
    frames: torch.Tensor | None = None  # (batch, bands, query frames, dim)


class MatchAttention(nn.Module):
    """Each band-frame of the mix attends to the query's frames of the same band (multi-head cross-attention),
    and what it finds is added to it: "is there something here like that, and what does it look like".

    Queries come from the mix's features at this depth, keys and values from the query's band-split features; the
    output projection starts at zero, so a model trained without this path starts out unchanged."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by match_heads {heads}")
        self.heads = heads
        self.norm_mix, self.norm_query = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """x (b, k, t, d), frames (b, k, s, d) → (b, k, t, d)."""
        q = rearrange(self.to_q(self.norm_mix(x)), "b k t (h e) -> b k h t e", h=self.heads)
        k, v = (rearrange(part, "b k s (h e) -> b k h s e", h=self.heads)
                for part in self.to_kv(self.norm_query(frames)).chunk(2, dim=-1))
        found = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return x + self.out(rearrange(found, "b k h t e -> b k t (h e)"))


class NMFPrior(nn.Module):
    """Where the network meets the classical engine. NMF with bases learned from the query does nothing but match,
    and wins whenever the example is the same sound (a later passage, the clean target itself); the network
    recognises what kind of sound is asked for and wins where NMF collapses (another song, another source). Their
    errors are complementary: a plain average of the two estimates beat both on held-out sets (issue 16).

    In: the NMF share of each bin (batch, bins, frames), 0 to 1, projected per band and added to the band-split
    features (zero at the start). Out: mask = (1 − g)·network mask + g·share, with g per band and frame from the
    last block's features and (with `confidence`) per band and case from how the two masks compare (`agreement`);
    g starts at 0.5, the plain average, and learns where to trust which.

    Why the comparison: whether the NMF is right is a property of the whole case (was the query this very sound?),
    and the features alone did not tell it: bsmamba-v4's gate stayed near 0.5 both on val_unseen cases where the
    prior alone beat the network's own mask by 8 dB and on cases where it lost by 20. Over 28 cases, the prior's
    advantage correlated with the difference of the fractions of the mix the two masks claim (r = 0.43) and with
    their correlation (r = 0.25); with these as inputs, v5's gate follows the case (r = 0.50 against v4's −0.25;
    docs/results.md, session 9)."""

    def __init__(self, bands: list[tuple[int, int]], dim: int, *, confidence: bool = False,
                 gate_start: float = 0.5, match: bool = False, sources: bool = False) -> None:
        super().__init__()
        self.bands = bands
        self.inputs = nn.ModuleList(nn.Linear(stop - start, dim) for start, stop in bands)
        for linear in self.inputs:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.gate_norm = nn.RMSNorm(dim)
        self.gate_weight = nn.Parameter(torch.zeros(len(bands), dim))
        self.gate_bias = nn.Parameter(torch.full((len(bands),), math.log(gate_start / (1 - gate_start))))
        self.confidence = None
        if confidence:
            self.band_embedding = nn.Parameter(torch.randn(len(bands), 8) / 8 ** 0.5)
            self.confidence = nn.Sequential(nn.Linear(2 * AGREEMENT_STATISTICS + 8, 32), nn.SiLU(), nn.Linear(32, 1))
            nn.init.zeros_(self.confidence[-1].weight)
            nn.init.zeros_(self.confidence[-1].bias)
        # per band, the weights of the match inputs in the gate's logit: zero, so a model without them starts
        # unchanged
        self.match_weight = nn.Parameter(torch.zeros(len(bands), MATCH_STATISTICS)) if match else None
        # per band, the weights of every source's match (`source_features`): zero, as above
        self.source_weight = nn.Parameter(torch.zeros(len(bands), MATCH_STATISTICS * len(MATCH_SOURCES))) \
            if sources else None
        self.register_buffer("band_of_bin", torch.cat([torch.full((stop - start,), index)
                                                       for index, (start, stop) in enumerate(bands)]),
                             persistent=False)

    def features(self, share: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch, bins, frames) → (batch, bands, frames, dim)."""
        return torch.stack([linear(rearrange(share[:, start:stop], "b f t -> b t f").to(dtype))
                            for (start, stop), linear in zip(self.bands, self.inputs)], dim=1)

    def blend(self, mask: torch.Tensor, share: torch.Tensor, x: torch.Tensor, power: torch.Tensor,
              match: torch.Tensor | None = None, sources: torch.Tensor | None = None) -> torch.Tensor:
        """Complex mask (b, c, f, t), share (b, f, t), features (b, k, t, d), the mix's power (b, f, t) and, for a
        gate with match weights, the share's frame match (b, t), for one with source weights every source's
        (b, len(MATCH_SOURCES), t) → the blended complex mask."""
        gate = self.gate(mask, share, x, power, match, sources)[:, self.band_of_bin][:, None]  # (b, 1, f, t)
        return mask * (1 - gate) + share[:, None].float() * gate

    def gate(self, mask: torch.Tensor, share: torch.Tensor, x: torch.Tensor, power: torch.Tensor,
             match: torch.Tensor | None = None, sources: torch.Tensor | None = None) -> torch.Tensor:
        """The share's weight g in the blend, per band and frame (b, k, t)."""
        logit = torch.einsum("bktd,kd->bkt", self.gate_norm(x).float(), self.gate_weight) + self.gate_bias[:, None]
        if self.confidence is not None:
            with torch.autocast(power.device.type, enabled=False):  # means and correlations over many bins: fp32
                statistics = self.agreement(mask.detach().abs().float().mean(dim=1).clamp(max=1.0), share.float(),
                                            power.float())
            logit = logit + self.confidence(torch.cat([statistics, self.band_embedding.expand(len(x), -1, -1)],
                                                      dim=-1)).float()
        if self.match_weight is not None:
            if match is None:
                raise ValueError("this model's exemplar gate reads the frame match: pass a Prior with match")
            logit = logit + torch.einsum("btm,km->bkt", self.match_features(match, share, power), self.match_weight)
        if self.source_weight is not None:
            if sources is None:
                raise ValueError("this model's gates read every source's frame match: pass a Prior with sources")
            logit = logit + torch.einsum("btm,km->bkt", self.source_features(sources, power), self.source_weight)
        return torch.sigmoid(logit)

    @staticmethod
    def match_score(match: torch.Tensor) -> torch.Tensor:
        """Cosine similarities, spread out by −log(1 − cos) and centred (`MATCH_CENTRE`, `MATCH_SCALE`)."""
        return ((-torch.log1p(-match.float().clamp(-1.0, 1.0 - 1e-4)) - MATCH_CENTRE) / MATCH_SCALE).clamp(-4, 4)

    @staticmethod
    def weighted_mean(score: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-frame scores (…, t) → their mean over the case weighted by (…, t), expanded back to (…, t)."""
        weight = weight + 1e-12
        return ((score * weight).sum(dim=-1, keepdim=True) / weight.sum(dim=-1, keepdim=True)).expand_as(score)

    @classmethod
    @torch.no_grad()
    def source_features(cls, sources: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        """Every source's frame match (b, len(MATCH_SOURCES), t) → (b, t, MATCH_STATISTICS · sources): each
        frame's score and the case's mean weighted by the mix's power, source by source.

        Why the mix's own match: on the session-13 diagnostic the exemplar share lost most where the query was a
        region of this very mix (mixture_region: v8 −0.89 dB on test against v6's +0.25). There the exemplars
        hold the rest of the mix as well, and the mix matches them almost as closely as the share's estimate does
        (0.87 against 0.91); with the clean target as the query it does not (0.79 against 0.96)."""
        score = cls.match_score(sources)
        case = cls.weighted_mean(score, power.float().sum(dim=1)[:, None])
        return rearrange(torch.stack([score, case], dim=-1), "b s t m -> b t (s m)")

    @staticmethod
    @torch.no_grad()
    def match_features(match: torch.Tensor, share: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        """The frame match (b, t) as the gate reads it (b, t, MATCH_STATISTICS): each frame's, and its mean over
        the case weighted by the power the share claims (quiet frames match anything), both spread out by
        −log(1 − cos) and centred.

        Why: with v7's inputs alone the exemplar gate opened to 0.95 on the README example, where the learned share
        was 1 dB better. On 48 val_unseen cases (32 clips, 16 clean targets as the query), this case mean of the
        cosine correlated with the exemplar share's advantage over the mask before it at r = 0.83 (v7's gate:
        0.70), and above or below 0.93 it told which of the two was better in 90 % of the cases
        (docs/results.md, session 13)."""
        score = NMFPrior.match_score(match)
        return torch.stack([score, NMFPrior.weighted_mean(score, (share.float() * power.float()).sum(dim=1))], dim=-1)

    @torch.no_grad()
    def agreement(self, network: torch.Tensor, share: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        """How the network's mask and the NMF share compare, weighted by the mix's power, per band and over all
        bins: each one's mean (the fraction of the mix it claims) and their correlation. (b, f, t) each →
        (b, bands, 2 · AGREEMENT_STATISTICS)."""
        one_hot = F.one_hot(self.band_of_bin, len(self.bands)).to(power.dtype)  # (f, k)
        weight = power.float() + 1e-12
        per_band = torch.einsum("bft,fk->bk", weight, one_hot)

        def mean(values, over_bands=True):
            if over_bands:
                return torch.einsum("bft,fk->bk", values * weight, one_hot) / per_band
            return (values * weight).sum(dim=(1, 2))[:, None] / weight.sum(dim=(1, 2))[:, None]

        rows = []
        for over_bands in (True, False):
            mean_net, mean_share = mean(network, over_bands), mean(share, over_bands)
            expand = (lambda m: m[:, self.band_of_bin, None]) if over_bands else (lambda m: m[:, :, None])
            dn, ds = network - expand(mean_net), share - expand(mean_share)
            covariance = mean(dn * ds, over_bands)
            correlation = covariance / (mean(dn * dn, over_bands) * mean(ds * ds, over_bands) + 1e-8).sqrt()
            rows += [mean_net, mean_share, correlation]
        rows = [row.expand(-1, len(self.bands)) for row in rows]
        return torch.stack(rows, dim=-1)


class QueryEncoder(nn.Module):
    """Query spectrogram(s) → one embedding (batch, query_dim).

    It reads log magnitudes, not the complex values the separator reads: a clip's timbre is in its magnitude
    spectrum, and complex values with their arbitrary phases average to nothing when pooled over time (the first
    design did that: its embeddings of different instruments were 99.6 % alike, and the separator could not tell
    what was asked for). Per band: the channel-averaged log power of each bin relative to the clip's mean power
    (so the clip's gain does not matter), a Linear, a BiMamba over time; then the mean and standard deviation over
    time of every band (statistics pooling), joined across bands, through an MLP.
    """

    def __init__(self, config: BSMambaConfig, bands: list[tuple[int, int]]) -> None:
        super().__init__()
        mamba = dict(d_state=config.d_state, headdim=config.headdim, expand=config.expand, chunk=config.chunk)
        self.bands = bands
        self.projections = nn.ModuleList(nn.Linear(stop - start, config.dim) for start, stop in bands)
        self.layers = nn.ModuleList(BiMamba2(config.dim, **mamba) for _ in range(config.query_layers))
        self.out = nn.Sequential(nn.RMSNorm(2 * config.dim * len(bands)),
                                 nn.Linear(2 * config.dim * len(bands), config.query_dim), nn.SiLU(),
                                 nn.Linear(config.query_dim, config.query_dim))

    def forward(self, spec: torch.Tensor) -> QueryCondition:
        relative = relative_log_power(spec)  # (b, f, t)
        x = torch.stack([projection(rearrange(relative[:, start:stop], "b f t -> b t f"))
                         for (start, stop), projection in zip(self.bands, self.projections)], dim=1)  # (b, k, t, d)
        bands = x.shape[1]
        x = rearrange(x, "b k t d -> (b k) t d")
        for layer in self.layers:
            x = layer(x)
        x = rearrange(x, "(b k) t d -> b k t d", k=bands)
        pooled = torch.cat([x.mean(dim=2), x.std(dim=2, correction=0)], dim=-1)  # (b, k, 2d)
        return QueryCondition(self.out(pooled.flatten(1)), relative.mean(dim=-1))


class Block(nn.Module):
    def __init__(self, config: BSMambaConfig, bands: int) -> None:
        super().__init__()
        mamba = dict(d_state=config.d_state, headdim=config.headdim, expand=config.expand, chunk=config.chunk)
        self.time = BiMamba2(config.dim, **mamba)
        # Across bands the sequence is only `bands` long: one chunk of exactly that length.
        self.band = BiMamba2(config.dim, **{**mamba, "expand": 1, "chunk": bands})
        self.film = CONDITIONING[config.conditioning](config.query_dim, config.dim, bands)
        self.match = MatchAttention(config.dim, config.match_heads) if config.match_heads else None

    def forward(self, x: torch.Tensor, query: QueryCondition, parallel: SliceParallel | None = None) -> torch.Tensor:
        run = parallel or whole
        batch, bands = x.shape[:2]
        x = rearrange(run(self.time, rearrange(x, "b k t d -> (b k) t d")), "(b k) t d -> b k t d", k=bands)
        x = rearrange(run(self.band, rearrange(x, "b k t d -> (b t) k d")), "(b t) k d -> b k t d", b=batch)
        x = self.film(x, query.embedding)
        return x if self.match is None else self.match(x, query.frames)


class BSMamba(nn.Module):
    def __init__(self, config: BSMambaConfig) -> None:
        super().__init__()
        self.config = config
        self.bands = musical_bands(config.n_fft // 2 + 1, config.sample_rate, config.bands)
        self.split = BandSplit(self.bands, config.channels, config.dim, per_bin=1)
        self.query_encoder = QueryEncoder(config, self.bands)
        self.blocks = nn.ModuleList(Block(config, len(self.bands)) for _ in range(config.layers))
        # The band split is linear in the complex bins, so its features of a frame depend on that frame's phases,
        # which two recordings of one sound do not share: a small MLP lets the query's frames say what is phase-free
        # (magnitudes, the per-bin level cue) before the mix's band-frames are compared with them.
        self.query_frame_mlp = nn.Sequential(nn.RMSNorm(config.dim), nn.Linear(config.dim, 2 * config.dim), nn.SiLU(),
                                             nn.Linear(2 * config.dim, config.dim)) if config.match_heads else None
        self.mask = MaskEstimator(self.bands, config.channels, config.dim)
        sources = config.nmf_prior_match_sources
        self.prior = NMFPrior(self.bands, config.dim, confidence=config.nmf_prior_confidence, sources=sources) \
            if config.nmf_prior_iterations else None
        # The exemplar share is blended in after the first, starting nearly shut: a model trained without it starts
        # out close to what it was.
        self.exemplar_prior = NMFPrior(self.bands, config.dim, confidence=config.nmf_prior_confidence,
                                       gate_start=EXEMPLAR_GATE_START, match=config.nmf_prior_match,
                                       sources=sources) \
            if config.nmf_prior_exemplars else None

    def embed_queries(self, query_specs: list[torch.Tensor]) -> QueryCondition:
        """Each (batch, channels, bins, frames) → one condition: embeddings and profiles averaged over the clips,
        the clips' band-frames joined end to end for the matching path."""
        conditions = [self.query_encoder(spec) for spec in query_specs]
        embedding = torch.stack([c.embedding for c in conditions]).mean(dim=0)
        profile = torch.stack([c.profile for c in conditions]).mean(dim=0)
        if not self.config.match_heads:
            return QueryCondition(embedding, profile)
        frames = torch.cat([self.query_frames(spec, condition.profile)
                            for spec, condition in zip(query_specs, conditions)], dim=2)
        return QueryCondition(embedding, profile, frames)

    def query_frames(self, spec: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """A query clip through the separator's own band split, as the mix goes: (batch, bands, frames, dim)."""
        frames = self.split(spec, self.match_cue(spec, profile))
        return frames + self.query_frame_mlp(frames)

    @staticmethod
    def match_cue(spec: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """Per bin and frame, how far the clip's relative log power is above the query's long-term spectrum."""
        return (relative_log_power(spec) - profile[..., None])[:, None]  # (b, 1, f, t)

    def forward(self, mix_spec: torch.Tensor, query: QueryCondition, *, prior: Prior | torch.Tensor | None = None,
                parallel: SliceParallel | None = None, progress: Callable[[float], None] | None = None,
                stages: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Complex mix STFT (batch, channels, bins, frames) → complex target STFT, same shape.

        Each band's input holds, per bin, how far the mix's relative log power is above the query's long-term
        spectrum: a direct "does this look like the query" cue from the first layer on. With the query reaching the
        network only through FiLM, it stayed a constant ~0.85 × mix for 800 steps (docs/results.md).
        `prior` is the query-NMF share of each bin (`engines.bsmamba.QueryPrior.prior`), required with
        `nmf_prior_iterations`: a `Prior`, or its shares alone (batch, shares, bins, frames), or one share
        (batch, bins, frames); with `nmf_prior_match`, a `Prior` with its match.
        `parallel` runs the per-band maps and the sequence layers slice by slice on worker threads (CPU inference:
        `model/parallel.py`); `progress(fraction)` is told after each block, so a long segment reports as it goes.
        `stages`, if given, receives the target estimate after each blend but the last (training's `stage_loss`)."""
        priors, sources = self._priors(prior)
        x = self.split(mix_spec, self.match_cue(mix_spec, query.profile), parallel)
        for module, share, _ in priors:
            x = x + module.features(share, x.dtype)
        for index, block in enumerate(self.blocks):
            x = block(x, query, parallel)
            if progress:
                progress((index + 1) / (len(self.blocks) + 1))
        mask = self.mask(x, parallel)
        power = mix_spec.abs().pow(2).mean(dim=1) if priors else None
        for index, (module, share, match) in enumerate(priors):
            mask = module.blend(mask, share, x, power, match, sources)
            if stages is not None and index < len(priors) - 1:
                stages.append(mask * mix_spec)
        return mask * mix_spec

    def _priors(self, prior: Prior | torch.Tensor | None
                ) -> tuple[list[tuple[NMFPrior, torch.Tensor, torch.Tensor | None]], torch.Tensor | None]:
        """Each prior module with its share and frame match (None but for the exemplar share with
        `nmf_prior_match`), and every source's match (b, len(MATCH_SOURCES), t) with `nmf_prior_match_sources`
        (else None), checked against the config."""
        expected = self.config.prior_shares
        if (prior is None) != (expected == 0):
            raise ValueError("this model takes an NMF prior" if prior is None else "this model takes no NMF prior")
        if prior is None:
            return [], None
        shares, match, sources = prior if isinstance(prior, Prior) else (prior, None, None)
        shares = shares[:, None] if shares.dim() == 3 else shares
        if shares.shape[1] != expected:
            raise ValueError(f"this model takes {expected} NMF share(s), got {shares.shape[1]}")
        if self.config.nmf_prior_match and match is None:
            raise ValueError("this model reads the exemplar share's frame match: pass a Prior with match "
                             "(engines.bsmamba.QueryPrior.prior)")
        if self.config.nmf_prior_match_sources:
            if sources is None:
                raise ValueError("this model reads the learned share's and the mix's frame match too: pass a Prior "
                                 "with sources (engines.bsmamba.QueryPrior.prior)")
            sources = torch.cat([match[:, None], sources], dim=1)
        else:
            sources = None
        modules = [self.prior] + ([self.exemplar_prior] if self.exemplar_prior is not None else [])
        matches = [None] * (expected - 1) + [match if self.config.nmf_prior_match else None]
        return list(zip(modules, shares.unbind(dim=1), matches)), sources
