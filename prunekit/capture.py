"""Probe installers: one function per probe type, looked up in :data:`INSTALLERS`.

An installer receives every ``(criterion, probe)`` pair of its type that a recipe asked for and
installs the hooks that deliver them: to ``Criterion.observe`` as the layer runs, or into
``ctx.captures`` (decoder) / the forward's :class:`~prunekit.record.VisionRecord` (vision tower).
A new kind of capture is a probe dataclass and one entry here; the Pruner never looks at types.

Installers run in the table's order, so on one layer the hooks fire in that order too: at a
prune layer a ``LayerInput`` capture arrives before the scoring pass of its ``AttentionRows``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter
from prunekit.errors import RecipeError
from prunekit.hooks import HookSet
from prunekit.probes import (
    AttentionRows,
    DecoderKeys,
    LayerInput,
    ModuleIO,
    Probe,
    VisionAttention,
    VisionAttentionReceived,
    VisionFeatures,
    VisionHidden,
    VisionKeys,
)
from prunekit.record import Running
from prunekit.scoring import ScoringPassDone, Timer, capture_rows, rows_only_hooks, scoring_pass

Wanted = list[tuple[Any, Probe]]  # (criterion or merger, probe)


@dataclass
class Site:
    """What installers need: the model's parts, where to put hooks, and the running forward's records."""

    model: nn.Module
    adapter: Adapter
    hooks: HookSet
    running: Running
    timed: Timer
    layers: Sequence[nn.Module] = ()  # decoder layers
    stage_layers: tuple[int, ...] = ()  # prune layers (decoder)
    vision_layers: Sequence[nn.Module] = ()  # vision-encoder layers (vision probes only)


Installer = Callable[[Site, Wanted], None]


def _by(wanted: Wanted, place: Callable[[Probe], Any]) -> dict[Any, Wanted]:
    groups: dict[Any, Wanted] = defaultdict(list)
    for criterion, probe in wanted:
        groups[place(probe)].append((criterion, probe))
    return groups


def _deliver(site: Site, observers: Wanted, inputs: Tensor, output: Tensor | None) -> None:
    prefill = site.running.prefill()
    if prefill is None or prefill.scoring_module is not None:
        return
    with torch.no_grad(), site.timed("probes"):
        for criterion, probe in observers:
            criterion.observe(prefill.ctx, probe, inputs, output)


def install_module_io(site: Site, wanted: Wanted) -> None:
    """A forward hook on each attention / MLP module read: its input and output go to ``observe``."""
    for (layer, kind), observers in _by(wanted, lambda p: (p.layer, p.module)).items():
        parent = site.layers[layer]
        module = site.adapter.attention(parent) if kind == "attention" else site.adapter.mlp(parent)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, observers: Wanted = observers) -> None:
            inputs = site.adapter.layer_input(args, kwargs)  # [batch, seq, hidden]
            out = site.adapter.module_output(output)
            if out.shape != inputs.shape and out.numel() == inputs.numel():  # an MoE block may return its
                out = out.reshape(inputs.shape)  # tokens flattened, [batch * seq, hidden] (Llama 4)
            _deliver(site, observers, inputs, out)

        site.hooks.add(module.register_forward_hook(hook, with_kwargs=True))


def install_layer_input(site: Site, wanted: Wanted) -> None:
    """A pre-hook on each decoder layer read: the hidden states entering it (through the decoder's final
    norm for ``final_norm`` probes) go to ``observe``."""
    final_norm = site.adapter.final_norm(site.model) if any(p.final_norm for _, p in wanted) else None
    for (layer, normed), observers in _by(wanted, lambda p: (p.layer, p.final_norm)).items():
        def hook(module: nn.Module, args: tuple, kwargs: dict, observers: Wanted = observers,
                 normed: bool = normed) -> None:
            hidden = site.adapter.probe_input(args, kwargs)  # [batch, seq, hidden]
            if normed and site.running.prefill() is not None:
                with torch.no_grad():
                    hidden = final_norm(hidden)
            _deliver(site, observers, hidden, None)

        site.hooks.add(site.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))


def install_decoder_keys(site: Site, wanted: Wanted) -> None:
    """The attention tap stores each read layer's post-RoPE keys (the turn's own columns on a later turn)."""
    probes_of = {id(site.adapter.attention(site.layers[layer])): [p for _, p in group]
                 for layer, group in _by(wanted, lambda p: p.layer).items()}

    def on_attention(module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
        prefill = site.running.prefill()
        probes = probes_of.get(id(module))
        if prefill is None or not probes or prefill.scoring_module is not None:
            return
        seq = prefill.ctx.layout.seq_len
        with torch.no_grad(), site.timed("probes"):
            keys = key[:, :, -seq:].transpose(1, 2).flatten(2)  # [batch, seq, kv_heads * head_dim]
            for probe in probes:
                prefill.ctx.captures[probe] = keys

    site.hooks.tap(site.adapter.language_model(site.model).config, on_attention)


def install_attention_rows(site: Site, wanted: Wanted) -> None:
    """The attention tap computes rows as a layer runs; at a prune layer a pre-hook runs the scoring pass."""
    by_layer = {layer: list(dict.fromkeys(p for _, p in group))
                for layer, group in _by(wanted, lambda p: p.layer).items()}
    during = {layer: probes for layer, probes in by_layer.items() if layer not in site.stage_layers}
    attention_layer = {id(site.adapter.attention(layer)): i for i, layer in enumerate(site.layers)}
    for layer, probes in by_layer.items():
        if layer in site.stage_layers:
            def before(module: nn.Module, args: tuple, kwargs: dict, probes: list = probes) -> None:
                prefill = site.running.prefill()
                if prefill is not None:
                    with site.timed("attention rows"):
                        scoring_pass(site.adapter, module, site.adapter.layer_input(args, kwargs),
                                     site.adapter.layer_keywords(args, kwargs), prefill, probes)

            site.hooks.add(site.layers[layer].register_forward_pre_hook(before, with_kwargs=True))
            for handle in rows_only_hooks(site.adapter.attention(site.layers[layer]), site.running.prefill):
                site.hooks.add(handle)

    def on_attention(module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
        prefill = site.running.prefill()
        if prefill is None:
            return
        if prefill.scoring_module is not None:
            if module is prefill.scoring_module:
                capture_rows(prefill, prefill.scoring_probes, query, key, kwargs)
                raise ScoringPassDone
            return
        probes = during.get(attention_layer.get(id(module)), ())
        if probes:
            with site.timed("attention rows"):
                capture_rows(prefill, probes, query, key, kwargs)

    site.hooks.tap(site.adapter.language_model(site.model).config, on_attention)


def _vision_tap(site: Site, wanted: Wanted, compute: Callable[[Any, Tensor, Tensor, dict], Tensor]) -> None:
    """Tap the vision tower's attention: ``compute(probe, query, key, kwargs)`` at each probe's layer."""
    n = len(site.vision_layers)
    by_layer = {layer: list(dict.fromkeys(p for _, p in group))
                for layer, group in _by(wanted, lambda p: p.layer % n).items()}
    attention_layer = {id(site.adapter.vision_attention(layer)): i for i, layer in enumerate(site.vision_layers)}

    def on_attention(module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
        probes = by_layer.get(attention_layer.get(id(module)), ())
        if probes:
            captures = site.running.vision_record().captures
            with torch.no_grad():
                for probe in probes:
                    captures[probe] = compute(probe, query, key, kwargs)

    site.hooks.tap(site.adapter.vision_attention(site.vision_layers[0]).config, on_attention)


def _cls_attention(probe: VisionAttention, query: Tensor, key: Tensor, kwargs: dict) -> Tensor:
    """[n_images, tokens]: softmax row of token ``probe.query``, mean over heads."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    q = query[:, :, probe.query: probe.query + 1].float()  # [n_images, heads, 1, head_dim]
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # [n_images, heads, 1, tokens]
    return torch.softmax(logits, dim=-1)[:, :, 0].mean(dim=1)


