"""prunekit's benchmark suite: scoring overhead, prefill time against FLOPs, memory, decode, batching.

    python benchmarks/suite.py [--out benchmarks/last-run.md] [--quick]

Every figure is a ratio measured in one process (pruned against unpruned, recipes interleaved
within each repeat, median of the repeats) on random-weight models shaped like the real ones with a
reduced width. Not a test: timings on a shared CPU are noisy, the ratios are what is compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import prunekit
from prunekit.attention import attention_rows, query_weights
from prunekit.bench import _kv_bytes, _peak_memory, build_model
from prunekit.flops import DecoderDims, recipe_estimate
from prunekit.testing import LLAVA15_SHAPED, llava_inputs
from prunekit.compat import cache_of

RECIPES = ("none", "fastv", "transprune-high", "pdrop", "random")


@dataclass
class Timing:
    total: list[float]
    decoder: list[float]
    overhead: list[float]


class DecoderTimer:
    """Wall time of the decoder stack alone (language model forward), via a pre- and a post-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.elapsed = 0.0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *args):
        self._start = time.perf_counter()

    def _post(self, *args):
        self.elapsed = time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _pruner(model, name: str, measure: bool):
    return nullcontext() if name == "none" else prunekit.apply(model, name, measure=measure)


def time_prefills(model, inputs: dict, recipes, repeats: int) -> dict[str, Timing]:
    """Median-ready prefill timings per recipe: total, decoder only, and the pruning work inside."""
    lm = model.model.language_model
    timer = DecoderTimer(lm)
    out = {name: Timing([], [], []) for name in recipes}
    try:
        for repeat in range(repeats + 1):
            for name in recipes:
                with _pruner(model, name, measure=True) as pruner, torch.no_grad():
                    start = time.perf_counter()
                    model(**inputs, use_cache=True)
                    total = time.perf_counter() - start
                if repeat == 0:
                    continue  # warm-up
                out[name].total.append(total)
                out[name].decoder.append(timer.elapsed)
                out[name].overhead.append(pruner.clock.total if pruner is not None else 0.0)
    finally:
        timer.remove()
    return out


def median(values) -> float:
    return statistics.median(values)


def prefill_table(title: str, model, inputs, recipes, repeats: int, n_visual: int, n_text: int) -> list[str]:
    timings = time_prefills(model, inputs, recipes, repeats)
    dims = DecoderDims.from_config(model.config)
    base_total, base_decoder = median(timings["none"].total), median(timings["none"].decoder)
    lines = [f"### {title}", "",
             "| recipe | prefill ms | decoder ms | decoder time x none | FLOPs x none (sequence) | time / FLOPs "
             "| pruning work (% of unpruned prefill) |",
             "|---|---|---|---|---|---|---|"]
    for name in recipes:
        t = timings[name]
        flops = 1.0 if name == "none" else recipe_estimate(prunekit.load_recipe(name), dims, n_visual,
                                                           n_text).sequence_ratio
        ratio = median(t.decoder) / base_decoder
        lines.append(f"| {name} | {median(t.total) * 1e3:.1f} | {median(t.decoder) * 1e3:.1f} | {ratio:.3f} | "
                     f"{flops:.3f} | {ratio / flops:.2f} | {100 * median(t.overhead) / base_total:.2f} |")
    return lines + [""]


def qwen_shaped(num_layers: int = 28, tokens_side: int = 110):
    """A Qwen2.5-VL-7B-shaped decoder (28 layers, GQA 4:1, MLP 5.3x), width 256, one large image."""
    import transformers as tf

    from prunekit.testing import family_config

    config = family_config("qwen2_5_vl", num_layers)
    text = config.text_config
    text.hidden_size, text.intermediate_size = 256, 1352
    text.num_attention_heads, text.num_key_value_heads = 8, 2
    text.head_dim = 32
    text.rope_parameters["mrope_section"] = [4, 6, 6]  # temporal, height, width halves of head_dim 32
    config.vision_config.out_hidden_size = 256
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config).eval()
    from prunekit.testing import family_inputs

    inputs = family_inputs(model, "qwen2_5_vl", batch=1, seed=0, sizes=[(tokens_side * 4, tokens_side * 4)])
    return model, inputs


def memory_section(model, inputs, recipes) -> list[str]:
    lines = ["### Memory (LLaVA-1.5-shaped, batch 1)", "",
             "| recipe | peak prefill MB | KV cache MB after prefill | predicted from kept counts MB | KV / predicted |",
             "|---|---|---|---|---|"]
    config = model.config.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize  # K and V, one layer
    for name in recipes:
        with _pruner(model, name, measure=False) as pruner, torch.no_grad():
            peak = _peak_memory(lambda: model(**inputs, use_cache=True), "cpu")
            out = model(**inputs, use_cache=True)
        kv = _kv_bytes(cache_of(out))
        tokens = [inputs["input_ids"].shape[1]] * config.num_hidden_layers if pruner is None \
            else pruner.last_report.tokens_per_layer
        predicted = sum(tokens) * per_token * inputs["input_ids"].shape[0]
        lines.append(f"| {name} | {peak / 2**20:.1f} | {kv / 2**20:.2f} | {predicted / 2**20:.2f} | "
                     f"{kv / predicted:.4f} |")
    return lines + [""]


