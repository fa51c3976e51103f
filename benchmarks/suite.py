"""prunekit's benchmark suite: scoring overhead, prefill time against FLOPs, memory, decode, batching.

    python benchmarks/suite.py [--out benchmarks/last-run.md] [--quick] [--decode-only]

Every figure is a ratio measured in one process (pruned against unpruned, recipes interleaved
within each repeat, median of the repeats) on random-weight models shaped like the real ones with a
reduced width. Not a test: timings on a shared CPU are noisy, the ratios are what is compared.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import prunekit
from prunekit.attention import attention_rows, query_weights
from prunekit.bench import _kv_bytes, _peak_memory, build_model
from prunekit.flops import DecoderDims, prefill_flops, recipe_estimate
from prunekit.testing import LLAVA15_SHAPED, llava_inputs
from prunekit.compat import cache_of, with_cache

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


def _pruner(model, name: Any, measure: bool):
    """The pruner of a recipe (a name, dict or loaded recipe); ``"none"`` or None: no pruner."""
    return nullcontext() if name is None or name == "none" else prunekit.apply(model, name, measure=measure)


def time_prefills(model, inputs: dict, recipes, repeats: int, sources: dict[str, Any] | None = None
                  ) -> dict[str, Timing]:
    """Median-ready prefill timings per recipe: total, decoder only, and the pruning work inside. ``sources``: the
    recipe each label runs (a name, dict or loaded recipe; None: no pruning), when labels are not recipe names."""
    lm = model.model.language_model
    timer = DecoderTimer(lm)
    out = {name: Timing([], [], []) for name in recipes}
    try:
        for repeat in range(repeats + 1):
            for name in recipes:
                with _pruner(model, (sources or {}).get(name, name), measure=True) as pruner, torch.no_grad():
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


def vision_stage_table(title: str, model, inputs: dict, recipes, repeats: int, n_visual: int) -> list[str]:
    """A vision-stage table: per recipe where its first stage runs, the visual tokens it keeps, prefill and decoder
    time (and their ratios to none), the pruning work as a share of the unpruned prefill, and the analytic decoder
    TFLOPs from the report's tokens per layer."""
    dims = DecoderDims.from_config(model.config)
    timings = time_prefills(model, inputs, recipes, repeats)
    base = statistics.median(timings["none"].total)
    base_decoder = statistics.median(timings["none"].decoder)
    lines = [title, "", "| recipe | where | kept visual | prefill ms | x none | decoder ms | x none | pruning work (% of "
             "unpruned prefill) | decoder TFLOPs | x none |", "|---|---|---|---|---|---|---|---|---|---|"]
    base_flops = None
    for name in recipes:
        with _pruner(model, name, measure=False) as pruner, torch.no_grad():
            model(**inputs, use_cache=True)
            report = pruner.last_report if pruner is not None else None
        length = inputs["input_ids"].shape[1]
        flops = prefill_flops([length] * dims.num_layers if report is None else report.tokens_per_layer, dims)
        base_flops = base_flops or flops
        kept = n_visual if report is None else int(report[0].kept_counts[0] + report[0].merged_counts[0])
        where = "-" if report is None else report[0].where
        total, decoder = statistics.median(timings[name].total), statistics.median(timings[name].decoder)
        work = statistics.median(timings[name].overhead)
        lines.append(f"| {name} | {where} | {kept} | {total * 1e3:.0f} | {total / base:.3f} | {decoder * 1e3:.0f} | "
                     f"{decoder / base_decoder:.3f} | {100 * work / base:.2f} | {flops / 1e12:.4f} | "
                     f"{flops / base_flops:.3f} |")
    return lines + [""]


