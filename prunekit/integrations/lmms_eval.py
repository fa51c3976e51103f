"""An lmms-eval model plugin: any supported HF VLM with a prunekit recipe.

    lmms-eval --model prunekit --tasks mme --batch_size 1 \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,recipe=transprune-high

lmms-eval finds the plugin through the ``lmms_eval.models`` entry point that prunekit's package
declares (:func:`manifest`). Besides the task metrics, lmms-eval's results carry the pruning figures
under ``throughput`` (``avg_prunekit_*``): the mean kept visual tokens per stage and the analytic
TFLOPs ratio, computed from the tokens every decoder layer really saw. ``pretrained=toy`` (the
default) is the built-in toy LLaVA, which needs no download.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prunekit.errors import PrunekitError, valid_list

INSTALL_HINT = "pip install 'prunekit[lmms]'"


class MissingExtraError(PrunekitError, RuntimeError):
    """An optional dependency of the feature asked for is not installed."""


def require_lmms_eval() -> None:
    """Raise :class:`MissingExtraError` with the install command when lmms-eval is absent."""
    try:
        import lmms_eval.api.model  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"the lmms-eval plugin needs the lmms-eval package, which is not installed "
                                f"({exc}); install it with: {INSTALL_HINT}") from None


def manifest():
    """The ``lmms_eval.models`` entry point: the plugin's model id ``prunekit`` and its class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prunekit", simple_class_path="prunekit.integrations.lmms_eval.PrunekitLMM",
                         aliases=("prunekit_hf",))


require_lmms_eval()

from lmms_eval.api.model import lmms  # noqa: E402


TOY = "toy"