def probe_memory_section(seq_lengths=(1024, 2048, 4096), queries: int = 16, heads: int = 8) -> list[str]:
    """Peak memory of the attention-rows probe against the full matrix eager attention would build."""
    lines = [f"### Attention-rows probe memory ({queries} instruction queries, {heads} heads, head_dim 32)", "",
             "| sequence | probe peak MB | eager attention matrix MB | probe / (queries x seq) bytes |",
             "|---|---|---|---|"]
    for n in seq_lengths:
        q = torch.randn(1, heads, n, 32)
        k = torch.randn(1, heads // 4, n, 32)
        selected = torch.zeros(1, n, dtype=torch.bool)
        selected[:, -queries:] = True
        weights = query_weights(selected)
        valid = torch.ones(1, n, dtype=torch.bool)
        peak = _peak_memory(lambda: attention_rows(q, k, 32 ** -0.5, weights, valid), "cpu")
        eager = heads * n * n * 4
        lines.append(f"| {n} | {peak / 2**20:.2f} | {eager / 2**20:.1f} | {peak / (queries * n):.1f} |")
    return lines + [""]


def decode_section(model, inputs, recipes, new_tokens: int, repeats: int) -> list[str]:
    from prunekit.bench import _measure

    lines = [f"### Decode ({new_tokens} new tokens, LLaVA-1.5-shaped, batch 1)", "",
             "| recipe | decode tokens/s | x none |", "|---|---|---|"]
    speeds = {name: [] for name in recipes}
    for _ in range(repeats):
        for name in recipes:
            with _pruner(model, name, measure=False):
                _, decode, _ = _measure(model, inputs, new_tokens, "cpu")
            speeds[name].append(new_tokens / decode)
    base = median(speeds["none"])
    for name in recipes:
        lines.append(f"| {name} | {median(speeds[name]):.1f} | {median(speeds[name]) / base:.3f} |")
    return lines + [""]


def batch_section(model, recipes, sizes=(1, 4, 8), new_tokens: int = 8, repeats: int = 3) -> list[str]:
    from prunekit.bench import _measure

    lines = [f"### Batches (left-padded prompts, prefill + {new_tokens} decode steps, LLaVA-1.5-shaped)", "",
             "| batch | " + " | ".join(f"{r} samples/s" for r in recipes) + " | slowest pruned x none |",
             "|---|" + "---|" * (len(recipes) + 1)]
    for size in sizes:
        inputs = llava_inputs(LLAVA15_SHAPED, batch=size, seed=size)
        rates = {name: [] for name in recipes}
        for _ in range(repeats):
            for name in recipes:
                with _pruner(model, name, measure=False):
                    prefill, decode, _ = _measure(model, inputs, new_tokens, "cpu")
                rates[name].append(size / (prefill + decode))
        values = {name: median(v) for name, v in rates.items()}
        worst = min(values[n] for n in recipes if n != "none") / values["none"]
        lines.append(f"| {size} | " + " | ".join(f"{values[n]:.2f}" for n in recipes) + f" | {worst:.3f} |")
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/last-run.md"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sweeps (a smoke run)")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    command = "python benchmarks/suite.py" + (" --quick" if args.quick else f" --repeats {args.repeats}")
    lines = ["## Measured by the suite", "", f"Command: `{command}`; {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, device cpu.", ""]
    llava = build_model(LLAVA15_SHAPED, torch.float32, "sdpa", "cpu")
    inputs = llava_inputs(LLAVA15_SHAPED, batch=1, seed=0)
    n_text = int(inputs["attention_mask"].sum()) - LLAVA15_SHAPED.visual_tokens
    lines += prefill_table("Prefill and pruning work, LLaVA-1.5-shaped (32 layers, 576 visual tokens, width 256)",
                           llava, inputs, RECIPES, repeats, LLAVA15_SHAPED.visual_tokens, n_text)
    wide = dataclasses.replace(LLAVA15_SHAPED, hidden_size=1024, intermediate_size=2752, num_heads=16,
                               num_kv_heads=16)  # a quarter of LLaVA-1.5-7B's width: per-op overheads weigh less
    lines += prefill_table("Prefill and pruning work, LLaVA-1.5-shaped at width 1024 (32 layers, 576 visual tokens)",
                           build_model(wide, torch.float32, "sdpa", "cpu"), llava_inputs(wide, batch=1, seed=0),
                           ("none", "fastv", "transprune-high"), max(1, repeats // 2), wide.visual_tokens, n_text)
    qwen, qwen_inputs = qwen_shaped(tokens_side=60 if args.quick else 110)
    n_visual = int((qwen_inputs["input_ids"] == qwen.config.image_token_id).sum())
    n_text = qwen_inputs["input_ids"].shape[1] - n_visual
    lines += prefill_table(f"Prefill, Qwen2.5-VL-shaped (28 layers, GQA, {n_visual} visual tokens, width 256)",
                           qwen, qwen_inputs, ("none", "fastv", "transprune-high"), repeats, n_visual, n_text)
    del qwen
    lines += memory_section(llava, inputs, RECIPES)
    lines += probe_memory_section((512, 1024) if args.quick else (1024, 2048, 4096))
    lines += decode_section(llava, inputs, RECIPES, 8 if args.quick else 64, 3 * repeats)  # decode is the noisiest
    lines += batch_section(llava, ("none", "fastv", "transprune-high"), (1, 2) if args.quick else (1, 4, 8),
                           repeats=1 if args.quick else 3)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
