"""Scoring at a prune layer: attention rows from the layer's own q/k, and the criteria's scores.

Attention rows are captured by the attention tap as a layer runs; at a prune layer the rows must
come from that layer on its unpruned input, so :func:`scoring_pass` runs the layer's attention once
on its normed input and stops as soon as the tap has them. During that pass hooks on the plain
``nn.Linear`` query and value projections make them project only the query rows the probes read
(and no values), for the calling thread's pass only (:func:`rows_only_hooks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, Combiner, Criterion, ForwardContext
from prunekit.attention import attention_rows, attention_rows_split, query_weights
from prunekit.compat import CACHE_NAMES
from prunekit.errors import AdapterError
from prunekit.layout import last_index
from prunekit.probes import QUERY_SETS, AttentionRows
from prunekit.record import Prefill

Timer = Callable[[str], AbstractContextManager]  # timed("scoring"): a context that times one part of the work


class ScoringPassDone(Exception):
    """Raised by the attention tap once a scoring pass has what it needs."""


def query_rows(ctx: ForwardContext, probe: AttentionRows) -> Tensor:
    """[batch, seq] bool: the query tokens whose attention rows ``probe`` reads."""
    layout = ctx.layout
    if probe.queries == "instruction":
        return layout.instruction
    if probe.queries == "last":  # the last real token of each sample
        index = torch.arange(layout.seq_len, device=layout.valid.device)
        return index[None, :] == last_index(layout.valid)[:, None]
    if probe.queries in ctx.buffers:
        return ctx.buffers[probe.queries] & layout.valid
    raise KeyError(f"{probe}: no query set {probe.queries!r}; use one of {QUERY_SETS} or a [batch, seq] bool "
                   "buffer a criterion puts in ctx.buffers before that layer")


def capture_rows(prefill: Prefill, probes: Sequence[AttentionRows], query: Tensor, key: Tensor,
                 kwargs: dict) -> None:
    """Store each probe's rows in ``ctx.captures`` from one layer's query [batch, heads, seq, head_dim] and key."""
    ctx = prefill.ctx
    layout = ctx.layout
    if prefill.past is not None and key.shape[2] > layout.seq_len:
        # A later turn of a conversation is scored on its own tokens: its instruction's attention over the
        # turn's keys (the last columns: the layer's cache comes first), as if the turn were the prompt.
        key = key[:, :, -layout.seq_len:]
    if query.shape[2] != layout.seq_len or key.shape[2] != layout.seq_len:
        raise AdapterError(
            f"attention rows: query/key cover {query.shape[2]}/{key.shape[2]} tokens but the prefill "
            f"sequence has {layout.seq_len}; attention rows need a prefill from an empty cache"
        )
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    with torch.no_grad():
        for probe in probes:
            selected = query_rows(ctx, probe)
            if probe.per_head or probe.per_query:
                ctx.captures[probe] = attention_rows_split(query, key, scaling, selected, layout.valid,
                                                           probe.per_head, probe.per_query)
            else:
                ctx.captures[probe] = attention_rows(query, key, scaling, query_weights(selected), layout.valid)


ROWS_ONLY = ("q_proj", "v_proj")  # projections a scoring pass computes for the probes' query rows only (values: none)


def rows_only_hooks(attention: nn.Module, running: Callable[[], Prefill | None]) -> list:
    """Hooks on the attention's plain ``nn.Linear`` query and value projections: during the calling thread's
    scoring pass they project only the token columns in ``prefill.scoring_rows`` (zeros elsewhere); any
    other call runs whole. Hooks, not swapped modules: the model's structure never changes and threads
    running the same layer at once are not affected. Returns the handles."""
    handles = []
    for name in ROWS_ONLY:
        projection = getattr(attention, name, None)
        if type(projection) is not nn.Linear:  # fused, quantised or adapted projections are left to run whole
            continue

        def before(module: nn.Module, args: tuple):
            prefill = running()
            columns = None if prefill is None else prefill.scoring_rows.get(id(module))
            if columns is None:
                return None
            hidden = args[0]  # [batch, seq, in]
            prefill.scoring_rows[id(module)] = (columns, hidden.shape[1])
            return (hidden[:, columns], *args[1:])

        def after(module: nn.Module, args: tuple, output: Tensor):
            prefill = running()
            entry = None if prefill is None else prefill.scoring_rows.get(id(module))
            if not isinstance(entry, tuple):
                return None
            columns, seq = entry
            prefill.scoring_rows[id(module)] = columns
            out = output.new_zeros(output.shape[0], seq, output.shape[-1])  # [batch, seq, out]
            out[:, columns] = output
            return out

        handles += [projection.register_forward_pre_hook(before), projection.register_forward_hook(after)]
    return handles


def scoring_pass(adapter: Adapter, layer: nn.Module, hidden: Tensor, kwargs: dict, prefill: Prefill,
                 probes: Sequence[AttentionRows]) -> None:
    """Run a prune layer's attention on its unpruned input ``hidden`` [batch, seq, dim] until the tap has the rows."""
    attention = adapter.attention(layer)
    call_kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "use_cache", *CACHE_NAMES)}
    # Only the probes' query rows are read and the values never: project just those (zeros elsewhere).
    rows = torch.stack([query_rows(prefill.ctx, probe) for probe in probes]).any(dim=0).any(dim=0)  # [seq]
    no_rows = torch.zeros(0, dtype=torch.long, device=rows.device)
    wanted = {"q_proj": rows.nonzero().flatten(), "v_proj": no_rows}
    prefill.scoring_rows = {id(getattr(attention, name)): columns for name, columns in wanted.items()
                            if getattr(attention, name, None) is not None}
    prefill.scoring_module, prefill.scoring_probes = attention, tuple(probes)
    try:
        with torch.no_grad():
            attention(hidden_states=adapter.input_norm(layer)(hidden), **call_kwargs)
    except ScoringPassDone:
        pass
    else:
        implementation = getattr(getattr(attention, "config", None), "_attn_implementation", None)
        if isinstance(implementation, str) and not implementation.startswith("prunekit"):
            raise AdapterError(
                f"the model's attention implementation is {implementation!r}, not prunekit's tap: it was changed "
                "(set_attn_implementation) while prunekit.apply was active; set it before apply, or remove the "
                "pruner and apply again"
            )
        raise AdapterError(
            f"{type(attention).__name__} did not call the transformers attention interface, so its "
            "attention rows cannot be captured; this model needs an adapter that computes them"
        )
    finally:
        prefill.scoring_module, prefill.scoring_probes, prefill.scoring_rows = None, (), {}


def score(criteria: Mapping[str, Criterion], combiner: Combiner, ctx: ForwardContext) -> Tensor:
    """[batch, seq]: every criterion's score of the current sequence, merged by the combiner.

    A visual token that any criterion scores -inf is one the criterion drops whatever the stage's count
    (a count of its own, e.g. DyCoke's per clip): it scores -inf in the result, and the combiner sees the
    other visual tokens only (so normalisations are over those).
    """
    with torch.no_grad():
        scores = {key: criterion.score(ctx) for key, criterion in criteria.items()}
        visual = ctx.layout.visual  # [batch, seq]
        dropped = torch.zeros_like(visual)
        for value in scores.values():
            dropped |= visual & (value == float("-inf"))
        if not bool(dropped.any()):
            return combiner.combine(scores, visual)
        scores = {key: value.masked_fill(dropped, 0) for key, value in scores.items()}
        return combiner.combine(scores, visual & ~dropped).masked_fill(dropped, float("-inf"))