RECEIVED_CHUNK = 1 << 26  # softmax entries one chunk of queries may hold (256 MiB in float32)


def received_attention(query: Tensor, key: Tensor, kwargs: dict) -> Tensor:
    """``[..., tokens]``: the softmax attention each key receives, mean over heads, summed over the queries
    (query, key: ``[..., heads, tokens, head_dim]``). Queries go in chunks, so memory stays at
    :data:`RECEIVED_CHUNK` entries however many patches an image has (16k patches x 16 heads would be 17 GB)."""
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    keys = key.float().transpose(-1, -2)  # [..., heads, head_dim, k]
    per_query = math.prod(query.shape[:-3]) * query.shape[-3] * key.shape[-2]  # entries of one query row, all heads
    step = max(1, RECEIVED_CHUNK // max(1, per_query))
    total = None
    for start in range(0, query.shape[-2], step):
        logits = torch.matmul(query[..., start:start + step, :].float(), keys) * scaling  # [..., heads, chunk, k]
        part = torch.softmax(logits, dim=-1).mean(dim=-3).sum(dim=-2)  # [..., k]
        total = part if total is None else total + part
    return total


def install_vision_attention(site: Site, wanted: Wanted) -> None:
    _vision_tap(site, wanted, _cls_attention)


def install_vision_attention_received(site: Site, wanted: Wanted) -> None:
    _vision_tap(site, wanted, lambda probe, query, key, kwargs: received_attention(query, key, kwargs))


def install_vision_keys(site: Site, wanted: Wanted) -> None:
    _vision_tap(site, wanted, lambda probe, query, key, kwargs: key.mean(dim=1))  # [n_images, tokens, head_dim]


def install_vision_hidden(site: Site, wanted: Wanted) -> None:
    """A forward hook on each vision-encoder layer read: its output hidden states are kept for the projector."""
    n = len(site.vision_layers)
    for layer, group in _by(wanted, lambda p: p.layer % n).items():
        probes = list(dict.fromkeys(p for _, p in group))

        def hook(module: nn.Module, args: tuple, output: Any, probes: list = probes) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # [n_images, tokens, dim]
            captures = site.running.vision_record().captures
            for probe in probes:
                captures[probe] = hidden.detach()

        site.hooks.add(site.vision_layers[layer].register_forward_hook(hook))


def install_vision_features(site: Site, wanted: Wanted) -> None:
    """Nothing to hook: the vision stage hands each call's image features to its criteria itself."""


INSTALLERS: dict[type, Installer] = {
    ModuleIO: install_module_io,
    LayerInput: install_layer_input,
    AttentionRows: install_attention_rows,
    DecoderKeys: install_decoder_keys,
    VisionAttention: install_vision_attention,
    VisionAttentionReceived: install_vision_attention_received,
    VisionKeys: install_vision_keys,
    VisionHidden: install_vision_hidden,
    VisionFeatures: install_vision_features,
}


def install_probes(site: Site, wanted: Wanted) -> None:
    """Install every probe of ``wanted`` through its type's installer, in the table's order."""
    by_type = _by(wanted, type)
    unknown = [kind.__name__ for kind in by_type if kind not in INSTALLERS]
    if unknown:
        raise RecipeError(f"no installer for probe type(s) {unknown}; known: {[k.__name__ for k in INSTALLERS]}")
    for kind, install in INSTALLERS.items():
        if kind in by_type:
            install(site, by_type[kind])
