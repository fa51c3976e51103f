"""``prunekit bench``: prefill latency, decode speed, peak memory and FLOPs per recipe, in one run.

Every figure is measured in the same process, recipes interleaved within each repeat (repeat 1:
none, A, B; repeat 2: none, A, B; ...), so a load spike hits every recipe of one repeat rather than
all repeats of one recipe. The median of the repeats is reported with the spread (min and max), and
the ratio to no pruning is the median of the per-repeat ratios, so a user sees how noisy the machine was.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration

import prunekit
from prunekit.flops import DecoderDims, estimate, recipe_estimate
from prunekit.testing import LLAVA15_SHAPED, LlavaShape, llava_config, llava_inputs
from prunekit.compat import cache_of, with_cache

NO_PRUNING = "none"


@dataclass
class BenchRow:
    recipe: str
    prefill_ms: float  # median prefill latency
    prefill_ratio: float  # median over repeats of (prefill latency / no pruning's in the same repeat)
    decode_tokens_per_s: float  # median decode speed over new_tokens steps
    peak_mb: float  # peak tensor memory during the prefill
    kv_cache_mb: float  # KV-cache bytes after the prefill
    kept: list[int]  # visual tokens kept after each stage (sample 0)
    tflops: float  # analytic prefill TFLOPs, papers' convention (visual tokens)
    flops_ratio: float
    sequence_tflops: float  # whole sequence
    sequence_flops_ratio: float
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)
    prefill_ms_min: float = 0.0  # the spread of the repeats: fastest and slowest prefill
    prefill_ms_max: float = 0.0
    prefill_ratio_min: float = 0.0
    prefill_ratio_max: float = 0.0
    decode_tokens_per_s_min: float = 0.0
    decode_tokens_per_s_max: float = 0.0


def interleaved(recipes: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """The order in which :func:`run_bench` measures: every recipe once per repeat, repeat 0 the warm-up.

    ``[(0, none), (0, A), (0, B), (1, none), (1, A), (1, B), ...]``: a recipe's repeats are spread over
    the whole run, as in ``benchmarks/suite.py``, never measured back to back.
    """
    return [(repeat, name) for repeat in range(repeats + 1) for name in recipes]


def _pruner_for(model, name: str):
    """The pruner of ``name`` on ``model`` (a no-op context for ``none``)."""
    return nullcontext() if name == NO_PRUNING else prunekit.apply(model, name)


def build_model(shape: LlavaShape, dtype: torch.dtype, attn_implementation: str, device: str,
                seed: int = 0) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA of ``shape`` (no download, no disk)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(llava_config(shape), dtype=dtype,
                                                       attn_implementation=attn_implementation)
    return model.to(device).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _peak_memory(run, device: str) -> float:
    """Peak bytes of tensors alive during ``run()`` (CUDA allocator stats, or the torch profiler on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return float(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


@contextmanager
def _quiet_stderr():
    """Silence the profiler backend's start/stop lines, which it writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _measure(model, inputs: dict, new_tokens: int, device: str) -> tuple[float, float, Any]:
    """(prefill seconds, decode seconds for new_tokens greedy steps, cache after prefill)."""
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        out = model(**inputs, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - start
        cache, mask = cache_of(out), inputs["attention_mask"]
        kv = _kv_bytes(cache)
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        cache_kwargs = with_cache(model, cache)  # the same cache object, grown in place by every step
        start = time.perf_counter()
        for _ in range(new_tokens):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=next_id, attention_mask=mask, **cache_kwargs, use_cache=True)
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        decode = time.perf_counter() - start
    return prefill, decode, kv


def run_bench(
    recipes: Sequence[str] = (NO_PRUNING, "fastv", "transprune-high"),
    shape: LlavaShape = LLAVA15_SHAPED,
    repeats: int = 5,
    new_tokens: int = 16,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    progress: bool = True,
) -> list[BenchRow]:
    """Measure every recipe on one random-weight model, interleaved per repeat; the first recipe should be ``none``.

    Each row carries the median of ``repeats`` measured runs (after one warm-up run per recipe) and
    their spread (``*_min`` / ``*_max``); ``samples`` holds every measured value.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (one warm-up run is added), got {repeats}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    model = build_model(shape, dtype, attn_implementation, device)
    inputs = llava_inputs(shape, batch=batch, seed=0, dtype=dtype)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    n_text = int(inputs["attention_mask"][0].sum()) - shape.visual_tokens
    dims = DecoderDims.from_config(model.config)

    samples: dict[str, dict[str, list[float]]] = {r: {"prefill": [], "decode": []} for r in recipes}
    kept: dict[str, list[int]] = {}
    kv: dict[str, float] = {}
    order = interleaved(recipes, repeats)
    with tqdm(total=len(order), desc="prunekit bench", disable=not progress, unit="run") as bar:
        for repeat, name in order:  # repeat 0 warms up and is not counted
            with _pruner_for(model, name) as pruner:
                prefill, decode, kv_bytes = _measure(model, inputs, new_tokens, device)
                if repeat == 0:
                    kept[name] = [] if pruner is None else [int(s.kept_counts[0]) for s in pruner.last_report]
                    kv[name] = kv_bytes / 2**20
                else:
                    samples[name]["prefill"].append(prefill)
                    samples[name]["decode"].append(decode)
            bar.update(1)
    peaks = {}
    for name in recipes:
        with _pruner_for(model, name), torch.no_grad():
            peaks[name] = _peak_memory(lambda: model(**inputs, use_cache=True), device) / 2**20

    base = samples[recipes[0]]["prefill"]
    rows = []
    for name in recipes:
        if name == NO_PRUNING:
            flops = estimate([], dims, shape.visual_tokens, n_text)
        else:
            flops = recipe_estimate(prunekit.load_recipe(name), dims, shape.visual_tokens, n_text)
        prefill_ms = [t * 1e3 for t in samples[name]["prefill"]]
        ratios = [t / b for t, b in zip(samples[name]["prefill"], base)]  # each repeat against its own baseline
        speeds = [batch * new_tokens / t for t in samples[name]["decode"]]
        rows.append(BenchRow(
            recipe=name, prefill_ms=statistics.median(prefill_ms), prefill_ratio=statistics.median(ratios),
            decode_tokens_per_s=statistics.median(speeds), peak_mb=peaks[name], kv_cache_mb=kv[name],
            kept=kept[name], tflops=flops.visual_tflops, flops_ratio=flops.visual_ratio,
            sequence_tflops=flops.sequence_tflops, sequence_flops_ratio=flops.sequence_ratio,
            samples=samples[name],
            prefill_ms_min=min(prefill_ms), prefill_ms_max=max(prefill_ms),
            prefill_ratio_min=min(ratios), prefill_ratio_max=max(ratios),
            decode_tokens_per_s_min=min(speeds), decode_tokens_per_s_max=max(speeds),
        ))
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    """A Markdown table: medians, with the spread of the repeats as ``[min-max]``."""
    header = ["recipe", "prefill ms [min-max]", "x none [min-max]", "decode tok/s [min-max]", "peak MB", "KV MB",
              "kept/stage", "TFLOPs", "FLOPs x none", "seq FLOPs x none"]
    lines = [header]
    for r in rows:
        lines.append([
            r.recipe, f"{r.prefill_ms:.1f} [{r.prefill_ms_min:.1f}-{r.prefill_ms_max:.1f}]",
            f"{r.prefill_ratio:.3f} [{r.prefill_ratio_min:.3f}-{r.prefill_ratio_max:.3f}]",
            f"{r.decode_tokens_per_s:.1f} [{r.decode_tokens_per_s_min:.1f}-{r.decode_tokens_per_s_max:.1f}]",
            f"{r.peak_mb:.1f}", f"{r.kv_cache_mb:.2f}", "/".join(map(str, r.kept)) or "-",
            f"{r.tflops:.4f}", f"{r.flops_ratio:.3f}", f"{r.sequence_flops_ratio:.3f}",
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def to_json(rows: Sequence[BenchRow], **meta: Any) -> str:
    return json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2)