def table_main(doc: str, run, options: dict[str, tuple[type, Any, str]], argv: list[str] | None = None) -> int:
    """The command line of a one-table benchmark: ``options`` (``--name: (type, default, help)``), ``--repeats``
    and ``--out``; ``run(**options, repeats=...)`` returns the table's lines, printed (and written to ``--out``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, (kind, default, text) in options.items():
        parser.add_argument(f"--{name}", type=kind, default=default, help=text)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    torch.set_num_threads(1)
    text = "\n".join(run(**args))
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return 0


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


KEEP_ALL = {  # hooks only: every stage keeps every visual token, so the cache and the answer are the unpruned ones
    "fastv": ["schedule.stages.0.keep=1.0"],
    "transprune-high": [f"schedule.stages.{i}.keep=1.0" for i in range(3)],
}


@dataclass
class DecodeRun:
    """Per-step figures of one label in an interleaved decode run."""

    step: list[float]  # seconds per decode step
    hooks: list[float]  # seconds in prunekit's hooks per step (the pruner's clock); zeros without a pruner
    build: list[float]  # of which building each stage's inputs (the adapter's stage_kwargs)
    kv_bytes: int  # KV cache after the prefill
    kv_tokens: float  # KV tokens per layer and sample after the prefill (mean over layers)


def _twin(model: torch.nn.Module) -> torch.nn.Module:
    """Another model object sharing ``model``'s parameters, so that each recipe holds its own pruner."""
    return copy.deepcopy(model, {id(p): p for p in model.parameters()})


def interleaved_decode(model, runs: dict[str, tuple[str | None, list[str], dict]], new_tokens: int,
                       warmup: int = 2) -> dict[str, DecodeRun]:
    """Greedy decode steps of every run interleaved step by step (the order rotates each step).

    ``runs``: label -> (recipe or None for no pruning, overrides, inputs). Each label gets its own
    model object (parameters shared) and pruner, prefills once, then takes ``warmup + new_tokens``
    steps; the first ``warmup`` are not counted. A load spike thus hits every label of one step.
    """
    labels = list(runs)
    models = {label: model if i == 0 else _twin(model) for i, label in enumerate(labels)}
    pruners, state, out = {}, {}, {}
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        with torch.no_grad():
            for label, (recipe, overrides, inputs) in runs.items():
                m = models[label]
                pruners[label] = None if recipe is None else prunekit.apply(m, recipe, overrides, measure=True)
                prefill = m(**inputs, use_cache=True)
                cache = cache_of(prefill)
                kv = _kv_bytes(cache)
                per_token = (2 * config.num_key_value_heads * head_dim * m.dtype.itemsize
                             * config.num_hidden_layers * inputs["input_ids"].shape[0])
                state[label] = [inputs["attention_mask"], prefill.logits[:, -1].argmax(-1, keepdim=True),
                                with_cache(m, cache)]
                out[label] = DecodeRun([], [], [], kv, kv / per_token)
            for step in range(warmup + new_tokens):
                for label in labels[step % len(labels):] + labels[:step % len(labels)]:
                    mask, next_id, cache_kwargs = state[label]
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    # without padding no mask, as generate's M-RoPE positions need (a mask makes Qwen2.5-VL
                    # recount positions over the whole sequence)
                    mask_kwargs = {"attention_mask": mask} if bool((mask == 0).any()) else {}
                    clock = pruners[label].clock if pruners[label] is not None else None
                    hooks_before = clock.decode_seconds if clock is not None else 0.0
                    build_before = clock.decode_build_seconds if clock is not None else 0.0
                    start = time.perf_counter()
                    logits = models[label](input_ids=next_id, **mask_kwargs, **cache_kwargs, use_cache=True).logits
                    elapsed = time.perf_counter() - start
                    state[label][:2] = [mask, logits[:, -1].argmax(-1, keepdim=True)]
                    if step >= warmup:
                        out[label].step.append(elapsed)
                        out[label].hooks.append(clock.decode_seconds - hooks_before if clock is not None else 0.0)
                        out[label].build.append(clock.decode_build_seconds - build_before if clock is not None
                                                else 0.0)
    finally:
        for pruner in pruners.values():
            if pruner is not None:
                pruner.remove()
    return out


