"""Mixture-of-experts decoders: the FLOPs model counts active experts (hand counts), and probes
that read a layer's MLP read the MoE block's output."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import prunekit
from prunekit.flops import DecoderDims, prefill_flops


def _hand(n: int, d: int, mlp_macs_per_token: float) -> float:
    """One layer: projections, scores and values, and the MLP's multiply-adds per token."""
    return 4 * n * d * d + 2 * n * n * d + n * mlp_macs_per_token


@pytest.mark.skipif(not hasattr(transformers, "Qwen3VLMoeConfig"), reason="no Qwen3-VL-MoE in this transformers")
def test_qwen3_vl_moe_counts_k_experts_and_the_router_and_dense_layers_as_dense():
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2,
                decoder_sparse_step=1, mlp_only_layers=[0], vocab_size=256)
    dims = DecoderDims.from_config(transformers.Qwen3VLMoeConfig(text_config=text))
    n, d = 100, 64
    moe = 3 * d * (2 * 32) + d * 6  # two experts of width 32 (three matrices each) + a router over 6 experts
    dense = 3 * d * 128
    expected = _hand(n, d, dense) + 3 * _hand(n, d, moe)
    assert prefill_flops([n] * 4, dims) == pytest.approx(expected, rel=1e-12)


@pytest.mark.skipif(not hasattr(transformers, "Llama4TextConfig"), reason="no Llama 4 in this transformers")
def test_llama4_counts_the_shared_expert_and_its_dense_layers_width():
    config = transformers.Llama4TextConfig(hidden_size=64, intermediate_size=32, intermediate_size_mlp=128,
                                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, num_local_experts=8, num_experts_per_tok=1,
                                           interleave_moe_layer_step=2, vocab_size=256)
    dims = DecoderDims.from_config(config)
    n, d = 50, 64
    moe = 3 * d * (32 + 32) + d * 8  # one routed expert + the shared expert, both of width 32, + router
    dense = 3 * d * 128
    assert config.moe_layers == [1, 3]
    expected = 2 * _hand(n, d, dense) + 2 * _hand(n, d, moe)
    assert prefill_flops([n] * 4, dims) == pytest.approx(expected, rel=1e-12)


@pytest.mark.skipif(not hasattr(transformers, "Qwen3VLMoeConfig"), reason="no Qwen3-VL-MoE in this transformers")
def test_a_config_with_one_mlp_width_per_layer_counts_each_layers_own(tmp_path, capsys):
    """Gemma 3n gives each layer its MLP width (a list): each layer costs its own, by the papers' formula."""
    from prunekit.cli import main
    from prunekit.testing import gemma3n_config

    config = gemma3n_config(4)
    config.text_config.intermediate_size = [128, 256, 128, 512]
    dims = DecoderDims.from_config(config)
    d, n = config.text_config.hidden_size, 40
    by_hand = sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for m in (128, 256, 128, 512))
    assert prefill_flops([n] * 4, dims) == by_hand
    config.save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path), "--recipe", "fastv", "--visual-tokens", "32"]) == 0
    assert "MLP 128-512 (per layer)" in capsys.readouterr().out


def test_prunekit_flops_on_an_moe_config(tmp_path, capsys):
    from prunekit.cli import main

    text = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=4, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
    transformers.Qwen3VLMoeConfig(text_config=text).save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path), "--json", "--visual-tokens", "576"]) == 0
    none = json.loads(capsys.readouterr().out)["recipes"][0]
    n, d = 576, 2048
    expected = 24 * _hand(n, d, 3 * d * 8 * 768 + d * 128) / 1e12
    assert none["tflops"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family,config_class,block_path", [
    ("qwen3_vl_moe", "Qwen3VLMoeConfig", "mlp"),  # the block returns [batch, seq, hidden]
    ("llama4", "Llama4Config", "feed_forward"),  # the block returns ([batch * seq, hidden], router logits)
])
def test_ttv_on_moe_layers_reads_the_moe_blocks_output(family, config_class, block_path):
    """TTV of the MLP (here an MoE block) before layer 2 picks the tokens a hand computation picks."""
    from prunekit.testing import LLAMA4_BROKEN, family_inputs, tiny_family_model

    if not hasattr(transformers, config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    model = tiny_family_model(family, num_layers=4, seed=2, dtype=torch.float64)
    inputs = family_inputs(model, family, batch=1, seed=1, sizes=[(32, 32)], dtype=torch.float64)
    block = getattr(model.model.language_model.layers[1] if family != "llama4"
                    else model.language_model.model.layers[1], block_path)
    assert "Moe" in type(block).__name__
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    try:
        with torch.no_grad():
            model(**inputs)
    except AttributeError as exc:
        if family == "llama4" and "image_outputs" in str(exc):
            pytest.skip(LLAMA4_BROKEN)
        raise
    finally:
        handle.remove()
    x = seen["x"][0]  # [seq, hidden]: the block's input
    y = seen["y"][0] if isinstance(seen["y"], tuple) else seen["y"]
    y = y.reshape(seen["x"].shape)[0]  # [seq, hidden]: its output
    ratio = y.norm(dim=-1) / x.norm(dim=-1)
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    score = ratio * torch.softmax(1 - cos, dim=0)  # [seq]
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    visual = inputs["input_ids"][0] == image_id
    n_keep = int(int(visual.sum()) * 0.5)
    order = torch.argsort(score.masked_fill(~visual, float("-inf")), descending=True)[:n_keep]
    recipe = {"name": "ttv-mlp", "criteria": {"ttv": {"type": "ttv", "modules": ["mlp"]}},
              "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        model(**inputs)
    assert torch.equal(pruner.last_report[0].kept[0], order.sort().values)
