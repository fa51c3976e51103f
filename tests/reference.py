"""A slow, hook-free reference: LLaVA's decoder run layer by layer by hand, one sample at a time.

Everything that matters is written out again here from the formulas (RMSNorm, RoPE, eager
attention, the SwiGLU MLP, TTV, IGA, FastV's attention, top-k, positions); only the weights and
the vision tower come from the model. Tests compare the hooked model against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, module) -> Tensor:
    """Llama's RMSNorm, computed in float32 as the model does (also for float64 weights)."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return module.weight * (x32 * torch.rsqrt(variance + module.variance_epsilon)).to(x.dtype)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x: [heads, seq, head_dim]; positions: [seq]. Angles in float32, as Llama computes them."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [seq, head_dim / 2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    half = head_dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class RefModel:
    """Weights of a LlavaForConditionalGeneration, read for the hand-written forward."""

    model: object

    def __post_init__(self):
        lm = self.model.model.language_model
        cfg = lm.config
        self.layers = list(lm.layers)
        self.final_norm = lm.norm
        self.embed = lm.embed_tokens
        self.lm_head = self.model.lm_head
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.theta = cfg.rope_parameters["rope_theta"]
        self.image_token_id = self.model.config.image_token_id

    def embeddings(self, input_ids: Tensor, pixel_values: Tensor) -> Tensor:
        """[seq, hidden] embeddings of one sample with its image features scattered in."""
        embeds = self.embed(input_ids)
        features = self.model.model.get_image_features(pixel_values=pixel_values).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.dtype)
        embeds = embeds.clone()
        embeds[input_ids == self.image_token_id] = features
        return embeds

    def qkv(self, layer, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = layer.self_attn
        seq = x.shape[0]
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(seq, self.heads, self.head_dim).transpose(0, 1)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(seq, self.kv_heads, self.head_dim).transpose(0, 1)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(seq, self.kv_heads, self.head_dim).transpose(0, 1)
        q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
        repeat = self.heads // self.kv_heads
        return q, k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)

    def attention_probs(self, layer, x: Tensor, positions: Tensor) -> Tensor:
        """Full causal softmax attention [heads, seq, seq] of one layer on normed input x."""
        q, k, _ = self.qkv(layer, x, positions)
        seq = x.shape[0]
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)

    def attention(self, layer, x: Tensor, positions: Tensor) -> Tensor:
        _, _, v = self.qkv(layer, x, positions)
        probs = self.attention_probs(layer, x, positions)
        out = (probs @ v).transpose(0, 1).reshape(x.shape[0], -1)
        return F.linear(out, layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias)

    def mlp(self, layer, x: Tensor) -> Tensor:
        m = layer.mlp
        return F.linear(F.silu(F.linear(x, m.gate_proj.weight)) * F.linear(x, m.up_proj.weight), m.down_proj.weight)


def ttv(inp: Tensor, out: Tensor, abs_cos: bool = False) -> Tensor:
    """||out||/||in|| * softmax over the sequence of (1 - cos): [seq]."""
    ratio = out.norm(dim=-1) / inp.norm(dim=-1)
    cos = (inp * out).sum(-1) / (inp.norm(dim=-1) * out.norm(dim=-1))
    change = 1 - (cos.abs() if abs_cos else cos)
    return ratio * torch.softmax(change, dim=0)


@dataclass
class RefRun:
    logits: Tensor  # [seq_final, vocab]
    kept: list[Tensor] = field(default_factory=list)  # per stage: sorted original positions of kept visual tokens
    stage_slots: list[Tensor] = field(default_factory=list)  # per stage: original index of every kept token
    dropped_total: list[int] = field(default_factory=list)


