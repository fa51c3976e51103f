"""Prune a LLaVA model's visual tokens during generate (a tiny random-weight model: no download).

Run: python examples/quickstart.py
"""

import torch

import prunekit
from prunekit.testing import llava_inputs, tiny_llava

model = tiny_llava()  # LlavaForConditionalGeneration: CLIP tower, projector, 16-layer Llama decoder
inputs = llava_inputs(batch=2, seed=0)  # two left-padded prompts with 36 image tokens each

with prunekit.apply(model, "transprune-high", ["schedule.stages.0.keep=0.75"]) as pruner:
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)

report = pruner.last_report
for stage in report.stages:
    print(f"from layer {stage.layer}: kept {stage.kept_counts.tolist()} visual tokens per sample")
print("tokens per decoder layer:", report.tokens_per_layer)
print("generated:", out[:, inputs["input_ids"].shape[1]:].tolist())
assert report.stages[0].kept.shape == (2, int(36 * 0.75))
assert torch.all(report.stages[-1].kept_counts == int(36 * 0.125))
