"""Helpers for testing prunekit and plugins written for it (no download, no GPU).

For plugin authors (the public part):

- :func:`token_layout` and :func:`forward_context` build the ``TokenLayout`` and
  ``ForwardContext`` a criterion sees, so its ``observe`` / ``score`` can be unit- and
  property-tested without a model;
- :func:`tiny_llava` and :func:`llava_inputs` make a small random-weight LLaVA and left-padded
  prompts for end-to-end tests (``prunekit.apply`` on them runs in seconds on a CPU).

The family builders below (:func:`tiny_family_model`, :func:`family_inputs`) make tiny models of
other architectures from the transformers config classes; every builder saves random weights with
``save_pretrained`` and loads them back through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from prunekit.api import ForwardContext
from prunekit.layout import TokenLayout, layout_from_ids
from prunekit.probes import Probe


def token_layout(visual: Tensor | Sequence[Sequence[bool]], valid: Tensor | Sequence[Sequence[bool]] | None = None
                 ) -> TokenLayout:
    """The layout of a prompt whose visual tokens are ``visual`` (``[batch, seq]`` bool), as adapters build it.

    ``valid`` marks real tokens (default: all; ``False`` for padding). The instruction is every
    valid non-visual token after a sample's last visual token; ``original_index`` is the column
    (``0..seq-1``); ``image_index`` numbers each contiguous visual run of a sample::

        layout = token_layout([[False, True, True, False]], valid=[[False, True, True, True]])
        layout.instruction   # tensor([[False, False, False,  True]])
    """
    visual = torch.as_tensor(visual, dtype=torch.bool)
    if visual.dim() != 2:
        raise ValueError(f"visual must be [batch, seq], got shape {tuple(visual.shape)}")
    mask = None if valid is None else torch.as_tensor(valid, dtype=torch.bool, device=visual.device)
    if mask is not None and mask.shape != visual.shape:
        raise ValueError(f"valid has shape {tuple(mask.shape)}, visual {tuple(visual.shape)}: they must match")
    ids = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
    return layout_from_ids(ids, visual, mask)


def forward_context(layout: TokenLayout | Tensor | Sequence[Sequence[bool]], stage_layers: Sequence[int] = (2,),
                    num_layers: int = 4, stage: int = 0, keep: float | None = None,
                    buffers: dict[str, Tensor] | None = None, captures: dict[Probe, Tensor] | None = None
                    ) -> ForwardContext:
    """The ``ForwardContext`` a criterion sees when stage ``stage`` (pruning before ``stage_layers[stage]``)
    is scored, for a model of ``num_layers`` decoder layers.

    ``layout`` is a :class:`TokenLayout` or a ``visual`` mask for :func:`token_layout`. ``keep``
    sets ``ctx.keep_counts`` to ``int(n_visual * keep)`` per sample; ``buffers`` and ``captures``
    pre-fill what ``observe`` would have stored and what probes would have captured
    (``ctx.captures[AttentionRows(...)] = rows``), each ``[batch, seq, ...]``::

        ctx = forward_context([[False, True, True, False]], stage_layers=(1,), num_layers=2)
        ctx.layer    # 1
    """
    if not isinstance(layout, TokenLayout):
        layout = token_layout(layout)
    if not 0 <= stage < len(stage_layers):
        raise ValueError(f"stage {stage} is not one of the {len(stage_layers)} stages {tuple(stage_layers)}")
    ctx = ForwardContext(layout=layout, stage_layers=tuple(stage_layers), num_layers=num_layers, stage=stage,
                         buffers=dict(buffers or {}), captures=dict(captures or {}))
    if keep is not None:
        ctx.keep_counts = torch.floor(layout.visual_counts().double() * keep).long()
    return ctx


@dataclass(frozen=True)
class LlavaShape:
    """Sizes of a LLaVA-1.5-style model: CLIP tower, MLP projector, Llama decoder."""

    num_layers: int = 16
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    vocab_size: int = 256
    image_size: int = 24
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - 1


# LLaVA-1.5-7B's decoder depth and visual tokens (336 px / 14 px patches = 576), narrow enough for a CPU.
LLAVA15_SHAPED = LlavaShape(
    num_layers=32, hidden_size=256, intermediate_size=688, num_heads=8, num_kv_heads=8, vocab_size=1024,
    image_size=336, patch_size=14, vision_hidden=64, vision_layers=2,
)


def llava_config(shape: LlavaShape = LlavaShape()) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=2 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers, num_attention_heads=4, image_size=shape.image_size,
        patch_size=shape.patch_size, projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=shape.image_token_id,
        image_seq_length=shape.visual_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def tiny_llava(
    shape: LlavaShape = LlavaShape(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    directory: str | Path | None = None,
) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA of ``shape``, saved and reloaded with ``from_pretrained``."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(shape))
    _spread_weights(model, seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(directory) if directory is not None else Path(tmp)
            model.save_pretrained(path)
            loaded = LlavaForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return loaded.eval()


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights with a larger scale than the default init, so scores and answers vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def llava_inputs(
    shape: LlavaShape = LlavaShape(),
    prefix: list[list[int]] | None = None,
    question: list[list[int]] | None = None,
    images: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
) -> dict[str, Tensor]:
    """Left-padded LLaVA inputs: ``prefix + <image> * n + question`` per sample.

    Samples get different random prompt lengths unless ``prefix``/``question`` are given.
    """
    generator = torch.Generator().manual_seed(seed)
    n_samples = len(prefix) if prefix is not None else batch

    def random_tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(3, shape.vocab_size - 1, (length,), generator=generator).tolist()

    prefix = prefix or [random_tokens(3, 6) for _ in range(n_samples)]
    question = question or [random_tokens(4, 9) for _ in range(n_samples)]
    rows = [[1, *p, *([shape.image_token_id] * shape.visual_tokens * images), *q] for p, q in zip(prefix, question)]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    pixel_values = torch.randn(len(rows) * images, 3, shape.image_size, shape.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values.to(dtype)}


# ----------------------------------------------------------------------------------------------
# Other families: tiny configs and prompts built from what the model's own vision side produces
# ----------------------------------------------------------------------------------------------
_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=24,
               patch_size=4)
_PINPOINTS = [[24, 24], [24, 48], [48, 24], [48, 48]]
IMAGE_ID, VIDEO_ID, START_ID, END_ID = 255, 254, 253, 252


def family_config(family: str, num_layers: int = 16):
    """A tiny config of a real architecture, one of :data:`FAMILIES` (``qwen3_vl`` and ``qwen3_vl_moe`` with
    three deepstack layers)."""
    import transformers as tf

    text = dict(_TEXT, num_hidden_layers=num_layers)
    if family == "llava_next_video":  # no named adapter: the generic one handles it
        return tf.LlavaNextVideoConfig(vision_config=tf.CLIPVisionConfig(**_VISION, projection_dim=32),
                                       text_config=tf.LlamaConfig(**text), image_token_id=IMAGE_ID,
                                       video_token_id=VIDEO_ID, image_grid_pinpoints=_PINPOINTS,
                                       vision_feature_layer=-2)
    if family == "llava_next":
        return tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**_VISION, projection_dim=32),
                                  text_config=tf.LlamaConfig(**text), image_token_id=IMAGE_ID,
                                  image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-2)
    if family == "video_llava":
        return tf.VideoLlavaConfig(vision_config=tf.CLIPVisionConfig(**_VISION, projection_dim=32),
                                   text_config=tf.LlamaConfig(**text), image_token_id=IMAGE_ID,
                                   video_token_id=VIDEO_ID, vision_feature_layer=-2)
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**_VISION),
                                       text_config=tf.Qwen2Config(**text), image_token_id=IMAGE_ID,
                                       video_token_id=VIDEO_ID, image_grid_pinpoints=_PINPOINTS,
                                       vision_feature_layer=-1)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                      in_chans=3)
        if family == "qwen2_vl":
            return tf.Qwen2VLConfig(vision_config=dict(vision, embed_dim=32), text_config=dict(text, rope_parameters=rope),
                                    image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
                                    vision_end_token_id=END_ID)
        return tf.Qwen2_5_VLConfig(vision_config=dict(vision, intermediate_size=64, out_hidden_size=64,
                                                      fullatt_block_indexes=[1], window_size=16),
                                   text_config=dict(text, rope_parameters=rope), image_token_id=IMAGE_ID,
                                   video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    if family in ("qwen3_vl", "qwen3_vl_moe", "cosmos3_omni"):  # interleaved M-RoPE, deepstack x3 (as released)
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0, "mrope_interleaved": True}
        qwen3_text = {k: v for k, v in text.items() if k not in ("bos_token_id", "eos_token_id")}
        qwen3_text.update(head_dim=16, rope_parameters=rope)
        vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=36,
                      deepstack_visual_indexes=[0, 1, 2])
        ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
                   vision_end_token_id=END_ID)
        if family == "qwen3_vl":
            return tf.Qwen3VLConfig(text_config=qwen3_text, vision_config=vision, **ids)
        if family == "cosmos3_omni":  # Qwen3-VL's text and vision under its own model_type
            return tf.Cosmos3OmniConfig(text_config=dict(qwen3_text, model_type="qwen3_vl_text"),
                                        vision_config=dict(vision, model_type="qwen3_vl_vision"), **ids)
        moe = dict(qwen3_text, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        return tf.Qwen3VLMoeConfig(text_config=moe, vision_config=vision, **ids)
    if family in ("glm4v", "glm46v", "glm4v_moe", "glmga", "glm_ocr"):  # GLM-4.1V / 4.6V / 4.5V (MoE), GLM-OCR:
        # M-RoPE, grids as Qwen2-VL
        rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        glm_text = {k: v for k, v in text.items() if k not in ("bos_token_id", "eos_token_id")}
        glm_text["rope_parameters"] = rope
        config_class = {"glm4v": tf.Glm4vConfig, "glm46v": tf.Glm46VConfig, "glm4v_moe": tf.Glm4vMoeConfig,
                        "glmga": tf.GlmgaConfig, "glm_ocr": tf.GlmOcrConfig}[family]
        if family == "glm4v_moe":
            glm_text.update(head_dim=16, moe_intermediate_size=32, num_experts_per_tok=2, n_shared_experts=1,
                            n_routed_experts=4, first_k_dense_replace=1)
        return config_class(text_config=glm_text,
                            vision_config=dict(depth=2, hidden_size=32, num_heads=4, patch_size=4, image_size=24,
                                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                               intermediate_size=64),
                            image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, image_start_token_id=START_ID,
                            image_end_token_id=END_ID, video_start_token_id=START_ID, video_end_token_id=END_ID)
    if family == "llama4":  # MoE on every other layer, chunked attention, a NoPE layer every fourth
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        vision = tf.Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=24, patch_size=4, vision_output_dim=64, projector_input_dim=64,
                                       projector_output_dim=64, pixel_shuffle_ratio=0.5, rope_parameters=rope)
        llama4_text = tf.Llama4TextConfig(**dict(text, intermediate_size=32), intermediate_size_mlp=128, head_dim=16,
                                          num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                          no_rope_layer_interval=4, attention_chunk_size=16, rope_parameters=rope)
        return tf.Llama4Config(vision_config=vision, text_config=llama4_text, image_token_index=IMAGE_ID,
                               boi_token_index=START_ID, eoi_token_index=END_ID)
    if family == "internvl":
        return tf.InternVLConfig(vision_config=tf.InternVLVisionConfig(**dict(_VISION, image_size=48)),
                                 text_config=tf.Qwen2Config(**text), image_token_id=IMAGE_ID, image_seq_length=9,
                                 downsample_ratio=0.5)
    if family == "qianfan_ocr":  # InternViT-like tower, pixel shuffle (as InternVL), a Qwen3 decoder
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=48,
                      patch_size=4, drop_path_rate=0.0)
        return tf.QianfanOCRConfig(vision_config=vision, text_config=tf.Qwen3Config(**text, head_dim=16).to_dict(),
                                   image_token_id=IMAGE_ID, image_seq_length=36, downsample_ratio=0.5)
    if family == "idefics3":
        return tf.Idefics3Config(vision_config=tf.Idefics3VisionConfig(**_VISION), text_config=tf.LlamaConfig(**text),
                                 image_token_id=IMAGE_ID, scale_factor=2)
    if family == "gemma3n":
        return gemma3n_config(num_layers)
    if family == "gemma3":
        gemma_text = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                                         sliding_window=16, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        return tf.Gemma3Config(text_config=gemma_text, vision_config=tf.SiglipVisionConfig(**_VISION),
                               mm_tokens_per_image=9, image_token_id=299, boi_token_id=297, eoi_token_id=298)
    if family == "llava":
        return llava_config(LlavaShape(num_layers=num_layers, vocab_size=256, image_size=24, patch_size=4))
    if family == "vipllava":  # features of several CLIP layers, concatenated
        return tf.VipLlavaConfig(vision_config=tf.CLIPVisionConfig(**dict(_VISION, num_hidden_layers=3)),
                                 text_config=tf.LlamaConfig(**text), image_token_index=IMAGE_ID, image_seq_length=36,
                                 vision_feature_layers=[-1, -2, 1])
    if family == "mistral3":  # Pixtral tower (2-D RoPE), patch merger
        pixtral = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, head_dim=8, image_size=24, patch_size=4)
        return tf.Mistral3Config(vision_config=pixtral, text_config=tf.MistralConfig(**text, head_dim=16),
                                 image_token_index=IMAGE_ID, spatial_merge_size=2, vision_feature_layer=-1)
    if family in ("aya_vision", "cohere2_vision"):  # Cohere2 decoder: sliding-window layers, pixel shuffle
        cohere_text = tf.Cohere2Config(**dict(text, bos_token_id=5, eos_token_id=6), head_dim=16, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention"] * (num_layers // 2))
        if family == "aya_vision":
            return tf.AyaVisionConfig(vision_config=tf.SiglipVisionConfig(**_VISION), text_config=cohere_text,
                                      image_token_index=IMAGE_ID, downsample_factor=2)
        return tf.Cohere2VisionConfig(vision_config=tf.SiglipVisionConfig(**_VISION), text_config=cohere_text,
                                      image_token_id=IMAGE_ID, downsample_factor=2, alignment_intermediate_size=64)
    if family == "smolvlm":
        return tf.SmolVLMConfig(vision_config=tf.SmolVLMVisionConfig(**_VISION), text_config=tf.LlamaConfig(**text),
                                image_token_id=IMAGE_ID, scale_factor=2)
    if family == "paligemma":  # PaliGemma 2: a Gemma 2 decoder (sliding and global layers), prefix-LM attention
        gemma2 = tf.Gemma2Config(**dict(text, bos_token_id=2, eos_token_id=1), head_dim=16, sliding_window=16,
                                 layer_types=["sliding_attention", "full_attention"] * (num_layers // 2))
        return tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**_VISION, projection_dim=64),
                                  text_config=gemma2, image_token_id=IMAGE_ID, projection_dim=64)
    if family == "shieldgemma2":  # Gemma 3 under another model_type
        config = family_config("gemma3", num_layers)
        return tf.ShieldGemma2Config(text_config=config.text_config, vision_config=config.vision_config,
                                     mm_tokens_per_image=9, image_token_index=299, boi_token_index=297,
                                     eoi_token_index=298)
    if family == "lfm2_vl":  # LFM2: short-convolution layers between attention layers, as released
        lfm2 = tf.Lfm2Config(**{k: v for k, v in text.items() if k != "num_key_value_heads"}, num_key_value_heads=2,
                             full_attn_idxs=[i for i in range(num_layers) if i % 3 == 2])
        return tf.Lfm2VlConfig(vision_config=tf.Siglip2VisionConfig(**dict(_VISION, num_patches=36)),
                               text_config=lfm2, image_token_id=IMAGE_ID, downsample_factor=2,
                               projector_hidden_size=64)
    if family in ("qwen3_5", "qwen3_5_moe"):  # hybrid: linear-attention (Gated DeltaNet) layers, as released
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0, "mrope_interleaved": True,
                "partial_rotary_factor": 0.25}
        q_text = {k: v for k, v in text.items() if k not in ("bos_token_id", "eos_token_id")}
        q_text.update(head_dim=16, rope_parameters=rope, linear_num_key_heads=2, linear_num_value_heads=4,
                      linear_key_head_dim=16, linear_value_head_dim=16)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=36)
        ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
                   vision_end_token_id=END_ID)
        if family == "qwen3_5":
            return tf.Qwen3_5Config(text_config=q_text, vision_config=vision, **ids)
        moe = dict(q_text, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                   num_experts_per_tok=2)
        return tf.Qwen3_5MoeConfig(text_config=moe, vision_config=vision, **ids)
    if family == "kimi_k25":  # DeepSeek-V3 decoder (MLA, MoE), MoonViT patches merged 2x2
        deepseek = tf.DeepseekV3Config(**dict(text, num_key_value_heads=4), moe_intermediate_size=32,
                                       n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                       first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                       qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
        vision = dict(patch_size=4, pos_emb_height=8, pos_emb_width=8, num_attention_heads=4, num_hidden_layers=2,
                      hidden_size=32, intermediate_size=64, merge_kernel_size=[2, 2])
        return tf.Kimi_K25Config(text_config=deepseek.to_dict(), vision_config=vision, projection_hidden_size=32,
                                 image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
                                 vision_end_token_id=END_ID)
    if family == "minicpmv4_6":  # a Qwen3.5 (hybrid linear-attention) decoder
        q_text = family_config("qwen3_5", num_layers).text_config
        return tf.MiniCPMV4_6Config(text_config=q_text.to_dict(),
                                    vision_config=dict(_VISION, model_type="minicpmv4_6_vision"),
                                    image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, image_size=24, patch_size=4)
    if family == "idefics2":  # SigLIP-like tower, a perceiver resampler (16 latents an image)
        perceiver = dict(hidden_size=64, resampler_n_latents=16, resampler_depth=1, resampler_n_heads=4,
                         resampler_head_dim=16, num_key_value_heads=2)
        return tf.Idefics2Config(vision_config=dict(_VISION), perceiver_config=perceiver,
                                 text_config=tf.MistralConfig(**text, head_dim=16), image_token_id=IMAGE_ID)
    if family == "aria":  # Idefics3 tower, cross-attention projector (36 patches -> 16 queries), MoE decoder
        aria_text = tf.AriaTextConfig(**dict(text, intermediate_size=32), moe_num_experts=4, moe_topk=2,
                                      moe_num_shared_experts=1)
        return tf.AriaConfig(vision_config=dict(_VISION, model_type="idefics3_vision"), text_config=aria_text,
                             projector_patch_to_query_dict={36: 16}, image_token_index=IMAGE_ID)
    if family in ("got_ocr2", "pp_chart2table"):  # SAM-like windowed tower, two stride-2 convolutions: 64x64 -> 16
        vision = dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                      patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64)
        config_class = tf.GotOcr2Config if family == "got_ocr2" else tf.PPChart2TableConfig
        return config_class(vision_config=vision, text_config=tf.Qwen2Config(**text).to_dict(),
                            image_token_index=IMAGE_ID, image_seq_length=16)
    if family == "lighton_ocr":  # Pixtral tower, patch merger, a Qwen3 decoder
        pixtral = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, head_dim=8, image_size=24, patch_size=4)
        return tf.LightOnOcrConfig(vision_config=pixtral, text_config=tf.Qwen3Config(**text, head_dim=16).to_dict(),
                                   image_token_id=IMAGE_ID, spatial_merge_size=2)
    if family == "deepseek_vl":  # SigLIP tower, MLP aligner
        return tf.DeepseekVLConfig(vision_config=dict(_VISION, model_type="siglip_vision_model"),
                                   text_config=tf.LlamaConfig(**text).to_dict(), image_token_id=IMAGE_ID)
    if family == "deepseek_vl_hybrid":  # a SigLIP tower (24x24) and a SAM tower (48x48), features concatenated
        sam = dict(model_type="sam_vision_model", hidden_size=32, output_channels=16, num_hidden_layers=2,
                   num_attention_heads=4, image_size=48, patch_size=4, window_size=4, global_attn_indexes=[1],
                   mlp_dim=64)
        return tf.DeepseekVLHybridConfig(vision_config=dict(_VISION, model_type="siglip_vision_model"),
                                         high_res_vision_config=sam, text_config=tf.LlamaConfig(**text).to_dict(),
                                         image_token_id=IMAGE_ID)
    if family == "fuyu":  # no vision tower: pixel patches projected linearly; a Persimmon decoder (partial rotary)
        persimmon = dict(model_type="persimmon", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        top = {k: v for k, v in persimmon.items() if k != "model_type"}  # transformers 5.19 reads these at the top
        return tf.FuyuConfig(text_config=persimmon, image_size=24, patch_size=4, image_token_id=IMAGE_ID, **top)
    if family == "granite_docling":  # SigLIP-like tower, pixel shuffle by 4, deepstack into decoder layers 0-2
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                      patch_size=4, out_hidden_size=64, scale_factor=4, deepstack_visual_indexes=[0, 1, 2])
        granite = dict(text, pad_token_id=0)
        return tf.GraniteDoclingConfig(vision_config=vision, text_config=granite, image_token_id=IMAGE_ID,
                                       pad_token_id=0)
    if family == "hyperclovax_vision_v2":  # Qwen2.5-VL tower (windowed, merged 2x2), a 1-D RoPE HyperCLOVA X decoder
        vision = dict(depth=2, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                      in_chans=3, intermediate_size=64, out_hidden_size=64, fullatt_block_indexes=[1], window_size=16)
        return tf.HyperCLOVAXVisionV2Config(vision_config=dict(vision, model_type="qwen2_5_vl_vision"),
                                            text_config=dict(text, model_type="hyperclovax", head_dim=16),
                                            image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)
    if family == "cosmos3_edge":  # SigLIP 2-like tower over patch grids (merged 2x2), interleaved M-RoPE
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                      num_patches=36, spatial_merge_size=2)
        return tf.Cosmos3EdgeConfig(text_config=dict(text, head_dim=16, rope_parameters=rope), vision_config=vision,
                                    projector_hidden_size=64, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                                    vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    if family == "ernie4_5_vl_moe":  # M-RoPE; MoE layers route text and visual tokens to separate experts
        rope = {"rope_type": "default", "mrope_section": [3, 3, 2], "rope_theta": 10000.0}  # (h, w, t): h == w
        ernie = dict(text, head_dim=16, rope_parameters=rope, moe_intermediate_size=[32, 32], moe_k=2,
                     moe_num_experts=4, moe_num_shared_experts=1)
        vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2, intermediate_size=64)
        return tf.Ernie4_5_VLMoeConfig(text_config=ernie, vision_config=vision, image_token_id=IMAGE_ID,
                                       video_token_id=VIDEO_ID, image_start_token_id=START_ID,
                                       image_end_token_id=END_ID, video_start_token_id=START_ID,
                                       video_end_token_id=END_ID)
    if family == "muse_glimmer":  # sliding and NoPE full-attention layers (per-layer RoPE theta), patch grids
        vision = dict(patch_size=4, pos_emb_height=8, pos_emb_width=8, num_attention_heads=4, num_hidden_layers=2,
                      hidden_size=32, intermediate_size=64, max_position_embeddings=64)
        muse = dict(text, head_dim=16, sliding_window=16)
        return tf.MuseGlimmerConfig(text_config=muse, vision_config=vision, out_hidden_size=128,
                                    projector_hidden_size=64, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)
    if family == "step3p7":  # ViT, 4x downsampling; sliding (fewer heads) and full layers, MoE from layer 3
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=48,
                      patch_size=4, mlp_ratio=2.0, max_position_embeddings=144)
        step = dict(text, head_dim=16, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_routed_experts=4, share_expert_dim=32, sliding_window=16, num_sliding_attention_heads=2,
                    layer_types=["sliding_attention", "full_attention"] * (num_layers // 2))
        return tf.Step3p7Config(vision_config=vision, text_config=step, image_token_id=IMAGE_ID)
    if family == "janus":  # SigLIP-like tower and aligner for understanding; a VQ model for generation (unused here)
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=24, patch_size=4,
                      projection_dim=64, num_image_tokens=36)
        vq = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                  num_res_blocks=1, num_patches=6, projection_dim=64, image_token_embed_dim=64)
        return tf.JanusConfig(vision_config=vision, vq_config=vq, text_config=tf.LlamaConfig(**text).to_dict(),
                              image_token_id=IMAGE_ID)
    if family == "video_llama_3":  # a SigLIP-like tower over Qwen2-VL-style patch grids, a plain Qwen2 decoder
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
        return tf.VideoLlama3Config(vision_config=vision, text_config=tf.Qwen2Config(**text).to_dict(),
                                    image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)
    if family == "paddleocr_vl":  # NaViT-style tower over patch grids, M-RoPE (Ernie 4.5 decoder)
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        paddle_text = dict(text, head_dim=16, rope_parameters=rope)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=24,
                      patch_size=4, spatial_merge_size=2)
        return tf.PaddleOCRVLConfig(vision_config=vision, text_config=paddle_text, image_token_id=IMAGE_ID,
                                    video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    if family == "ovis2":  # AIMv2-like tower, a visual vocabulary (soft tokens) embedded by its own table
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=24,
                      patch_size=4, vocab_size=64, hidden_stride=1)
        return tf.Ovis2Config(vision_config=vision, text_config=tf.Qwen2Config(**text).to_dict(),
                              image_token_id=IMAGE_ID, visual_indicator_token_ids=[247, 248, 249, 250, 251],
                              vocab_size=256, hidden_size=64)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("llava_next", "video_llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3", "llava_next_video",
            "qwen3_vl", "qwen3_vl_moe", "paligemma")
# more families of transformers 5.x, for the family x recipe matrix (tests/test_family_matrix.py)
MATRIX_FAMILIES = (*FAMILIES, "glm4v", "llama4", "internvl", "idefics3", "llava", "smolvlm", "mistral3", "aya_vision",
                   "cohere2_vision", "vipllava", "glm46v", "glm4v_moe", "shieldgemma2", "qwen3_5", "qwen3_5_moe",
                   "minicpmv4_6", "lfm2_vl", "kimi_k25", "idefics2", "aria", "got_ocr2", "lighton_ocr", "deepseek_vl",
                   "janus", "glmga", "glm_ocr", "pp_chart2table", "qianfan_ocr", "ovis2", "video_llama_3",
                   "paddleocr_vl", "deepseek_vl_hybrid", "fuyu", "hyperclovax_vision_v2", "cosmos3_edge", "gemma3n")
_MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "glm46v", "glm4v_moe", "glmga", "glm_ocr",
          "cosmos3_omni", "cosmos3_edge", "ernie4_5_vl_moe")
_SINGLE_IMAGE = ("llava", "vipllava", "mistral3", "aya_vision", "cohere2_vision", "smolvlm", "idefics2", "aria",
                 "got_ocr2", "pp_chart2table", "lighton_ocr", "deepseek_vl", "deepseek_vl_hybrid", "janus", "ovis2",
                 "step3p7")
# a sample's pixel_values where not [3, 24, 24] (one image a sample)
_PIXEL_SHAPE = {"smolvlm": (1, 3, 24, 24), "idefics2": (1, 3, 24, 24), "got_ocr2": (3, 64, 64),
                "pp_chart2table": (3, 64, 64), "step3p7": (3, 48, 48)}
_EAGER = ("paligemma", "got_ocr2", "pp_chart2table")  # no SDPA path in transformers


def gemma3n_config(num_layers: int, kv_shared_layers: int = 0):
    """A tiny Gemma 3n: AltUp (4 streams), per-layer inputs, LAuReL, sliding and full layers alternating, the last
    ``kv_shared_layers`` layers reusing earlier keys and values; timm's ``test_resnet`` as the vision tower (128 px
    images -> 4x4 = 16 soft tokens of 96 channels). Needs timm (and a torchvision that imports)."""
    import transformers as tf

    text = dict(vocab_size=300, vocab_size_per_layer_input=300, hidden_size=64, intermediate_size=[128] * num_layers,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                hidden_size_per_layer_input=8, sliding_window=16, num_kv_shared_layers=kv_shared_layers,
                layer_types=["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (
                    num_layers % 2),
                altup_num_inputs=4, laurel_rank=4, activation_sparsity_pattern=[0.0] * num_layers,
                max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    audio = dict(hidden_size=32, conf_num_hidden_layers=1, conf_num_attention_heads=2, sscp_conv_channel_size=[16, 8],
                 conf_conv_kernel_size=3, vocab_size=16, vocab_offset=420)
    return tf.Gemma3nConfig(text_config=text, vision_config=dict(architecture="test_resnet", hidden_size=96),
                            audio_config=audio, vision_soft_tokens_per_image=16, image_token_id=299,
                            boi_token_id=297, eoi_token_id=298, audio_token_id=296)


def tiny_family_model(family: str, num_layers: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa"):
    """A random-weight model of ``family``, saved and reloaded with ``from_pretrained`` (PaliGemma 2's Gemma 2
    decoder and GOT-OCR2, which have no SDPA path, with eager attention)."""
    from transformers import AutoModelForImageTextToText

    if family in _EAGER:
        attn_implementation = "eager"

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(family_config(family, num_layers))
    _spread_weights(model, seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            # MoE experts run one by one (the grouped kernels take no float64), as a reference would
            loaded = AutoModelForImageTextToText.from_pretrained(tmp, dtype=dtype,
                                                                 attn_implementation=attn_implementation,
                                                                 experts_implementation="eager")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return loaded.eval()


def _left_pad(rows: list[list[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def qwen_video_inputs(model, grids: list[tuple[int, int, int]], seed: int = 0) -> dict[str, Tensor]:
    """Left-padded Qwen2-VL / Qwen2.5-VL prompts, one video per sample with the given ``(t, h, w)`` patch grid
    (temporal patches of 2 frames, 4 px patches), the processor's ``mm_token_type_ids`` included."""
    g = torch.Generator().manual_seed(seed)
    merge = model.config.vision_config.spatial_merge_size ** 2
    rows = [[1, *range(5, 8 + 2 * i), START_ID, *([model.config.video_token_id] * (t * h * w // merge)), END_ID, 7, 8]
            for i, (t, h, w) in enumerate(grids)]
    ids, mask = _left_pad(rows)
    grid = torch.tensor(grids)
    pixel = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 4 * 4, generator=g).to(model.dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixel, "video_grid_thw": grid,
            "mm_token_type_ids": (ids == model.config.video_token_id).long() * 2}


def family_inputs(model, family: str, batch: int = 1, seed: int = 0, sizes: list[tuple[int, int]] | None = None,
                  video: bool = False, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Left-padded prompts ``<bos> text <image tokens> question`` for a tiny ``family`` model.

    ``sizes`` gives each sample's image size (LLaVA-NeXT, OneVision: any-resolution tiles; Qwen2-VL:
    the patch grid), so samples may carry different numbers of visual tokens. ``video`` gives the
    sample a video instead (Video-LLaVA, OneVision, Qwen2-VL).
    """
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or model.dtype
    sizes = sizes or [(24, 24)] * batch
    vocab = 290 if family in ("gemma3", "shieldgemma2", "gemma3n") else 250

    def words(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high + 1, (1,), generator=g))
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    rows, extra = [], {}
    with torch.no_grad():
        if family == "llava_onevision" and video:  # 8 frames a clip, each pooled to 3x3, one newline closing it
            pixel = torch.randn(len(sizes), 8, 3, 24, 24, generator=g).to(dtype)
            feats = model.model.get_video_features(pixel_values_videos=pixel).pooler_output  # [batch, tokens, dim]
            counts = [feats.shape[1]] * len(sizes)
            extra = {"pixel_values_videos": pixel}
            image_id = model.config.video_token_id
        elif family in ("llava_next", "llava_onevision", "llava_next_video"):
            pixel = torch.randn(len(sizes), 5, 3, 24, 24, generator=g).to(dtype)
            image_sizes = torch.tensor([list(s) for s in sizes])
            counts = [f.shape[0] for f in model.model.get_image_features(
                pixel_values=pixel, image_sizes=image_sizes).pooler_output]
            extra = {"pixel_values": pixel, "image_sizes": image_sizes}
            image_id = model.config.image_token_id
        elif family == "video_llava":
            if video:
                pixel = torch.randn(len(sizes), 8, 3, 24, 24, generator=g).to(dtype)
                feats = model.model.get_video_features(pixel_values_videos=pixel).pooler_output
                extra = {"pixel_values_videos": pixel}
                image_id = model.config.video_token_id
            else:
                pixel = torch.randn(len(sizes), 3, 24, 24, generator=g).to(dtype)
                feats = model.model.get_image_features(pixel_values_images=pixel).pooler_output
                extra = {"pixel_values_images": pixel}
                image_id = model.config.image_token_id
            total = sum(int(f.numel() // f.shape[-1]) for f in feats)  # frames of a video come as rows
            counts = [total // len(sizes)] * len(sizes)
        elif family in _MROPE:
            grids = torch.tensor([[2 if video else 1, h // 4, w // 4] for h, w in sizes])
            patches = int(grids.prod(dim=1).sum())
            frames = 1 if family in ("cosmos3_edge", "ernie4_5_vl_moe") else 2  # temporal patch size
            pixel = torch.randn(patches, 3 * frames * 4 * 4, generator=g).to(dtype)
            merge = model.config.vision_config.spatial_merge_size ** 2
            counts = [int(t * h * w // merge) for t, h, w in grids.tolist()]
            key = "video" if video else "image"
            extra = {f"pixel_values{'_videos' if video else ''}": pixel, f"{key}_grid_thw": grids}
            image_id = model.config.video_token_id if video else model.config.image_token_id
        elif family in ("video_llama_3", "paddleocr_vl", "hyperclovax_vision_v2", "muse_glimmer"):  # (1, h, w) grids
            grids = torch.tensor([[1, h // 4, w // 4] for h, w in sizes])
            patches = int(grids.prod(dim=1).sum())
            shape = {"video_llama_3": (patches, 3 * 4 * 4), "paddleocr_vl": (patches, 3, 4, 4),
                     "hyperclovax_vision_v2": (patches, 3 * 2 * 4 * 4),  # Qwen2.5-VL: 2 frames a patch
                     "muse_glimmer": (patches, 3 * 2 * 4 * 4)}[family]
            pixel = torch.randn(*shape, generator=g).to(dtype)
            counts = [int(h * w // 4) for _, h, w in grids.tolist()]
            extra = {"pixel_values": pixel, "image_grid_thw": grids}
            if family == "video_llama_3":
                extra["image_merge_sizes"] = torch.full((len(sizes),), 2, dtype=torch.long)
            image_id = model.config.image_token_id
        elif family == "kimi_k25":  # patches [n, 3, 4, 4] with a (1, rows, cols) grid per image
            grids = torch.tensor([[1, h // 4, w // 4] for h, w in sizes])
            pixel = torch.randn(int(grids.prod(dim=1).sum()), 3, 4, 4, generator=g).to(dtype)
            counts = [int(h * w // 4) for _, h, w in grids.tolist()]
            extra = {"pixel_values": pixel, "image_grid_thw": grids}
            image_id = model.config.image_token_id
        elif family in ("llama4", "internvl", "idefics3", "qianfan_ocr"):  # one image a sample, counted by the tower
            side = 48 if family in ("internvl", "qianfan_ocr") else 24
            shape = (len(sizes), 1, 3, side, side) if family == "idefics3" else (len(sizes), 3, side, side)
            pixel = torch.randn(*shape, generator=g).to(dtype)
            features = model.get_image_features(pixel_values=pixel[:1])
            features = features.last_hidden_state if family == "llama4" else features.pooler_output
            features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
            counts = [int(features.numel() // features.shape[-1])] * len(sizes)
            extra = {"pixel_values": pixel}
            image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
        elif family in _SINGLE_IMAGE:  # one image per sample, its token count from the model's own features
            pixel = torch.randn(len(sizes), *_PIXEL_SHAPE.get(family, (3, 24, 24)), generator=g).to(dtype)
            extra = {"pixel_values": pixel}
            if family == "deepseek_vl_hybrid":  # the high-resolution view of each image
                extra["high_res_pixel_values"] = torch.randn(len(sizes), 3, 48, 48, generator=g).to(dtype)
            if family in ("mistral3", "lighton_ocr"):
                extra["image_sizes"] = torch.tensor([[24, 24]] * len(sizes))
            features = model.model.get_image_features(**{k: v[:1] for k, v in extra.items()}).pooler_output
            features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
            counts = [int(features.numel() // features.shape[-1])] * len(sizes)
            image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
        elif family == "granite_docling":  # one 32x32 tile a sample, 2x2 tokens after the pixel shuffle
            pixel = torch.randn(len(sizes), 1, 3, 32, 32, generator=g).to(dtype)
            tiles = torch.ones(len(sizes), 1, dtype=torch.bool)
            features = model.model.get_image_features(pixel_values=pixel[:1], pixel_attention_mask=tiles[:1])
            counts = [int(features.pooler_output[0].shape[0])] * len(sizes)
            extra = {"pixel_values": pixel, "pixel_attention_mask": tiles}
            image_id = model.config.image_token_id
        elif family == "fuyu":  # 36 flattened 4x4 patches an image, one token each
            pixel = torch.randn(len(sizes), 36, 4 * 4 * 3, generator=g).to(dtype)
            counts = [36] * len(sizes)
            named = inspect.signature(model.model.forward).parameters  # image_patches, pixel_values from 5.24 on
            extra = {"pixel_values" if "pixel_values" in named else "image_patches": pixel}
            image_id = model.config.image_token_id
        elif family == "paligemma":  # the patch grid of the tower: 36 tokens an image
            pixel = torch.randn(len(sizes), 3, 24, 24, generator=g).to(dtype)
            counts = [(24 // 4) ** 2] * len(sizes)
            extra = {"pixel_values": pixel}
            image_id = model.config.image_token_id
        elif family == "gemma3n":  # timm's test_resnet: 128 px -> 4x4 soft tokens
            pixel = torch.randn(len(sizes), 3, 128, 128, generator=g).to(dtype)
            counts = [model.config.vision_soft_tokens_per_image] * len(sizes)
            extra = {"pixel_values": pixel}
            image_id = model.config.image_token_id
        elif family in ("gemma3", "shieldgemma2"):
            pixel = torch.randn(len(sizes), 3, 24, 24, generator=g).to(dtype)
            counts = [model.config.mm_tokens_per_image] * len(sizes)
            extra = {"pixel_values": pixel}
            image_id = model.config.image_token_id
        else:
            raise ValueError(f"unknown family {family!r}")
    bos = 2 if family in ("gemma3", "shieldgemma2", "paligemma", "gemma3n") else 1
    for count in counts:
        image = [image_id] * count
        if family in ("qwen3_vl", "qwen3_vl_moe") and video:  # one run per frame, a text (timestamp) token between
            frame = count // 2
            image = [START_ID, *([image_id] * frame), END_ID, 3, START_ID, *([image_id] * frame), END_ID]
        elif family in (*_MROPE, "paddleocr_vl"):
            image = [START_ID, *image, END_ID]
        rows.append([bos, *words(2, 5), *image, *words(3, 8)])
    input_ids, attention_mask = _left_pad(rows)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    if family in (*_MROPE, "paddleocr_vl"):
        out["mm_token_type_ids"] = (input_ids == image_id).long() * (2 if video else 1)
    if family == "ernie4_5_vl_moe":  # the processor's routing types: visual tokens to the vision experts
        out["moe_mm_token_type_ids"] = out["mm_token_type_ids"]
    if family in ("gemma3", "shieldgemma2"):
        out["token_type_ids"] = (input_ids == image_id).long()
    if family == "paligemma":  # prefix (0): the image and the prompt; suffix (1): each row's last two tokens
        out["token_type_ids"] = torch.zeros_like(input_ids)
        out["token_type_ids"][:, -2:] = 1
    return out


# ----------------------------------------------------------------------------------------------
# The family x recipe matrix: which families run every decoder-stage recipe, and why not where not
# ----------------------------------------------------------------------------------------------
def missing_module(name: str) -> str | None:
    """Why ``name`` cannot be imported (None when it can): a matrix row that needs it then skips, unless
    ``PRUNEKIT_REQUIRE_<NAME>=1`` (set by the CI job that installs it) makes that a failure."""
    if not name:
        return None
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001  a torchvision that does not load raises more than ImportError
        if os.environ.get(f"PRUNEKIT_REQUIRE_{name.upper()}") == "1":
            raise
        return f"{name} does not import here ({type(exc).__name__}: {exc})"
    return None


@dataclass(frozen=True)
class MatrixRow:
    """One family of the matrix (tests/test_family_matrix.py) and of the table in docs/adapters.md.

    ``reason`` says why the family does not run at all (None: it runs); ``recipe_reasons`` says why a
    given recipe does not (``{recipe: reason}``). ``refused`` is a piece of the ``AdapterError``
    ``prunekit.apply`` raises on the family (checked on its tiny model, or without a builder on its
    default config built on the meta device). ``min_transformers`` is the oldest transformers the row
    holds for (5.19.0, the supported minimum; a later version for families 5.19 does not have).
    """

    family: str  # the config.model_type (and the builder's name in family_config, where there is one)
    classes: str  # the transformers class
    adapter: str  # the prunekit adapter that handles it
    notes: str = ""  # what is special about it
    reason: str | None = None
    recipe_reasons: tuple[tuple[str, str], ...] = ()
    min_transformers: str = "5.19.0"
    refused: str = ""
    needs: str = ""  # a module the tiny model needs beyond prunekit's test tools (its rows skip without it)


LLAMA4_BROKEN = ("transformers 5.24's Llama4ForConditionalGeneration.forward fails on its own (it reads "
                 "image_outputs from the language model's output), pruned or not; runs on transformers 5.19")
NO_BUILDER = "no tiny builder yet; the generic adapter accepts its default config (untested)"
TIMM = "no tiny model from config classes: its vision tower is a timm model (timm is not a prunekit dependency)"
NO_DEFAULT = "no tiny builder yet (its default config does not build without checkpoint-specific values)"
LINEAR = "linear-attention layers: prunekit refuses them (AdapterError naming the layer kind and index)"
NO_ID = ("its config names no image token id by default (Q-Former query embeddings, not token slots); "
         "its OPT decoder has no rotary embedding")
GENERIC_REFUSED = "the generic adapter would not reproduce the bare model"
_LATER = "5.24.0"  # families transformers 5.19 does not have


def _no(family: str, classes: str, reason: str, refused: str = "", min_transformers: str = "5.19.0",
        adapter: str = "none", notes: str = "") -> MatrixRow:
    return MatrixRow(family, classes, adapter, notes, reason=reason, refused=refused,
                     min_transformers=min_transformers)


def _untested(family: str, classes: str, reason: str = NO_BUILDER, min_transformers: str = "5.19.0") -> MatrixRow:
    return MatrixRow(family, classes, "generic", reason=reason, min_transformers=min_transformers)


MATRIX: tuple[MatrixRow, ...] = (
    MatrixRow("llava", "LlavaForConditionalGeneration", "llava", "CLIP tower, MLP projector"),
    MatrixRow("llava_next", "LlavaNextForConditionalGeneration", "llava_next", "any-resolution tiles"),
    MatrixRow("video_llava", "VideoLlavaForConditionalGeneration", "video_llava", "images and videos"),
    MatrixRow("llava_onevision", "LlavaOnevisionForConditionalGeneration", "llava_onevision", "any-resolution tiles"),
    MatrixRow("llava_next_video", "LlavaNextVideoForConditionalGeneration", "generic", ""),
    MatrixRow("qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2_vl", "M-RoPE"),
    MatrixRow("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_vl", "M-RoPE"),
    MatrixRow("qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3_vl",
              "M-RoPE; deepstack features follow the kept tokens"),
    MatrixRow("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl",
              "M-RoPE, deepstack, MoE decoder"),
    MatrixRow("cosmos3_omni", "Cosmos3OmniForConditionalGeneration", "qwen3_vl",
              "Qwen3-VL's text and vision under its own model_type: M-RoPE, deepstack"),
    MatrixRow("gemma3", "Gemma3ForConditionalGeneration", "gemma3",
              "sliding-window layers; bidirectional image blocks"),
    MatrixRow("paligemma", "PaliGemmaForConditionalGeneration", "paligemma",
              "PaliGemma 2 (Gemma 2 decoder): prefix-LM, the prompt (token_type_ids 0) one bidirectional block"),
    MatrixRow("glm4v", "Glm4vForConditionalGeneration", "generic", "M-RoPE (partial rotary)"),
    MatrixRow("glm46v", "Glm46VForConditionalGeneration", "generic", "GLM-4.6V: M-RoPE (partial rotary)"),
    MatrixRow("glm4v_moe", "Glm4vMoeForConditionalGeneration", "generic", "GLM-4.5V: M-RoPE, MoE decoder"),
    MatrixRow("internvl", "InternVLForConditionalGeneration", "generic", "pixel-shuffled tiles"),
    MatrixRow("idefics3", "Idefics3ForConditionalGeneration", "generic", "SmolVLM's architecture"),
    MatrixRow("smolvlm", "SmolVLMForConditionalGeneration", "generic", "pixel-shuffled tiles"),
    MatrixRow("mistral3", "Mistral3ForConditionalGeneration", "generic", "Pixtral tower, patch merger"),
    MatrixRow("aya_vision", "AyaVisionForConditionalGeneration", "generic",
              "Cohere2 decoder: sliding-window layers"),
    MatrixRow("cohere2_vision", "Cohere2VisionForConditionalGeneration", "generic",
              "Cohere2 decoder: sliding-window layers"),
    MatrixRow("vipllava", "VipLlavaForConditionalGeneration", "generic", "features of several CLIP layers"),
    MatrixRow("kimi_k25", "Kimi_K25ForConditionalGeneration", "generic",
              "DeepSeek-V3 decoder: multi-head latent attention, MoE"),
    MatrixRow("llama4", "Llama4ForConditionalGeneration", "generic",
              "MoE every other layer, chunked attention, NoPE layers", reason=LLAMA4_BROKEN),
    MatrixRow("gemma3n", "Gemma3nForConditionalGeneration", "gemma3n",
              "AltUp streams, per-layer inputs, alternating sliding and full layers (the matrix's tiny model shares no "
              "KV: tests/test_gemma3n.py checks KV-shared layers); its timm vision tower needs timm: run in CI's "
              "Gemma 3n job", needs="timm"),
    MatrixRow("shieldgemma2", "Gemma3ForConditionalGeneration", "gemma3", "Gemma 3 under another model_type",
              reason="transformers does not reload a saved tiny ShieldGemma 2 (its weights come back unexpected); "
                     "on a model built from config the gemma3 adapter's keep-all is identical and fastv prunes (tested)"),
    MatrixRow("idefics2", "Idefics2ForConditionalGeneration", "generic",
              "perceiver resampler: a fixed count of latents an image"),
    MatrixRow("aria", "AriaForConditionalGeneration", "generic",
              "cross-attention projector (patches to queries), MoE decoder"),
    MatrixRow("deepseek_vl", "DeepseekVLForConditionalGeneration", "generic", "SigLIP tower, MLP aligner"),
    MatrixRow("janus", "JanusForConditionalGeneration", "generic",
              "understanding path (SigLIP tower, aligner); the VQ image generator is not run"),
    MatrixRow("got_ocr2", "GotOcr2ForConditionalGeneration", "generic",
              "SAM-like windowed tower, two stride-2 convolutions; eager attention (no SDPA path)"),
    MatrixRow("lighton_ocr", "LightOnOcrForConditionalGeneration", "generic",
              "Pixtral tower, patch merger, Qwen3 decoder"),
    MatrixRow("glmga", "Glm46VForConditionalGeneration", "generic",
              "GLM-4.1V text and vision under its own model_type: M-RoPE (partial rotary)"),
    MatrixRow("glm_ocr", "GlmOcrForConditionalGeneration", "generic", "M-RoPE (partial rotary), grids as Qwen2-VL"),
    MatrixRow("pp_chart2table", "GotOcr2ForConditionalGeneration", "generic",
              "GOT-OCR2's architecture; eager attention (no SDPA path)"),
    MatrixRow("qianfan_ocr", "QianfanOCRForConditionalGeneration", "generic",
              "InternViT-like tower, pixel shuffle, Qwen3 decoder"),
    MatrixRow("ovis2", "Ovis2ForConditionalGeneration", "generic",
              "visual vocabulary: the tower's soft tokens embedded through its own table"),
    MatrixRow("video_llama_3", "VideoLlama3ForConditionalGeneration", "generic",
              "patch grids merged per image (image_merge_sizes), a plain 1-D RoPE Qwen2 decoder"),
    MatrixRow("paddleocr_vl", "PaddleOCRVLForConditionalGeneration", "generic",
              "NaViT-style tower over patch grids, M-RoPE"),
    MatrixRow("deepseek_vl_hybrid", "DeepseekVLHybridForConditionalGeneration", "generic",
              "a SigLIP and a SAM (high-resolution) tower, features concatenated per token"),
    MatrixRow("step3p7", "Step3p7ForConditionalGeneration", "generic",
              "one rotary embedding per layer type (sliding layers with fewer heads, full layers); MoE from layer 3"),
    MatrixRow("fuyu", "FuyuForCausalLM", "generic",
              "no vision tower: pixel patches projected linearly; Persimmon decoder (partial rotary, QK norm)",
              recipe_reasons=(("dart", "DART reads the final norm, which Persimmon names final_layernorm: the generic "
                                       "adapter finds no `norm` and raises AdapterError"),)),
    MatrixRow("hyperclovax_vision_v2", "HyperCLOVAXVisionV2ForConditionalGeneration", "generic",
              "Qwen2.5-VL tower (patch grids merged 2x2), a 1-D RoPE decoder"),
    MatrixRow("cosmos3_edge", "Cosmos3EdgeForConditionalGeneration", "generic",
              "SigLIP 2-like tower over patch grids, interleaved M-RoPE"),
    # refused with a clear AdapterError (tested)
    _no("qwen3_5", "Qwen3_5ForConditionalGeneration", LINEAR, "decoder layer 0 is a 'linear_attention' layer"),
    _no("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", LINEAR, "decoder layer 0 is a 'linear_attention' layer"),
    _no("minicpmv4_6", "MiniCPMV4_6ForConditionalGeneration", LINEAR + " (a Qwen3.5 decoder)",
        "decoder layer 0 is a 'linear_attention' layer"),
    _no("minicpmv4_7", "MiniCPMV4_7ForConditionalGeneration", LINEAR + " (a Qwen3.5 decoder)",
        "decoder layer 0 is a 'linear_attention' layer"),
    _no("minicpm_ocr", "MiniCPMOcrForConditionalGeneration", LINEAR + " (a Qwen3.5 decoder)",
        "decoder layer 0 is a 'linear_attention' layer", _LATER),
    _no("lfm2_vl", "Lfm2VlForConditionalGeneration",
        "short-convolution layers between attention layers: prunekit refuses them (AdapterError naming 'conv')",
        "decoder layer 0 is a 'conv' layer"),
    _no("lfm3_vl", "Lfm3VlForConditionalGeneration",
        "short-convolution layers: prunekit refuses them (AdapterError naming 'conv')",
        "decoder layer 0 is a 'conv' layer", _LATER),
    _no("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3",
        "Mamba and MoE layers ('linear_attention', 'mlp', 'moe'): no decoder stack prunekit recognises",
        "no decoder stack"),
    _no("glm5_next", "Glm5NextForConditionalGeneration",
        "indexed (sparse) and linear-attention layers; no decoder stack prunekit recognises", "no decoder stack"),
    _no("dots3_note", "Dots3NoteForConditionalGeneration",
        "indexed (sparse-attention) layers: prunekit refuses them (AdapterError naming 'indexed_attention')",
        "decoder layer 0 is a 'indexed_attention' layer", _LATER),
    _no("hy_v4_vl", "HYV4VLForConditionalGeneration",
        "indexed (sparse-attention) layers: prunekit refuses them (AdapterError naming 'indexed_attention')",
        "decoder layer 0 is a 'indexed_attention' layer", _LATER),
    _no("mistral_large4", "MistralLarge4ForConditionalGeneration",
        "indexed (sparse-attention) layers: prunekit refuses them (AdapterError naming 'indexed_attention')",
        "decoder layer 0 is a 'indexed_attention' layer", _LATER),
    _no("unlimited_ocr", "UnlimitedOcrForConditionalGeneration",
        "'reference_sliding_attention' layers: prunekit refuses them (AdapterError naming the kind)",
        "decoder layer 0 is a 'reference_sliding_attention' layer", _LATER),
    _no("inkling_mm_model", "InklingForConditionalGeneration",
        "hybrid layers ('hybrid', 'hybrid_sliding'); no decoder stack prunekit recognises", "no decoder stack"),
    _no("inkling2", "Inkling2ForConditionalGeneration",
        "hybrid layers ('hybrid', 'hybrid_sliding'); no decoder stack prunekit recognises", "no decoder stack", _LATER),
    _no("inkling2_loop", "Inkling2LoopForConditionalGeneration",
        "hybrid layers ('hybrid', 'hybrid_sliding'); no decoder stack prunekit recognises", "no decoder stack", _LATER),
    _no("exaone4_5", "Exaone4_5_ForConditionalGeneration",
        "post-norm decoder layers (no input norm before attention, which the scoring pass needs)", "has no input norm"),
    _no("apertus1p5", "Apertus1p5ForConditionalGeneration",
        "its decoder layers name their input norm differently (no input_layernorm / attention_norm / ln_1 / norm1)",
        "has no input norm", _LATER),
    _no("t5gemma2", "T5Gemma2ForConditionalGeneration",
        "encoder-decoder: the image goes through the encoder; no decoder-only visual tokens", "has no input norm"),
    _no("florence2", "Florence2ForConditionalGeneration",
        "encoder-decoder (BART): no decoder-only visual tokens", "no decoder stack"),
    _no("blip-2", "Blip2ForConditionalGeneration", NO_ID, "no decoder stack"),
    _no("instructblip", "InstructBlipForConditionalGeneration", NO_ID, "no decoder stack"),
    _no("instructblipvideo", "InstructBlipVideoForConditionalGeneration", NO_ID, "names no visual token id"),
    # the generic adapter would accept these, but would not reproduce the model: known gaps
    _no("gemma4", "Gemma4ForConditionalGeneration",
        "not Gemma-3-like: per-layer inputs (hidden_size_per_layer_input), KV-shared layers and bidirectional "
        "vision attention, which no adapter slices or rebuilds yet: refused by name", GENERIC_REFUSED),
    _no("gemma4_unified", "Gemma4UnifiedForConditionalGeneration",
        "Gemma 4 decoder: per-layer inputs, KV-shared layers, bidirectional vision attention: refused by name",
        GENERIC_REFUSED),
    _no("mllama", "MllamaForConditionalGeneration",
        "the image enters through cross-attention layers, not as tokens of the sequence: nothing to prune in the "
        "decoder's sequence: refused by name", GENERIC_REFUSED),
    _no("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration",
        "M-RoPE over interleaved audio and video, which the generic adapter does not read: refused by name",
        GENERIC_REFUSED),
    _no("qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerForConditionalGeneration",
        "M-RoPE over interleaved audio and video, and deepstack; no adapter knows both: refused by name",
        GENERIC_REFUSED),
    _no("granite_docling", "GraniteDoclingForConditionalGeneration",
        "deepstack as Qwen3-VL's (features added to the visual tokens after decoder layers 0-2) on a 1-D RoPE "
        "decoder: no adapter moves them with the kept tokens (a stage before the last one crashes): refused by name",
        GENERIC_REFUSED, _LATER),
    _no("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration",
        "MoE layers route text and visual tokens to separate experts by the processor's moe_mm_token_type_ids, "
        "which the generic adapter does not shorten with the kept tokens (a pruned prefill crashes): refused by name",
        GENERIC_REFUSED),
    _no("muse_glimmer", "MuseGlimmerForConditionalGeneration",
        "its full-attention layers are NoPE (layer_rope_theta 0: the model passes them no position embeddings); the "
        "generic adapter's stages feed them positions, so keep-all differs from the bare model: refused by name",
        GENERIC_REFUSED),
    _no("diffusion_gemma", "DiffusionGemmaForBlockDiffusion",
        NO_DEFAULT + "; block diffusion, not autoregressive generate (prunekit's stages assume a causal prefill)"),
    _no("chameleon", "ChameleonForConditionalGeneration",
        NO_DEFAULT + "; images are VQ codes in the text vocabulary"),
    _no("emu3", "Emu3ForConditionalGeneration",
        NO_DEFAULT + "; images are VQ codes in the text vocabulary"),
    _no("fast_vlm", "FastVlmForConditionalGeneration", TIMM),
    _no("perception_lm", "PerceptionLMForConditionalGeneration", TIMM),
    _no("cohere_compass", "CohereCompassForConditionalGeneration", NO_DEFAULT),
    _no("deepseek_ocr2", "DeepseekOcr2ForConditionalGeneration", NO_DEFAULT),
    _no("granite4_vision", "Granite4VisionForConditionalGeneration", NO_DEFAULT),
    _no("hunyuan_vl", "HunYuanVLForConditionalGeneration", NO_DEFAULT),
    _no("qwen4_exp", "Qwen4ExpForConditionalGeneration", NO_DEFAULT),
    # the generic adapter accepts the default config; no tiny model checks it yet
    _untested("molmo2", "Molmo2ForConditionalGeneration", min_transformers=_LATER),
    _untested("minimax_m3_vl", "MiniMaxM3SparseForConditionalGeneration"),
    _untested("muse_spark", "MuseSparkForConditionalGeneration", min_transformers=_LATER),
    _untested("llava_onevision1_5", "LlavaOnevision15ForConditionalGeneration", min_transformers="5.25.0"),
    _untested("ovis2_5", "Ovis2_5ForConditionalGeneration", min_transformers="5.25.0"),
)

# Recipes (by name prefix) that the matrix does not run on any family, and why (shown under the table).
MATRIX_RECIPE_REASONS: dict[str, str] = {
    "oracle": "needs the toy task's ground truth (run through prunekit eval on the toy)",
    "pooling-": "grid pooling needs one square patch grid per image; the tiny prompts are not all square",
}


VISION_BLOCKS = {  # where a recipe's vision block runs, per adapter (tests/test_family_matrix.py runs one on each)
    "llava": "before the projector, per image; tower probes",
    "video_llava": "before the projector, per image or video frame; tower probes",
    "llava_next": "at the LM input, per tile",
    "llava_onevision": "at the LM input, per tile or video frame",
    "qwen2_vl": "at the LM input, per image; attention received and keys of the tower",
}


def family_matrix_markdown() -> str:
    """The supported-family table of docs/adapters.md, generated from :data:`MATRIX`."""
    lines = ["| family | class | adapter | decoder-stage recipes | vision blocks | notes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in MATRIX:
        if row.reason is not None:
            status = f"no: {row.reason}"
        elif row.recipe_reasons:
            status = "all but " + "; ".join(f"`{name}` ({why})" for name, why in row.recipe_reasons)
        else:
            status = "all"
        vision = "-" if row.reason is not None else VISION_BLOCKS.get(row.adapter, "at the LM input, per image")
        lines.append(f"| {row.family} | `{row.classes}` | {row.adapter} | {status} | {vision} | {row.notes} |")
    lines.append("")
    lines.extend(f"Not run in the matrix: `{name}*`: {why}." for name, why in MATRIX_RECIPE_REASONS.items())
    return "\n".join(lines)
