"""Attention rows for a few queries, and the attention function that captures them.

Criteria that read attention (FastV, IGA, PyramidDrop) need the softmax rows of a handful of
queries, never the full ``seq x seq`` matrix. While a pruner that needs them is active, the
language model's config names a registered transformers attention function that wraps the
model's own (sdpa, flash_attention_2, eager, ...): it hands ``(query, key)`` after RoPE to the
pruner, then calls the original, so the model's numerics do not change.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prunekit.sequence import pack

_names = itertools.count()


def attention_rows(
    query: Tensor,
    key: Tensor,
    scaling: float,
    query_weights: Tensor,
    key_valid: Tensor,
) -> Tensor:
    """Mean attention of weighted queries over all keys, causal and padding-masked.

    query: [batch, heads, seq, head_dim] and key: [batch, kv_heads, seq, head_dim], both after RoPE,
    over the same sequence (a prefill). query_weights: [batch, seq], zero off the selected queries,
    summing to 1 per sample (or 0 for a sample with none). key_valid: [batch, seq] bool.
    Returns [batch, seq]: sum_q w[q] * mean_heads softmax(q k^T * scaling + mask).
    Memory is O(batch * heads * n_queries * seq): only the rows from the first selected query on.
    """
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    selected = query_weights != 0  # [batch, seq]
    any_selected = selected.any(dim=0)
    if not bool(any_selected.any()):
        return torch.zeros(batch, seq, dtype=query_weights.dtype, device=query.device)
    start = int(any_selected.nonzero()[0].item())
    window = seq - start
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    group = heads // kv_heads
    # [batch, kv_heads, group * window, head_dim]: queries that share a key head side by side (GQA).
    q = query[:, :, start:].to(compute_dtype).reshape(batch, kv_heads, group * window, head_dim)
    k = key.to(compute_dtype)  # [batch, kv_heads, seq, head_dim]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [batch, kv_heads, group * window, seq]
    logits = logits.view(batch, kv_heads, group, window, seq)
    q_pos = torch.arange(start, seq, device=query.device)[:, None]  # [window, 1]
    k_pos = torch.arange(seq, device=query.device)[None, :]  # [1, seq]
    allowed = (k_pos <= q_pos)[None] & key_valid[:, None, :]  # [batch, window, seq]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> 0
    probs = probs.mean(dim=(1, 2))  # [batch, window, seq]: mean over all heads
    weights = query_weights[:, start:].to(compute_dtype)  # [batch, window]
    return torch.einsum("bw,bws->bs", weights, probs)


def attention_rows_split(
    query: Tensor,
    key: Tensor,
    scaling: float,
    selected: Tensor,
    key_valid: Tensor,
    per_head: bool,
    per_query: bool,
) -> Tensor:
    """Attention rows of the selected queries kept apart per head and/or per query.

    query, key, scaling and key_valid as for :func:`attention_rows`; selected: [batch, seq] bool,
    the queries. Returns [batch, seq, n_q, heads] with both, [batch, seq, heads] per head only
    (mean over queries), [batch, seq, n_q] per query only (mean over heads); ``n_q`` is the most
    queries of a sample, query ``j`` a sample's ``j``-th selected token in order, and rows past a
    sample's own count are zero.
    """
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    counts = selected.sum(dim=1)  # [batch]
    order, present = pack(selected)  # [batch, n_q]: each sample's queries in order, then padding
    n_q = order.shape[1]
    q = query.gather(2, order[:, None, :, None].expand(batch, heads, n_q, head_dim)).to(compute_dtype)
    k = key.to(compute_dtype).repeat_interleave(heads // kv_heads, dim=1)  # [batch, heads, seq, head_dim]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [batch, heads, n_q, seq]
    k_pos = torch.arange(seq, device=query.device)[None, None, :]  # [1, 1, seq]
    allowed = (k_pos <= order[:, :, None]) & key_valid[:, None, :] & present[:, :, None]  # [batch, n_q, seq]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [batch, heads, n_q, seq]
    probs = probs.permute(0, 3, 2, 1)  # [batch, seq, n_q, heads]
    if per_head and per_query:
        return probs
    if per_query:
        return probs.mean(dim=-1)  # [batch, seq, n_q]
    return probs.sum(dim=2) / counts.clamp(min=1)[:, None, None].to(probs.dtype)  # [batch, seq, heads]


def query_weights(selected: Tensor) -> Tensor:
    """Uniform weights over the selected queries of each sample: [batch, seq] bool -> float."""
    counts = selected.sum(dim=1, keepdim=True).clamp(min=1)
    return selected.float() / counts


def original_attention(implementation: str, module: nn.Module) -> Callable[..., Any]:
    """The function the module would call for ``implementation`` (eager lives in the model's own module)."""
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    modeling = sys.modules[type(module).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"cannot find the eager attention of {type(module).__name__} in {modeling.__name__}")
    return eager


CaptureFn = Callable[[nn.Module, Tensor, Tensor, dict], None]


class AttentionTap:
    """Registers a wrapping attention function under a fresh name and points a config at it.

    ``capture(module, query, key, kwargs)`` runs before the original attention; it may raise to
    stop a scoring pass. :meth:`close` restores the config's implementation.
    """

    def __init__(self, config: Any, capture: CaptureFn) -> None:
        self.config = config
        self.original_name: str = config._attn_implementation or "eager"
        self.name = f"prunekit{next(_names)}:{self.original_name}"  # keeps "flash" in the name for flash checks
        original_name = self.original_name

        def tapped_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Any, **kwargs: Any) -> Any:
            capture(module, query, key, {**kwargs, "attention_mask": attention_mask})
            return original_attention(original_name, module)(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.name, tapped_attention)
        mask_name = self.original_name if self.original_name in ALL_MASK_ATTENTION_FUNCTIONS else "eager"
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[mask_name])
        config._attn_implementation_internal = self.name

    def close(self) -> None:
        if self.config._attn_implementation_internal == self.name:
            self.config._attn_implementation_internal = self.original_name
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
