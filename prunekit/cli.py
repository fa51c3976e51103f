"""The ``prunekit`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence

import torch

from prunekit.cli_checks import (  # noqa: F401 (the checks are part of the command line's interface)
    ATTENTION,
    DTYPES,
    CommandLineError,
    best_attention,
    check_fits_depth,
    check_image,
    check_model_source,
    check_writable,
    loading,
)
from prunekit.cli_checks import device_name as _device
from prunekit.cli_checks import int_at_least as _int_at_least
from prunekit.cli_checks import keep_fraction as _keep_fraction
from prunekit.errors import PrunekitError
from prunekit.toy import DEFAULT_TOY as DEFAULT_TOY_NAME
from prunekit.toy import TOYS

LLAVA15_7B_DIMS = (32, 4096, 11008)  # layers, hidden, MLP width of LLaVA-1.5-7B's decoder
class _Parser(argparse.ArgumentParser):
    """argparse, but its errors reach :func:`main`, which prints them (and a JSON object under ``--json``)."""

    def error(self, message: str):  # type: ignore[override]
        raise CommandLineError(message, usage=self.format_usage())


def _cmd_bench(args: argparse.Namespace) -> int:
    from prunekit.bench import format_table, run_bench, to_json
    from prunekit.recipe import load_recipe
    from prunekit.testing import LLAVA15_SHAPED

    recipes = ["none", *[r for r in args.recipes if r != "none"]]
    for name in recipes[1:]:
        load_recipe(name)  # an unknown or broken recipe fails before the model is built
    if args.attn == "flash_attention_2" and not (args.device.startswith("cuda")
                                                 and importlib.util.find_spec("flash_attn") is not None):
        raise CommandLineError("argument --attn: flash_attention_2 needs the flash-attn package and a CUDA device; "
                               "valid here: auto, sdpa, eager")
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
              f"{args.device} ({meta['threads']} threads); median [min-max] of {args.repeats} runs, "
              f"recipes interleaved per repeat")
        print(format_table(rows))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from prunekit.flops import DecoderDims, recipe_estimate
    from prunekit.recipe import load_recipe, recipe_files

    dims = DecoderDims(*LLAVA15_7B_DIMS)
    rows = []
    for name, path in sorted(recipe_files().items()):
        recipe = load_recipe(name)
        flops = recipe_estimate(recipe, dims, 576, 0)
        rows.append({"name": name, "description": recipe.description, "tflops": round(flops.visual_tflops, 3),
                     "flops_ratio": round(flops.visual_ratio, 3), "upper_bound": flops.bound, "file": str(path)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'recipe'.ljust(width)}  TFLOPs  ratio  (LLaVA-1.5-7B, 576 visual tokens)  description")
    for r in rows:
        bound = "<=" if r["upper_bound"] else "  "
        print(f"{r['name'].ljust(width)}{bound}{r['tflops']:6.2f}  {r['flops_ratio']:5.3f}  {r['description']}")
    if any(r["upper_bound"] for r in rows):
        print("<=: an upper bound; the recipe's counts depend on the image and question (a run's report has them)")
    return 0


def _cmd_flops(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from prunekit.flops import DecoderDims, estimate, recipe_estimate
    from prunekit.recipe import load_recipe

    source = check_model_source(args.model)
    with loading(f"the config of {args.model!r}"):
        config = AutoConfig.from_pretrained(source)
        dims = DecoderDims.from_config(config)
    model_name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    out = []
    for name in ["none", *args.recipe]:
        if name == "none":
            flops = estimate([], dims, args.visual_tokens, args.text_tokens)
        else:
            recipe = load_recipe(name)
            check_fits_depth(recipe, dims.num_layers, model_name)  # as apply() would refuse it
            flops = recipe_estimate(recipe, dims, args.visual_tokens, args.text_tokens, args.frames)
        out.append({"recipe": name, **flops.as_dict()})
    if args.json:
        print(json.dumps({"model": args.model, "visual_tokens": args.visual_tokens, "frames": args.frames,
                          "text_tokens": args.text_tokens, "recipes": out}, indent=2))
        return 0
    clip = f" (one clip of {args.frames} frames)" if args.frames else ""
    widths = set(dims.layer_widths or (dims.intermediate_size,))
    mlp = widths.pop() if len(widths) == 1 else f"{min(widths)}-{max(widths)} (per layer)"
    print(f"{args.model}: {dims.num_layers} layers, hidden {dims.hidden_size}, MLP {mlp}; "
          f"{args.visual_tokens} visual{clip} + {args.text_tokens} text tokens")
    print(f"{'recipe':<20} {'TFLOPs':>8} {'ratio':>7} {'seq TFLOPs':>11} {'seq ratio':>10}")
    for row in out:
        bound = " (upper bound: counts depend on the input)" if row["upper_bound"] else ""
        print(f"{row['recipe']:<20} {row['tflops']:>8.3f} {row['ratio']:>7.3f} "
              f"{row['sequence_tflops']:>11.3f} {row['sequence_ratio']:>10.3f}{bound}")
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
    folders = [str(folder) for folder in registry.recipe_dirs()]  # where recipe names are looked up, in order
    if args.json:
        print(json.dumps({"plugins": rows, "recipe_dirs": folders, "problems": problems}, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for kind in KINDS:
        print(f"{PLURALS[kind]}:")
        for r in (r for r in rows if r["kind"] == kind):
            print(f"  {r['name'].ljust(width)}  [{r['distribution']}:{r['plugin']}]  {r['description']}")
    print("recipe folders (the first holding a name wins):")
    for folder in folders:
        print(f"  {folder}")
    if problems:
        print("problems:")
        for problem in problems:
            print(f"  {problem}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from prunekit.doctor import build_skeleton, diagnose, format_report

    source = check_model_source(args.model)
    with loading(f"the config of {args.model!r}"):
        skeleton = build_skeleton(source)
    report = diagnose(skeleton)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["adapter"] is not None and "error" not in report else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from prunekit.run import describe, run_model, run_toy

    if args.model is None:
        if args.image or args.prompt:
            raise PrunekitError("--image and --prompt go with --model (without --model the built-in toy model "
                                "answers a generated question)")
        check_writable(args.out, "--out")
        result = run_toy(args.recipe, args.override, seed=args.seed, out=args.out, toy=args.toy)
    else:
        if not (args.image and args.prompt):
            raise PrunekitError("--model needs --image PATH and --prompt TEXT")
        if args.toy is not None:
            raise PrunekitError("--toy picks the built-in toy model; it does not go with --model")
        source = check_model_source(args.model)
        check_image(args.image)
        check_writable(args.out, "--out")
        result = run_model(source, args.image, args.prompt, args.recipe, args.override, args.max_new_tokens,
                           args.out)
    print(describe(result, args.recipe))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from prunekit.recipe import builtin_recipe_names, load_recipe
    from prunekit.toy import DEFAULT_TOY, toy_parts
    from prunekit.toy.evaluate import (
        DEFAULT_SWEEP,
        format_comparisons,
        format_table,
        plot,
        run_eval,
        split_names,
        to_json,
    )

    task, toy_model = toy_parts(args.toy)
    check_writable(args.plot, "--plot")
    args.recipes, args.sweep = split_names(args.recipes), split_names(args.sweep)
    for name in [*(args.recipes or []), *(args.sweep or [])]:
        if name != "none":
            load_recipe(name)  # an unknown or broken recipe fails before the model loads
    if args.weights is not None:
        check_model_source(args.weights, "--weights")
    with loading(f"the {args.toy or DEFAULT_TOY!r} toy model from {args.weights or 'the package'!r}"):
        model, processor = toy_model.load_toy(args.weights)
    recipes = args.recipes or builtin_recipe_names()
    sweep = args.sweep if args.sweep is not None else ([] if args.recipes else list(DEFAULT_SWEEP))
    result = run_eval(model, processor, recipes, n=args.n, seed=args.seed, sweep=sweep, ratios=args.ratios,
                      batch_size=args.batch_size, progress=not args.json, task=task)
    if result is None:  # data-parallel: rank 0 reports
        return 0
    plot(result, args.plot)
    if args.json:
        print(to_json(result))
    else:
        print(f"toy task ({args.toy or DEFAULT_TOY}): {args.n} questions (seed {args.seed}); FLOPs in the papers' "
              "convention on the toy model")
        print(format_table(result["rows"]))
        if result["sweep"]:
            print(f"sweep: each criterion on {result['sweep_shape']}'s schedule, its last stage keeping "
                  f"{', '.join(f'{r:g}' for r in args.ratios)} (equal FLOPs at each point):")
            print(format_table(result["sweep"]))
            print("paired comparisons at each sweep point (same questions; > and < significant at 5%):")
            print(format_comparisons(result["comparisons"]))
        print(f"plot: {args.plot}")
    return 0


TOY_NAMES = list(TOYS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunekit", description="Training-free visual token pruning for VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="prefill latency, decode speed, memory and FLOPs per recipe")
    bench.add_argument("--recipes", nargs="+", default=["fastv", "transprune-high"],
                       help="recipes to compare with no pruning (default: fastv transprune-high)")
    bench.add_argument("--repeats", type=_int_at_least(1), default=5,
                       help="measured runs per recipe, interleaved (after one warm-up run each)")
    bench.add_argument("--new-tokens", type=_int_at_least(1), default=16)
    bench.add_argument("--batch", type=_int_at_least(1), default=1)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--attn", default="auto", choices=ATTENTION,
                       help="attention implementation: auto (flash_attention_2 when flash-attn imports and the "
                            "device is CUDA, else sdpa), sdpa, eager, flash_attention_2")
    bench.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda, cuda:N or mps (default: cuda where available)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(func=_cmd_bench)

    recipes = sub.add_parser("recipes", help="list built-in recipes with their FLOPs ratio on LLaVA-1.5-7B")
    recipes.add_argument("--json", action="store_true")
    recipes.set_defaults(func=_cmd_recipes)

    flops = sub.add_parser("flops", help="analytic prefill TFLOPs of recipes for a model's config.json")
    flops.add_argument("model", help="model directory or hub id (only config.json is read)")
    flops.add_argument("--recipe", nargs="+", default=[], help="recipe names or YAML paths")
    flops.add_argument("--visual-tokens", type=_int_at_least(1), default=576)
    flops.add_argument("--text-tokens", type=_int_at_least(0), default=0)
    flops.add_argument("--frames", type=_int_at_least(1), default=None,
                       help="the visual tokens are one clip of this many equal frames: criteria that keep a count "
                            "of their own on a clip (DyCoke's own count) are counted so")
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(func=_cmd_flops)

    run = sub.add_parser("run", help="answer a question with and without pruning and draw the kept tokens")
    run.add_argument("--model", help="a model folder or hub id (default: the built-in toy LLaVA)")
    run.add_argument("--image", help="an image file (with --model)")
    run.add_argument("--prompt", help="the question (with --model)")
    run.add_argument("--recipe", default="transprune-high")
    run.add_argument("--override", nargs="*", default=[], help="dotted recipe overrides")
    run.add_argument("--seed", type=int, default=0, help="which generated question (toy model)")
    run.add_argument("--toy", choices=TOY_NAMES, help=f"which built-in toy (default: {DEFAULT_TOY_NAME})")
    run.add_argument("--max-new-tokens", type=_int_at_least(1), default=32)
    run.add_argument("--out", default="prunekit_run.png", help="the PNG of kept tokens per stage")
    run.set_defaults(func=_cmd_run)

    evaluate = sub.add_parser("eval", help="accuracy, retention, FLOPs and relevance recall per recipe (toy task)")
    evaluate.add_argument("--recipes", nargs="+", help="recipes to compare, as 'a b' or 'a,b' (default: every built-in)")
    evaluate.add_argument("-n", type=_int_at_least(1), default=500, help="questions")
    evaluate.add_argument("--seed", type=int, default=1234)
    evaluate.add_argument("--sweep", nargs="*", default=None,
                          help="recipes whose criteria are swept on one schedule at each of --ratios (default: "
                               "random, fastv, pdrop, l2norm, transprune-high, oracle without --recipes, none with it)")
    evaluate.add_argument("--ratios", nargs="*", type=_keep_fraction, default=[0.5, 0.25, 0.125, 0.0625],
                          help="last-stage keep fractions of the sweep, each in (0, 1]")
    evaluate.add_argument("--plot", default="prunekit_eval.png", help="PNG of accuracy against FLOPs")
    evaluate.add_argument("--batch-size", type=_int_at_least(1), default=50, help="questions per forward pass")
    evaluate.add_argument("--weights", help="a toy model folder (default: the one in the package)")
    evaluate.add_argument("--toy", choices=TOY_NAMES, help=f"which built-in toy (default: {DEFAULT_TOY_NAME})")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    plugins = sub.add_parser("plugins", help="every registered criterion, combiner, merger, schedule and adapter")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=_cmd_plugins)

    doctor = sub.add_parser("doctor", help="which adapter fits a model and which probes it supports (no weights)")
    doctor.add_argument("model", help="model directory or hub id (only config.json is read)")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=_cmd_doctor)
    from prunekit.tune import add_tune_parser  # noqa: E402 (optuna is imported only when tune runs)
    add_tune_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every error prunekit raises on purpose (a bad argument, file, recipe or model)
    is one ``prunekit: error: ...`` line on stderr with exit status 2, and under ``--json`` also a
    ``{"error": "..."}`` object on stdout; anything else is a bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PrunekitError as exc:
        as_json = getattr(args, "json", False) if args is not None else "--json" in argv
        if as_json:
            print(json.dumps({"error": str(exc)}))
        if getattr(exc, "usage", None):
            print(exc.usage, end="", file=sys.stderr)
        print(f"prunekit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