def _ratio(run: DecodeRun, base: DecodeRun) -> list[float]:
    """Per-step time ratios against ``base`` (step k of the same interleaved round)."""
    return [t / b for t, b in zip(run.step, base.step)]


def decode_overhead_table(title: str, model, inputs, new_tokens: int, target: float) -> tuple[list[str], str]:
    """Decode steps at batch 1: the hooks' time per step against an unpruned step, pruned and hooks-only.

    Returns the table and the target's verdict (the worst hooks share of fastv and transprune-high).
    """
    runs: dict[str, tuple[str | None, list[str], dict]] = {"none": (None, [], inputs)}
    for name in ("fastv", "transprune-high"):
        runs[name] = (name, [], inputs)
        runs[f"{name}, keep 1.0 (hooks only)"] = (name, KEEP_ALL[name], inputs)
    result = interleaved_decode(model, runs, new_tokens)
    base_step = median(result["none"].step)
    lines = [f"### {title}", "",
             f"{new_tokens} greedy decode steps after the prefill, batch 1, labels interleaved step by step; medians "
             "over the steps.", "",
             "| recipe | ms per decode step | x none [quartiles] | hooks ms per step (clock) | hooks % of an unpruned "
             "step | of which building stage inputs % |", "|---|---|---|---|---|---|"]
    worst = 0.0
    for label, run in result.items():
        ratios = _ratio(run, result["none"])
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        share = 100 * median(run.hooks) / base_step
        if label != "none":
            worst = max(worst, share)
        lines.append(f"| {label} | {median(run.step) * 1e3:.2f} | {median(ratios):.3f} [{q1:.3f}-{q3:.3f}] | "
                     f"{median(run.hooks) * 1e3:.3f} | {share:.2f} | {100 * median(run.build) / base_step:.2f} |")
    verdict = (f"{title.split(',')[0]}: worst {worst:.2f}% (target <= {target:g}%): "
               + ("met" if worst <= target else f"missed by {worst - target:.2f} points"))
    return lines + ["", f"Verdict: {verdict}.", ""], verdict


def kv_heavy_section(images: int = 3, batch: int = 8, new_tokens: int = 64) -> tuple[list[str], str]:
    """Decode where the KV cache dominates: LLaVA-1.5-shaped, several images per prompt, batch 8.

    The prediction: an unpruned step costs ``a + b * kv`` (kv: KV tokens per layer and sample). ``b``
    comes from a second unpruned run with one image per prompt, interleaved with the others, so
    ``b * kv`` is the attention share of a step (attention over the cache and the cache update);
    a pruned step is predicted at ``a + b * kv_pruned``, the speed-up ``(a + b * kv) / (a + b * kv_pruned)``.
    """
    model = build_model(LLAVA15_SHAPED, torch.float32, "sdpa", "cpu")
    heavy = llava_inputs(LLAVA15_SHAPED, images=images, batch=batch, seed=3)
    light = llava_inputs(LLAVA15_SHAPED, images=1, batch=batch, seed=3)
    labels = ("none", "fastv", "transprune-high")
    runs = {name: (None if name == "none" else name, [], heavy) for name in labels}
    runs["none, 1 image"] = (None, [], light)
    result = interleaved_decode(model, runs, new_tokens)
    base, small = result["none"], result["none, 1 image"]
    slope = (median(base.step) - median(small.step)) / (base.kv_tokens - small.kv_tokens)  # s per KV token
    fixed = median(base.step) - slope * base.kv_tokens
    share = slope * base.kv_tokens / median(base.step)
    lines = [f"### KV-heavy decode (LLaVA-1.5-shaped, {images} images per prompt, batch {batch}, {new_tokens} new "
             "tokens)", "",
             f"Prompts of {base.kv_tokens:.0f} tokens ({images * LLAVA15_SHAPED.visual_tokens} visual); steps interleaved "
             f"across recipes; medians over the steps. Attention share of an unpruned step: {100 * share:.1f}% "
             f"(step = {fixed * 1e3:.1f} ms + {slope * 1e6:.2f} us per KV token, fitted against the 1-image run).", "",
             "| recipe | KV tokens per layer | KV bytes x none | decode tokens/s | x none [quartiles] | predicted x none "
             "| measured / predicted gain |",
             "|---|---|---|---|---|---|---|"]
    verdict = ""
    for label in (*labels, "none, 1 image"):
        run = result[label]
        ratios = [b / t for t, b in zip(run.step, base.step)]  # speed against none in the same round
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        predicted = median(base.step) / (fixed + slope * run.kv_tokens)
        gain = (median(ratios) - 1) / (predicted - 1) if abs(predicted - 1) > 1e-9 else float("nan")
        lines.append(f"| {label} | {run.kv_tokens:.0f} | {run.kv_bytes / base.kv_bytes:.3f} | "
                     f"{batch / median(run.step):.1f} | {median(ratios):.3f} [{q1:.3f}-{q3:.3f}] | {predicted:.3f} | "
                     + ("-" if label == "none" else f"{gain:.2f}") + " |")
        if label == "transprune-high":
            verdict = (f"transprune-high decodes {median(ratios):.3f}x none against a predicted {predicted:.3f}x: "
                       f"{gain:.2f} of the predicted gain (target >= 0.5): "
                       + ("met" if gain >= 0.5 else f"missed by {0.5 - gain:.2f}"))
    return lines + ["", f"Verdict: {verdict}.", ""], verdict