class PrunekitLMM(lmms):
    """A Hugging Face VLM under a prunekit recipe, as an lmms-eval simple model.

    Model args: ``pretrained`` (folder, hub id, ``toy``, or ``toy:FOLDER`` for a retrained toy), ``recipe`` (built-in name or YAML path,
    ``none`` for no pruning), ``overrides`` (dotted recipe overrides separated by ``;``), ``device``,
    ``dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``), ``attn_implementation`` (default:
    flash_attention_2 where flash-attn imports on CUDA, else sdpa), ``batch_size``, ``max_new_tokens``.
    """

    is_simple = True

    def __init__(self, pretrained: str = TOY, recipe: str = "transprune-high", overrides: str = "",
                 device: str | None = None, dtype: str = "auto", attn_implementation: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str = 128, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise PrunekitError(f"unknown prunekit model_args {valid_list(unknown)}; valid: "
                                f"{valid_list(['pretrained', 'recipe', 'overrides', 'device', 'dtype', 'attn_implementation', 'batch_size', 'max_new_tokens'])}")
        import prunekit
        from prunekit.cli_checks import DTYPES, best_attention

        self.accelerator = _accelerator()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = device if device not in (None, "cuda") else str(self.accelerator.device)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype != "auto" and dtype not in DTYPES:
            raise PrunekitError(f"dtype={dtype!r} is not valid; valid: {valid_list(['auto', *DTYPES])}")
        torch_dtype = DTYPES.get(dtype, "auto")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.pretrained = pretrained
        self.model, self.processor, self._prompt = _load(pretrained, torch_dtype,
                                                         attn_implementation or best_attention(self._device.type))
        self.model.to(self._device)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        self.recipe_name = recipe
        override_list = [o.strip() for o in overrides.split(";") if o.strip()]
        self.pruner = None if recipe == "none" else prunekit.apply(self.model, recipe, override_list)
        n_stages = 0 if self.pruner is None else len(self.pruner.stages) + (self.pruner.recipe.vision is not None)
        self.stats = PruneStats(n_stages)  # every request so far
        self._call_stats = PruneStats(n_stages)  # the requests of the current call

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _inputs(self, contexts: Sequence[str], visuals: Sequence[list]) -> dict[str, torch.Tensor]:
        texts = [self._prompt(self.processor, context, len(images)) for context, images in zip(contexts, visuals)]
        images = [image for row in visuals for image in row]
        inputs = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        floating = {k: v.to(self.model.dtype) for k, v in inputs.items() if v.is_floating_point()}
        return {**inputs, **floating}

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self._device) for k, v in inputs.items()}

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, as ``gen_kwargs`` ask) answers, batched ``batch_size`` at a time."""
        from tqdm.auto import tqdm

        answers: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one gen_kwargs per batch
            groups.setdefault(_gen_key(request.args[1]), []).append(i)
        batches = [ids[s:s + self.batch_size] for ids in groups.values() for s in range(0, len(ids), self.batch_size)]
        start = time.perf_counter()
        self._call_stats = PruneStats(len(self.stats.kept))
        for batch in tqdm(batches, desc="prunekit responding", disable=self.rank != 0):
            contexts, visuals = [], []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                contexts.append(context)
                visuals.append(_visuals(doc_to_visual, self.task_dict[task][split][doc_id]))
            for i, text in zip(batch, self._answer(contexts, visuals, requests[batch[0]].args[1])):
                answers[i] = text
        self._log(time.perf_counter() - start, len(requests))
        return [answers[i] for i in range(len(requests))]

    def _answer(self, contexts: Sequence[str], visuals: Sequence[list], gen_kwargs: dict) -> list[str]:
        """One batch's answers under lmms-eval's ``gen_kwargs``, cut at its ``until`` strings."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        inputs = self._to_device(self._inputs(contexts, visuals))
        length = inputs["input_ids"].shape[1]
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                top_p=gen_kwargs.get("top_p") if temperature > 0 else None,
                num_beams=int(gen_kwargs.get("num_beams", 1)),
                pad_token_id=self.tokenizer.pad_token_id)
        self._record(inputs)
        texts = self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        return [_cut(text, until).strip() for text in texts]

    def generate_until_multi_round(self, requests) -> list[tuple[str, ...]]:
        """Multi-round tasks, one request at a time: each round is a prompt of its own, pruned as in
        :meth:`generate_until`.

        lmms-eval's protocol: round 0 is the request's context and visuals; before each later round the
        task's ``doc_to_text(doc, previous_output=..., round_idx=r, previous_round_info=...)`` returns
        ``(visuals, context, terminal, round_results, round_info)``: the next prompt (which carries the
        conversation so far as the task words it), whether the conversation ended, and the results so far.
        The answer of a request is its tuple of round results.
        """
        results = []
        start = time.perf_counter()
        self._call_stats = PruneStats(len(self.stats.kept))
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals, outputs, info, round_idx = _visuals(doc_to_visual, doc), [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, round_results, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info)
                    outputs = list(round_results)
                    if terminal:
                        break
                    visuals = _rgb(visuals)
                outputs.append(self._answer([context], [visuals], gen_kwargs)[0])
                round_idx += 1
            results.append(tuple(outputs))
        self._log(time.perf_counter() - start, len(requests))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (and whether greedy decoding gives it).

        The prompt is prefilled alone, so the pruning sees what it sees in generation (the
        continuation is no instruction); the continuation then runs on the pruned KV cache.
        """
        from prunekit.compat import cache_of, with_cache

        results = []
        self._call_stats = PruneStats(len(self.stats.kept))
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            images = _visuals(doc_to_visual, doc)
            prompt_text = self._prompt(self.processor, context, len(images))
            inputs = self._to_device(self._inputs([context], [images]))
            n_prompt = inputs["input_ids"].shape[1]
            full = self.tokenizer(prompt_text + continuation, add_special_tokens=False)["input_ids"]
            prompt_ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            target = torch.tensor(full[len(prompt_ids):], device=self._device)  # [n_continuation]
            if target.numel() == 0:
                raise PrunekitError(f"the continuation {continuation!r} adds no token to the context")
            with torch.no_grad():
                out = self.model(**inputs, use_cache=True)
                self._record(inputs)
                logits = [out.logits[0, -1:]]  # predicts the continuation's first token
                if target.numel() > 1:
                    mask = torch.ones(1, n_prompt + target.numel() - 1, dtype=torch.long, device=self._device)
                    rest = self.model(input_ids=target[None, :-1], attention_mask=mask,
                                      **with_cache(self.model, cache_of(out)), use_cache=True)
                    logits.append(rest.logits[0])
            logits = torch.cat(logits).float()  # [n_continuation, vocab]
            log_probs = torch.log_softmax(logits, dim=-1)
            results.append((float(log_probs.gather(1, target[:, None]).sum()),
                            bool((logits.argmax(-1) == target).all())))
        self._log(0.0, len(requests))
        return results

    def _record(self, inputs: dict[str, torch.Tensor]) -> None:
        for stats in (self.stats, self._call_stats):
            if self.pruner is None or self.pruner.last_report is None:
                stats.add_unpruned(inputs["input_ids"].shape[0])
            else:
                stats.add(self.pruner.last_report, self.model.config)

    def _log(self, elapsed: float, n_requests: int) -> None:
        """Hand this call's pruning figures to lmms-eval's metric log (summed over processes first).

        lmms-eval makes one call per request type and averages the logged figures over calls.
        """
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        summary = self._call_stats.summary(reduce=self._world_size > 1)
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=0, avg_speed=0.0,
                    additional_metrics={f"prunekit_{k}": v for k, v in summary.items()} | {"num_requests": n_requests})

    def clean(self) -> None:
        """lmms-eval's end of run: take the pruner's hooks off the model, then free it."""
        if self.pruner is not None:
            self.pruner.remove()
        super().clean()

    def prune_summary(self, reduce: bool = False) -> dict[str, float]:
        """Every request so far: mean kept visual tokens per stage, mean visual tokens before pruning, and the
        analytic TFLOPs ratios (``reduce``: over all processes, a collective call every process must make)."""
        return self.stats.summary(reduce=reduce)


class PruneStats:
    """Running sums over samples of what each prefill kept and its analytic FLOPs (papers' convention)."""

    def __init__(self, n_stages: int) -> None:
        self.samples = 0
        self.visual_tokens = 0.0
        self.kept = [0.0] * n_stages  # per stage (the vision stage first, if any): summed kept visual tokens
        self.flops = torch.zeros(4, dtype=torch.float64)  # visual pruned, visual full, sequence pruned, full

    def add_unpruned(self, n: int) -> None:
        self.samples += n

    def add(self, report: Any, config: Any) -> None:
        from prunekit.flops import DecoderDims, prefill_flops

        dims = DecoderDims.from_config(config)
        batch = report.visual_tokens.shape[0]
        self.samples += batch
        self.visual_tokens += float(report.visual_tokens.sum())
        self.kept = [total + float(stage.kept_counts.sum()) for total, stage in zip(self.kept, report.stages)]
        for row in range(batch):
            visual = report.visual_tokens_per_layer[row].tolist()  # [num_layers] visual tokens each layer saw
            real = report.real_tokens_per_layer[row].tolist()  # [num_layers] real tokens each layer saw
            full_visual = int(report.visual_tokens[row])
            self.flops += torch.tensor([prefill_flops(visual, dims), prefill_flops([full_visual] * len(visual), dims),
                                        prefill_flops(real, dims), prefill_flops([real[0]] * len(real), dims)],
                                       dtype=torch.float64)

    def summary(self, reduce: bool = False) -> dict[str, float]:
        totals = torch.tensor([1, self.samples, self.visual_tokens, *self.flops.tolist(), *self.kept],
                              dtype=torch.float64)  # the leading 1 counts the processes
        if reduce:
            import torch.distributed as dist

            dist.all_reduce(totals)
        processes, samples, visual, flops, kept = totals[0], totals[1], totals[2], totals[3:7], totals[7:]
        if samples == 0:
            return {}
        out = {"processes": float(processes), "samples": float(samples)}
        if flops[1] > 0:
            out["visual_tokens"] = float(visual / samples)
            out |= {f"kept_stage{i + 1}": float(k / samples) for i, k in enumerate(kept)}
            out["tflops_ratio"] = float(flops[0] / flops[1])
            out["sequence_tflops_ratio"] = float(flops[2] / flops[3])
        return out


def _accelerator():
    """accelerate's process state under ``accelerate launch`` / ``torchrun`` (None on one process)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _load(pretrained: str, dtype: Any, attn: str) -> tuple[Any, Any, Callable[[Any, str, int], str]]:
    """Model, processor and the prompt builder ``(processor, text, n_images) -> str`` of a checkpoint."""
    if pretrained == TOY or pretrained.startswith(f"{TOY}:"):
        from prunekit.toy.model import load_toy
        from prunekit.toy.task import prompt

        folder = pretrained.partition(":")[2] or None
        model, processor = load_toy(folder, dtype=None if dtype == "auto" else dtype)
        return model, processor, lambda processor, text, n_images: prompt(text)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from prunekit.run import chat_prompt

    processor = AutoProcessor.from_pretrained(pretrained)
    model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype, attn_implementation=attn)
    return model.eval(), processor, chat_prompt


def _visuals(doc_to_visual: Callable | None, doc: Any) -> list:
    return [] if doc_to_visual is None else _rgb(doc_to_visual(doc))


def _rgb(visuals: Sequence | None) -> list:
    """A request's images as RGB (None: no image)."""
    return [v.convert("RGB") if hasattr(v, "convert") else v for v in visuals or []]


def _gen_key(gen_kwargs: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in gen_kwargs.items()))


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
