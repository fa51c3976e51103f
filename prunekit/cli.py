"""The ``prunekit`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence

import torch

from prunekit.errors import PrunekitError

LLAVA15_7B_DIMS = (32, 4096, 11008)  # layers, hidden, MLP width of LLaVA-1.5-7B's decoder
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def best_attention(device: str) -> str:
    """flash_attention_2 where the optional flash-attn package imports and the device is CUDA, else sdpa."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _cmd_bench(args: argparse.Namespace) -> int:
    from prunekit.bench import format_table, run_bench, to_json
    from prunekit.testing import LLAVA15_SHAPED

    recipes = ["none", *[r for r in args.recipes if r != "none"]]
    if args.attn == "auto":
        args.attn = best_attention(args.device)
    rows = run_bench(recipes, LLAVA15_SHAPED, repeats=args.repeats, new_tokens=args.new_tokens, batch=args.batch,
                     dtype=DTYPES[args.dtype], attn_implementation=args.attn, device=args.device,
                     progress=not args.json)
    meta = {"model": "LLaVA-1.5-shaped, random weights", "layers": LLAVA15_SHAPED.num_layers,
            "hidden": LLAVA15_SHAPED.hidden_size, "visual_tokens": LLAVA15_SHAPED.visual_tokens,
            "batch": args.batch, "repeats": args.repeats, "new_tokens": args.new_tokens, "dtype": args.dtype,
            "attn": args.attn, "device": args.device, "threads": torch.get_num_threads()}
    if args.json:
        print(to_json(rows, **meta))
    else:
        print(f"LLaVA-1.5-shaped model, random weights: {meta['layers']} layers, hidden {meta['hidden']}, "
              f"{meta['visual_tokens']} visual tokens, batch {args.batch}, {args.dtype}, {args.attn} on "
              f"{args.device} ({meta['threads']} threads); median of {args.repeats} runs")
        print(format_table(rows))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from prunekit.flops import DecoderDims, recipe_estimate
    from prunekit.recipe import builtin_recipe_names, load_recipe

    dims = DecoderDims(*LLAVA15_7B_DIMS)
    rows = []
    for name in builtin_recipe_names():
        recipe = load_recipe(name)
        flops = recipe_estimate(recipe, dims, 576, 0)
        rows.append({"name": name, "description": recipe.description, "tflops": round(flops.visual_tflops, 3),
                     "flops_ratio": round(flops.visual_ratio, 3)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'recipe'.ljust(width)}  TFLOPs  ratio  (LLaVA-1.5-7B, 576 visual tokens)  description")
    for r in rows:
        print(f"{r['name'].ljust(width)}  {r['tflops']:6.2f}  {r['flops_ratio']:5.3f}  {r['description']}")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from prunekit.flops import DecoderDims, estimate, recipe_estimate
    from prunekit.recipe import load_recipe

    config = AutoConfig.from_pretrained(args.model)
    dims = DecoderDims.from_config(config)
    out = []
    for name in ["none", *args.recipe]:
        if name == "none":
            flops = estimate([], dims, args.visual_tokens, args.text_tokens)
        else:
            flops = recipe_estimate(load_recipe(name), dims, args.visual_tokens, args.text_tokens)
        out.append({"recipe": name, **flops.as_dict()})
    if args.json:
        print(json.dumps({"model": args.model, "visual_tokens": args.visual_tokens,
                          "text_tokens": args.text_tokens, "recipes": out}, indent=2))
        return 0
    print(f"{args.model}: {dims.num_layers} layers, hidden {dims.hidden_size}, MLP {dims.intermediate_size}; "
          f"{args.visual_tokens} visual + {args.text_tokens} text tokens")
    print(f"{'recipe':<20} {'TFLOPs':>8} {'ratio':>7} {'seq TFLOPs':>11} {'seq ratio':>10}")
    for row in out:
        print(f"{row['recipe']:<20} {row['tflops']:>8.3f} {row['ratio']:>7.3f} "
              f"{row['sequence_tflops']:>11.3f} {row['sequence_ratio']:>10.3f}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from prunekit.plugins import KINDS, PLURALS, get_registry

    registry = get_registry()
    rows = []
    for kind in KINDS:
        for name, claims in sorted(registry.entries(kind).items()):
            for entry in claims:
                rows.append({"kind": kind, "name": name, "distribution": entry.distribution, "plugin": entry.plugin,
                             "description": entry.description})
    problems = registry.all_problems()
    if args.json:
        print(json.dumps({"plugins": rows, "problems": problems}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for kind in KINDS:
        print(f"{PLURALS[kind]}:")
        for r in (r for r in rows if r["kind"] == kind):
            print(f"  {r['name'].ljust(width)}  [{r['distribution']}:{r['plugin']}]  {r['description']}")
    if problems:
        print("problems:")
        for problem in problems:
            print(f"  {problem}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from prunekit.doctor import build_skeleton, diagnose, format_report

    report = diagnose(build_skeleton(args.model))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["adapter"] is not None and "error" not in report else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from prunekit.run import describe, run_model, run_toy

    if args.model is None:
        if args.image or args.prompt:
            raise PrunekitError("--image and --prompt go with --model (without --model the built-in toy model "
                                "answers a generated question)")
        result = run_toy(args.recipe, args.override, seed=args.seed, out=args.out)
    else:
        if not (args.image and args.prompt):
            raise PrunekitError("--model needs --image PATH and --prompt TEXT")
        result = run_model(args.model, args.image, args.prompt, args.recipe, args.override, args.max_new_tokens,
                           args.out)
    print(describe(result, args.recipe))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from prunekit.recipe import builtin_recipe_names
    from prunekit.toy.evaluate import format_table, plot, run_eval, to_json
    from prunekit.toy.model import load_toy

    model, processor = load_toy(args.weights)
    recipes = args.recipes or builtin_recipe_names()
    result = run_eval(model, processor, recipes, n=args.n, seed=args.seed, sweep=args.sweep, ratios=args.ratios,
                      batch_size=args.batch_size, progress=not args.json)
    if result is None:  # data-parallel: rank 0 reports
        return 0
    plot(result, args.plot)
    if args.json:
        print(to_json(result))
    else:
        print(f"toy task: {args.n} questions (seed {args.seed}); FLOPs in the papers' convention on the toy model")
        print(format_table(result["rows"]))
        print(f"keep-ratio sweep ({', '.join(f'{r:g}' for r in args.ratios)} kept at the last stage):")
        print(format_table(result["sweep"]))
        print(f"plot: {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Training-free visual token pruning for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="prefill latency, decode speed, memory and FLOPs per recipe")
    bench.add_argument("--recipes", nargs="+", default=["fastv", "transprune-high"],
                       help="recipes to compare with no pruning (default: fastv transprune-high)")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--new-tokens", type=int, default=16)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--attn", default="auto",
                       help="attention implementation: auto (flash_attention_2 when flash-attn imports and the "
                            "device is CUDA, else sdpa), sdpa, eager, flash_attention_2")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(func=_cmd_bench)

    recipes = sub.add_parser("recipes", help="list built-in recipes with their FLOPs ratio on LLaVA-1.5-7B")
    recipes.add_argument("--json", action="store_true")
    recipes.set_defaults(func=_cmd_recipes)

    flops = sub.add_parser("flops", help="analytic prefill TFLOPs of recipes for a model's config.json")
    flops.add_argument("model", help="model directory or hub id (only config.json is read)")
    flops.add_argument("--recipe", nargs="+", default=[], help="recipe names or YAML paths")
    flops.add_argument("--visual-tokens", type=int, default=576)
    flops.add_argument("--text-tokens", type=int, default=0)
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(func=_cmd_flops)

    run = sub.add_parser("run", help="answer a question with and without pruning and draw the kept tokens")
    run.add_argument("--model", help="a model folder or hub id (default: the built-in toy LLaVA)")
    run.add_argument("--image", help="an image file (with --model)")
    run.add_argument("--prompt", help="the question (with --model)")
    run.add_argument("--recipe", default="transprune-high")
    run.add_argument("--override", nargs="*", default=[], help="dotted recipe overrides")
    run.add_argument("--seed", type=int, default=0, help="which generated question (toy model)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--out", default="prunekit_run.png", help="the PNG of kept tokens per stage")
    run.set_defaults(func=_cmd_run)

    evaluate = sub.add_parser("eval", help="accuracy, retention, FLOPs and relevance recall per recipe (toy task)")
    evaluate.add_argument("--recipes", nargs="+", help="recipes to compare (default: every built-in)")
    evaluate.add_argument("-n", type=int, default=500, help="questions")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--sweep", nargs="*", default=["random", "fastv", "pdrop", "l2norm", "transprune-high"],
                          help="recipes whose keep ratios are swept")
    evaluate.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.25, 0.125, 0.0625],
                          help="last-stage keep fractions of the sweep")
    evaluate.add_argument("--plot", default="prunekit_eval.png", help="PNG of accuracy against FLOPs")
    evaluate.add_argument("--batch-size", type=int, default=50, help="questions per forward pass")
    evaluate.add_argument("--weights", help="a toy model folder (default: the one in the package)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    plugins = sub.add_parser("plugins", help="every registered criterion, combiner, merger, schedule and adapter")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=_cmd_plugins)

    doctor = sub.add_parser("doctor", help="which adapter fits a model and which probes it supports (no weights)")
    doctor.add_argument("model", help="model directory or hub id (only config.json is read)")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrunekitError as exc:
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