def decode_sections(quick: bool) -> list[str]:
    """The decode rows: hook overhead per step (three models) and the KV-heavy decode."""
    steps = 8 if quick else 48
    lines, verdicts = [], []
    wide = dataclasses.replace(LLAVA15_SHAPED, hidden_size=1024, intermediate_size=2752, num_heads=16,
                               num_kv_heads=16)
    for title, shape, target in (
        ("LLaVA-1.5-shaped width 256, decode hook overhead (32 layers, 576 visual tokens)", LLAVA15_SHAPED, 2.0),
        ("LLaVA-1.5-shaped width 1024, decode hook overhead (32 layers, 576 visual tokens)", wide, 1.0),
    ):
        table, verdict = decode_overhead_table(title, build_model(shape, torch.float32, "sdpa", "cpu"),
                                               llava_inputs(shape, batch=1, seed=0), steps, target)
        lines, verdicts = lines + table, verdicts + [verdict]
    qwen, qwen_inputs = qwen_shaped(tokens_side=60 if quick else 110)
    n_visual = int((qwen_inputs["input_ids"] == qwen.config.image_token_id).sum())
    table, verdict = decode_overhead_table(f"Qwen2.5-VL-shaped, decode hook overhead (28 layers, GQA, {n_visual} "
                                           "visual tokens, width 256)", qwen, qwen_inputs, steps, 1.0)
    lines, verdicts = lines + table, verdicts + [verdict]
    del qwen
    table, verdict = kv_heavy_section(images=2 if quick else 3, batch=2 if quick else 8,
                                      new_tokens=8 if quick else 64)
    return lines + table + ["Decode verdicts:", ""] + [f"- {v}" for v in verdicts + [verdict]] + [""]


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
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decode rows: hook overhead per step and the KV-heavy decode")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    command = "python benchmarks/suite.py" + (" --quick" if args.quick else "") + (
        " --decode-only" if args.decode_only else ("" if args.quick else f" --repeats {args.repeats}"))
    lines = ["## Measured by the suite", "", f"Command: `{command}`; {torch.get_num_threads()} torch threads, "
             f"torch {torch.__version__}, device cpu.", ""]
    if args.decode_only:
        lines += decode_sections(args.quick)
        args.out.write_text("\n".join(lines))
        print("\n".join(lines))
        return 0
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
    lines += decode_sections(args.quick)
    lines += batch_section(llava, ("none", "fastv", "transprune-high"), (1, 2) if args.quick else (1, 4, 8),
                           repeats=1 if args.quick else 3)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
