"""A hook-free, layer-by-layer reference for any supported family: the model's own decoder layers called
by hand on one sample, dropping the given tokens at the given layers.

What it writes out again: the gathering of the kept tokens, the positions under both policies
(1-D re-indexing, or M-RoPE gap closing over each image's grid), every attention mask (causal,
sliding window, Gemma 3's bidirectional image blocks) as an explicit additive 4-D tensor, and
Qwen3-VL's deepstack additions (after layer ``i``, each kept visual token gets its own row of the
``i``-th deepstack feature tensor). What it shares with the model: the layers themselves, the
rotary embedding and the inputs the decoder receives (captured from an unhooked forward).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor


class _Captured(Exception):
    pass


def decoder_inputs(model, inputs: dict) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Embeddings ``[seq, dim]``, RoPE positions ``[components, seq]`` and deepstack features the decoder
    stack receives: one ``[seq, dim]`` tensor per deepstack layer, zero off the visual tokens (empty list
    for families without deepstack)."""
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]
        seen["positions"] = kwargs.get("position_ids")
        seen["deepstack"] = (kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds"))
        raise _Captured

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    embeds = seen["embeds"][0]
    seq = embeds.shape[0]
    positions = seen["positions"]
    if positions is None:
        positions = torch.arange(seq)[None]
    elif positions.dim() == 3:
        positions = positions[-3:, 0]  # M-RoPE [3, seq]
    else:
        positions = positions.reshape(-1, seq)[:1]
    mask, features = seen.get("deepstack", (None, None))
    deepstack = []
    for feature in features or []:  # rows in the order of the mask's visual tokens
        full = torch.zeros_like(embeds)
        full[mask[0]] = feature.to(embeds.dtype)
        deepstack.append(full)
    return embeds, positions, deepstack


def compact_1d(n: int) -> Tensor:
    return torch.arange(n)[None]


def compact_mrope(positions: Tensor, visual: Tensor) -> Tensor:
    """Close the gaps pruning left (one sample's kept tokens, ``[3, n]``), group by group: the text after a
    visual run continues where its kept tokens end (largest kept offset from the run's base + 1), but no
    further than the unpruned prompt put it; everything after moves down by what the runs before it lost."""
    out = positions.clone()
    n = positions.shape[1]
    lost, start = 0, 0
    while start < n:
        if not visual[start]:
            out[:, start] = positions[:, start] - lost
            start += 1
            continue
        end = start
        while end < n and visual[end]:
            end += 1
        base = int(positions[0, start - 1]) + 1 if start else int(positions[:, start].min())
        out[:, start:end] = positions[:, start:end] - lost
        if end < n:  # the unpruned span to the text after, against where the kept tokens end
            span, kept = int(positions[0, end]) - base, int(positions[:, start:end].max()) - base + 1
            lost += span - min(span, kept)
        start = end
    return out


def build_mask(n: int, kind: str, window: int | None, blocks: Tensor | None, dtype, window_over_blocks: bool = True
               ) -> Tensor:
    """Additive [1, 1, n, n] mask: causal, bidirectional blocks, and on sliding layers the window: over the
    blocks too (Gemma 3: AND(window, OR(causal, blocks))) or not (PaliGemma: OR(AND(window, causal), blocks))."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    allowed = k <= q
    in_window = (q - k < window) if kind == "sliding_attention" and window is not None else torch.ones_like(allowed)
    same_block = torch.zeros_like(allowed)
    if blocks is not None:
        same_block = (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
    if window_over_blocks:
        allowed = (allowed | same_block) & in_window
    else:
        allowed = (allowed & in_window) | same_block
    mask = torch.zeros(n, n, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def run_family_reference(model, family: str, inputs: dict, visual_id: list[int], stages: list[int],
                         kept: list[Tensor], policy: str, decoded: Tensor | None = None) -> Tensor:
    """Logits ``[seq_final, vocab]`` of one unpadded sample (+ ``decoded`` tokens) with ``kept[s]`` (original
    positions of the visual tokens to keep) from layer ``stages[s]`` on."""
    prompt_length = inputs["input_ids"].shape[1]
    if decoded is not None and decoded.numel():
        inputs = dict(inputs)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], decoded[None]], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:  # a decoded token is text (Gemma 3), or suffix (PaliGemma: 1)
                kind = 1 if family == "paligemma" else 0
                inputs[key] = torch.cat([inputs[key], torch.full_like(decoded, kind)[None]], dim=1)
    embeds, positions, deepstack = decoder_inputs(model, inputs)
    ids = inputs["input_ids"][0]
    visual = torch.isin(ids, torch.tensor(visual_id))
    visual[prompt_length:] = False  # a decoded token is text, whatever its id
    lm = model.model.language_model
    config = lm.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(lm.layers)
    window = getattr(config, "sliding_window", None)
    gemma = family == "gemma3"
    prefix = inputs["token_type_ids"][0] == 0 if family == "paligemma" and "token_type_ids" in inputs else None
    mrope = positions.shape[0] == 3
    index = torch.arange(len(ids))
    h = embeds[None]
    pos = positions
    for i, layer in enumerate(lm.layers):
        if i in stages:
            s = stages.index(i)
            keep = ~visual[index] | torch.isin(index, kept[s])
            h, index, pos = h[:, keep], index[keep], pos[:, keep]
            if policy == "compact":
                # 1-D: consecutive from the first position (PaliGemma counts from 1)
                pos = compact_mrope(pos, visual[index]) if mrope else compact_1d(len(index)) + pos[:, :1]
        vis_now = visual[index]
        blocks = None
        if gemma:  # one block per contiguous run of image tokens in the current sequence
            starts = vis_now & ~torch.nn.functional.pad(vis_now[:-1], (1, 0), value=False)
            blocks = torch.where(vis_now, starts.long().cumsum(0) - 1, torch.full_like(index, -1))
        if prefix is not None:  # PaliGemma: the prompt's prefix is one block (decoded tokens are suffix)
            blocks = torch.where(prefix[index], 0, -1)
        kind = layer_types[i]
        mask = build_mask(len(index), kind, window, blocks, h.dtype, window_over_blocks=gemma)
        if mrope:
            pe = lm.rotary_emb(h, pos[:, None])
            position_ids = None
        elif gemma:
            pe = lm.rotary_emb(h, pos, kind)
            position_ids = pos
        else:
            pe = lm.rotary_emb(h, pos)
            position_ids = pos
        with torch.no_grad():
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=position_ids)
        if i < len(deepstack):  # the kept visual tokens get their own deepstack features
            h = h.clone()
            h[0, vis_now] = h[0, vis_now] + deepstack[i][index[vis_now]]
    with torch.no_grad():
        logits = model.lm_head(lm.norm(h))[0]
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 (PaliGemma 2): tanh capping of the logits,
    if cap is None or "final_logit_softcapping" not in inspect.getsource(type(model).forward):  # where the model
        return logits  # applies it (PaliGemma's forward does from transformers 5.2x on, not on 5.19)
    return torch.tanh(logits / cap) * cap