def run_reference(
    ref: RefModel,
    input_ids: Tensor,  # [seq] one sample, no padding
    pixel_values: Tensor,  # [images, 3, H, W]
    stages: list[tuple[int, float]],  # (layer, keep fraction of the original visual count)
    method: str,  # "transprune" | "fastv" | "given"
    positions_policy: str | list[str] = "compact",  # one for every stage, or one per stage
    given_kept: list[Tensor] | None = None,  # method "given": original positions to keep per stage
    decoded: Tensor | None = None,  # [t] tokens appended after the prompt (never pruned)
    accumulate: tuple[int, int] = (6, 11),
    alpha: float = 0.5,
) -> RefRun:
    """One hook-free forward of the prompt (+ decoded tokens) with TransPrune / FastV / given pruning."""
    prompt_len = input_ids.shape[0]
    decoded = decoded if decoded is not None else input_ids.new_zeros(0)
    h = ref.embeddings(input_ids, pixel_values)
    if decoded.numel():
        h = torch.cat([h, ref.embed(decoded)], dim=0)
    n = h.shape[0]
    original = torch.arange(n)  # original index of every current token
    positions = torch.arange(n)
    is_visual = torch.cat([input_ids == ref.image_token_id, torch.zeros(decoded.numel(), dtype=torch.bool)])
    n_visual0 = int(is_visual.sum())
    last_visual = int(torch.nonzero(is_visual)[-1])
    acc = torch.zeros(n, dtype=h.dtype)
    run = RefRun(logits=torch.empty(0))
    dropped_total = 0
    stage_layers = [layer for layer, _ in stages]
    prev_attention = None
    for index, layer in enumerate(ref.layers):
        if index in stage_layers:
            s = stage_layers.index(index)
            keep_n = int(n_visual0 * stages[s][1])
            vis_idx = torch.nonzero(is_visual).flatten()
            prompt_rows = (original < prompt_len)
            if method == "given":
                keep_orig = given_kept[s]
                keep_vis = vis_idx[torch.isin(original[vis_idx], keep_orig)]
            else:
                if method == "transprune":
                    x = rms_norm(h, layer.input_layernorm)
                    probs = ref.attention_probs(layer, x, positions)  # [heads, seq, seq]
                    instr = torch.nonzero((original > last_visual) & prompt_rows).flatten()
                    iga = probs.mean(0)[instr].mean(0)  # [seq]
                    t = acc[vis_idx] / acc[vis_idx].sum()
                    g = iga[vis_idx] / iga[vis_idx].sum()
                    score = alpha * t + (1 - alpha) * g
                elif method == "fastv":
                    last_prompt = int(torch.nonzero(prompt_rows).flatten()[-1])
                    score = prev_attention.mean(0)[last_prompt][vis_idx]
                else:
                    raise ValueError(method)
                order = torch.sort(score, descending=True, stable=True).indices[:keep_n]
                keep_vis = vis_idx[order]
            keep = torch.ones(h.shape[0], dtype=torch.bool)
            keep[vis_idx] = False
            keep[keep_vis] = True
            dropped_total += int((is_visual & ~keep).sum())
            h, original, positions, is_visual, acc = (h[keep], original[keep], positions[keep], is_visual[keep], acc[keep])
            policy = positions_policy if isinstance(positions_policy, str) else positions_policy[s]
            if policy == "compact":  # re-index the shorter sequence, as PyramidDrop/TransPrune do
                positions = torch.arange(h.shape[0])
            run.kept.append(original[is_visual].sort().values)
            run.stage_slots.append(original.clone())
            run.dropped_total.append(dropped_total)
        x = rms_norm(h, layer.input_layernorm)
        attn_out = ref.attention(layer, x, positions)
        prev_attention = ref.attention_probs(layer, x, positions) if method == "fastv" else None
        h2 = h + attn_out
        y = rms_norm(h2, layer.post_attention_layernorm)
        mlp_out = ref.mlp(layer, y)
        if accumulate[0] <= index <= accumulate[1]:
            acc = acc + ttv(x, attn_out) + ttv(y, mlp_out)
        h = h2 + mlp_out
    run.logits = ref.lm_head(rms_norm(h, ref.final_norm))
    return run


def greedy_reference(ref: RefModel, input_ids: Tensor, pixel_values: Tensor, stages, kept: list[Tensor],
                     positions_policy: str | list[str], steps: int) -> tuple[Tensor, Tensor]:
    """Greedy decoding without a cache: the same prompt tokens dropped at the same layers every step.

    Returns the generated ids [steps] and the next-token logits of every step [steps, vocab].
    """
    decoded = input_ids.new_zeros(0)
    step_logits = []
    for _ in range(steps):
        run = run_reference(ref, input_ids, pixel_values, stages, "given", positions_policy, given_kept=kept,
                            decoded=decoded)
        step_logits.append(run.logits[-1])
        decoded = torch.cat([decoded, run.logits[-1].argmax().view(1)])
    return decoded, torch.stack(step_logits)
