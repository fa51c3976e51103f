"""SparseVLM (Zhang et al., ICML 2025): text raters score the visual tokens; dropped tokens are recycled."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, Merger, check_fraction
from prunekit.probes import AttentionRows, LayerInput, Probe
from prunekit.sequence import pad_rows


def select_raters(hidden: Tensor, visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM's text raters from the decoder's input embeddings: ``[batch, seq]`` bool.

    Per sample: ``softmax over text (v @ t^T)``, mean over the visual tokens, and the text tokens
    scoring above the mean of that score are raters (all text tokens when none is above it).
    hidden: [batch, seq, dim]; visual, text: [batch, seq] bool.
    """
    x = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    dots = x @ x.transpose(1, 2)  # [batch, seq, seq]: token i (visual) . token j (text)
    dots = dots.masked_fill(~text[:, None, :], float("-inf"))
    relation = torch.softmax(dots, dim=-1).nan_to_num(0.0)  # softmax over the text columns
    relation = relation.masked_fill(~visual[:, :, None], 0)
    per_text = relation.sum(dim=1) / visual.sum(dim=1, keepdim=True).clamp(min=1)  # [batch, seq]
    mean = (per_text * text).sum(dim=1, keepdim=True) / text.sum(dim=1, keepdim=True).clamp(min=1)
    raters = text & (per_text > mean)
    none = ~raters.any(dim=1, keepdim=True)
    return torch.where(none, text, raters)


@dataclass
class SparseVLMRaters(Criterion):
    """SparseVLM's visual-token score: attention from the text raters, mean over heads and raters.

    The raters are chosen once per prompt from the decoder's input embeddings (every text token
    after the image whose visual-to-text relevance is above the mean). A prune before layer ``L``
    reads the attention of layer ``L - 1`` as it ran on all current tokens, as the official code
    prunes the output of its pruning layers 2, 6 and 15.

    Example::

        criteria: {sparsevlm: {type: sparsevlm}}
        schedule: {type: stages, stages: [{layer: 3, count: 300}, {layer: 7, count: 200}, {layer: 16, count: 110}]}
    """

    name: ClassVar[str] = "sparsevlm"

    def _raters(self) -> str:
        return f"{self.key}/raters"

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        if min(stage_layers) < 1:
            raise ValueError("SparseVLM reads the attention of the layer before each prune: no prune before layer 0")
        yield LayerInput(layer=0)
        for layer in stage_layers:
            yield AttentionRows(layer=layer - 1, queries=self._raters())

    def observe(self, ctx: ForwardContext, probe, inputs: Tensor, output: Tensor | None) -> None:
        layout = ctx.layout
        ctx.buffers[self._raters()] = select_raters(inputs, layout.visual, layout.instruction & layout.valid)

    def score(self, ctx: ForwardContext) -> Tensor:
        return ctx.capture(AttentionRows(layer=ctx.layer - 1, queries=self._raters()))


def density_peak_merge(x: Tensor, clusters: int) -> Tensor:
    """SparseVLM's DPC-kNN clustering and plain-mean merge: ``[n, dim]`` -> ``[clusters, dim]``.

    Distances are L2 / sqrt(dim); density = exp(-mean of the squared distances to the ``clusters``
    nearest tokens); delta = distance to the nearest denser token (the largest distance for the
    densest); the ``clusters`` tokens with the largest delta * density are centers; every token
    joins its nearest center (a center joins itself) and each cluster is the mean of its members.
    Ties break by token order instead of the official code's random 1e-6 jitter.
    """
    n, dim = x.shape
    clusters = min(clusters, n)
    xf = x.to(torch.float64)
    dist = torch.cdist(xf, xf) / dim**0.5  # [n, n]
    nearest = dist.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()  # [n]
    order = torch.arange(n, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (order[None, :] < order[:, None])
    )  # [n, n]: j denser than i
    delta = torch.where(denser, dist, dist.max()).amin(dim=-1)
    centers = torch.sort(delta * density, descending=True, stable=True).indices[:clusters]  # [clusters]
    assign = dist[centers].argmin(dim=0)  # [n]: nearest center of each token
    assign[centers] = torch.arange(clusters, device=x.device)
    merged = torch.zeros(clusters, dim, dtype=torch.float64, device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=clusters).clamp(min=1).to(torch.float64)
    return (merged / counts[:, None]).to(x.dtype)


@dataclass
class SparseVLMRecycling(Merger):
    """SparseVLM's token recycling: the best-scored dropped tokens, clustered into a few summary tokens.

    Of the tokens a stage drops, the top ``int(n * top_fraction) + 1`` by score are clustered
    (density peaks) into ``int(m / tokens_per_cluster) + 1`` tokens, each the mean of its cluster,
    placed right after the kept visual tokens.

    Example::

        merge: {type: sparsevlm_recycle, top_fraction: 0.3, tokens_per_cluster: 10}
    """

    name: ClassVar[str] = "sparsevlm_recycle"
    top_fraction: float = 0.3
    tokens_per_cluster: int = 10

    def validate(self) -> None:
        check_fraction(self.top_fraction, "top_fraction")
        if self.tokens_per_cluster < 1:
            raise ValueError(f"tokens_per_cluster must be >= 1, got {self.tokens_per_cluster}")

    def count(self, dropped: int) -> int:
        """Merged tokens made from ``dropped`` tokens (for the FLOPs model)."""
        if dropped <= 0:
            return 0
        chosen = min(int(dropped * self.top_fraction) + 1, dropped)
        return min(int(chosen / self.tokens_per_cluster) + 1, chosen)

    def merge(self, hidden: Tensor, dropped: Tensor, scores: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        batch, _, dim = hidden.shape
        outputs = []
        for b in range(batch):  # a handful of tokens per sample; clustering is per sample
            index = dropped[b].nonzero().flatten()
            n_merged = self.count(index.numel())
            if n_merged == 0:
                outputs.append(hidden.new_zeros(0, dim))
                continue
            chosen = min(int(index.numel() * self.top_fraction) + 1, index.numel())
            best = torch.sort(scores[b, index], descending=True, stable=True).indices[:chosen]
            outputs.append(density_peak_merge(hidden[b, index[best]], n_merged))
        return pad_rows(outputs, hidden)  # [batch, merged, dim], [batch, merged]
