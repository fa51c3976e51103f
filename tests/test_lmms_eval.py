"""The lmms-eval plugin: registration, batched requests against one-at-a-time answers, a local task end to end."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.flops import DecoderDims, recipe_estimate
from prunekit.toy.task import GRID, ToyTask, prompt

try:
    import lmms_eval  # noqa: F401

    HAVE_LMMS = True
except ImportError:
    HAVE_LMMS = False

# .ci/run's main job installs the extra and sets PRUNEKIT_REQUIRE_LMMS=1: there a missing lmms-eval fails these
# tests instead of skipping them. Its lower-bound job installs no extra, and they skip.
needs_lmms = pytest.mark.skipif(not HAVE_LMMS and os.environ.get("PRUNEKIT_REQUIRE_LMMS") != "1",
                                reason="lmms-eval is not installed")
RECIPE = "transprune-high"


def test_a_missing_lmms_eval_names_the_extra_to_install(monkeypatch):
    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of these now fails as if not installed
    monkeypatch.delitem(sys.modules, "prunekit.integrations.lmms_eval", raising=False)
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[lmms\]'"):
        importlib.import_module("prunekit.integrations.lmms_eval")
    monkeypatch.delitem(sys.modules, "prunekit.integrations.lmms_eval", raising=False)


@pytest.fixture()
def toy(toy_weights, monkeypatch):
    monkeypatch.setattr("prunekit.toy.model.WEIGHTS_DIR", toy_weights)
    from prunekit.toy.model import load_toy

    return load_toy()


def _docs(n: int, seed: int = 77) -> list[dict]:
    return [{"image": q.image, "question": q.question, "answer": q.answer} for q in ToyTask(seed).questions(n)]


def _requests(docs: list[dict], request_type: str, second_arg) -> list:
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=request_type, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1},
                     arguments=(doc["question"], second_arg(doc), lambda d: [d["image"]], i, "toy", "test"))
            for i, doc in enumerate(docs)]


def _plugin(**model_args):
    from prunekit.integrations.lmms_eval import PrunekitLMM

    return PrunekitLMM(device="cpu", **model_args)


@needs_lmms
def test_lmms_eval_finds_the_plugin_through_its_entry_point():
    from lmms_eval.models import get_model

    from prunekit.integrations.lmms_eval import PrunekitLMM

    assert get_model("prunekit") is PrunekitLMM


@needs_lmms
def test_batched_requests_answer_as_one_question_at_a_time_and_report_what_was_kept(toy):
    model, processor = toy
    docs = _docs(7)
    gen_kwargs = {"max_new_tokens": 3, "until": ["</s>"], "temperature": 0}
    lm = _plugin(recipe=RECIPE, batch_size=3)
    lm.task_dict = {"toy": {"test": docs}}
    answers = lm.generate_until(_requests(docs, "generate_until", lambda d: dict(gen_kwargs)))

    expected, kept = [], []  # the reference: the bare model under prunekit.apply, one unpadded question at a time
    with prunekit.apply(model, RECIPE) as pruner, torch.no_grad():
        for doc in docs:
            inputs = processor(images=[doc["image"]], text=[prompt(doc["question"])], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            expected.append(text.split("</s>")[0].strip())
            kept.append([int(stage.kept_counts[0]) for stage in pruner.last_report])
    assert answers == expected

    summary = lm.prune_summary()
    assert summary["samples"] == len(docs) and summary["visual_tokens"] == GRID * GRID
    for stage in range(len(kept[0])):
        assert summary[f"kept_stage{stage + 1}"] == pytest.approx(sum(k[stage] for k in kept) / len(docs))
    analytic = recipe_estimate(pruner.recipe, DecoderDims.from_config(model.config), GRID * GRID).visual_ratio
    assert summary["tflops_ratio"] == pytest.approx(analytic, rel=1e-6)
    assert summary["tflops_ratio"] < summary["sequence_tflops_ratio"] < 1


@needs_lmms
def test_loglikelihood_is_the_pruned_models_log_probability_of_the_answer(toy):
    model, processor = toy
    docs = _docs(3, seed=5)
    lm = _plugin(recipe=RECIPE)
    lm.task_dict = {"toy": {"test": docs}}
    results = lm.loglikelihood(_requests(docs, "loglikelihood", lambda d: " " + d["answer"]))
    with prunekit.apply(model, RECIPE), torch.no_grad():
        for doc, (log_prob, greedy) in zip(docs, results):
            inputs = processor(images=[doc["image"]], text=[prompt(doc["question"])], return_tensors="pt")
            logits = model(**inputs).logits[0, -1].double()  # [vocab] the next word after the prompt
            answer = processor.tokenizer.convert_tokens_to_ids(doc["answer"])
            assert log_prob == pytest.approx(float(logits.log_softmax(-1)[answer]), abs=1e-4)
            assert greedy == (int(logits.argmax()) == answer)
    plugin_model = lm.model
    lm.clean()  # lmms-eval's end of run: the plugin's pruner leaves the model
    with prunekit.apply(plugin_model, RECIPE):  # an active pruner left behind would make this an error
        pass


@needs_lmms
def test_model_args_are_checked():
    with pytest.raises(PrunekitError, match=r"unknown prunekit model_args 'recpie'.*'recipe'"):
        _plugin(recpie=RECIPE)
    with pytest.raises(PrunekitError, match=r"dtype='float8'.*'bfloat16'"):
        _plugin(dtype="float8")


@needs_lmms
def test_lmms_eval_scores_a_local_task_with_the_plugin(toy, tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from prunekit.integrations.toy_task import TASK, write_toy_task

    model, processor = toy
    write_toy_task(tmp_path, n=8, seed=31)
    results = simple_evaluate(model="prunekit", model_args=f"recipe={RECIPE},device=cpu", tasks=[TASK],
                              batch_size=4, task_manager=TaskManager(include_path=str(tmp_path)), log_samples=False)

    correct = 0  # the reference: greedy answers of the pruned model, one question at a time
    with prunekit.apply(model, RECIPE), torch.no_grad():
        for q in ToyTask(31).questions(8):
            inputs = processor(images=[q.image], text=[prompt(q.question)], return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += text.strip() == q.answer
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(correct / 8)
    throughput = results["throughput"]
    assert throughput["avg_prunekit_samples"] == 8 and throughput["avg_prunekit_visual_tokens"] == GRID * GRID
    assert 0 < throughput["avg_prunekit_tflops_ratio"] < 1
    assert throughput["avg_prunekit_kept_stage1"] > throughput["avg_prunekit_kept_stage3"]


@needs_lmms
def test_loglikelihood_of_several_tokens_without_pruning_is_one_forward_pass(toy):
    model, processor = toy
    docs = _docs(2, seed=8)
    lm = _plugin(recipe="none")
    lm.task_dict = {"toy": {"test": docs}}
    results = lm.loglikelihood(_requests(docs, "loglikelihood", lambda d: f" {d['answer']} </s>"))
    with torch.no_grad():
        for doc, (log_prob, _) in zip(docs, results):
            text = f"{prompt(doc['question'])} {doc['answer']} </s>"
            inputs = processor(images=[doc["image"]], text=[text], return_tensors="pt")
            logits = model(**inputs).logits[0, -3:-1].double()  # [2, vocab] predicting the answer and </s>
            target = inputs["input_ids"][0, -2:]
            assert log_prob == pytest.approx(float(logits.log_softmax(-1).gather(1, target[:, None]).sum()), abs=1e-4)


def _lmms_eval_cli(launcher: list[str], weights, task_dir, out) -> dict:
    import json
    import subprocess

    command = [sys.executable, *launcher, "-m", "lmms_eval", "--model", "prunekit",
               "--model_args", f"pretrained=toy:{weights},recipe={RECIPE},device=cpu", "--tasks", "prunekit_toy",
               "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return json.loads(next(out.rglob("*_results.json")).read_text())


@needs_lmms
@pytest.mark.slow
def test_lmms_eval_on_two_processes_gives_the_one_process_result(toy_weights, tmp_path):
    """torchrun (accelerate launch does the same on GPUs; on CPUs it would need mpirun) with gloo."""
    from prunekit.integrations.toy_task import TASK, write_toy_task

    write_toy_task(tmp_path / "task", n=10, seed=3)
    single = _lmms_eval_cli([], toy_weights, tmp_path / "task", tmp_path / "one")
    double = _lmms_eval_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], toy_weights,
                            tmp_path / "task", tmp_path / "two")
    assert double["results"][TASK]["exact_match,none"] == single["results"][TASK]["exact_match,none"]
    pruning = {k: v for k, v in single["throughput"].items() if k.startswith("avg_prunekit")}
    assert pruning.pop("avg_prunekit_processes") == 1 and double["throughput"].pop("avg_prunekit_processes") == 2
    assert pruning["avg_prunekit_samples"] == 10 and "avg_prunekit_kept_stage3" in pruning
    assert {k: double["throughput"][k] for k in pruning} == pytest.approx(pruning)


@needs_lmms
def test_multi_round_requests_answer_every_round_as_its_own_prompt(toy):
    """lmms-eval's multi-round protocol: the task words each later round; every round is answered as
    generate_until answers that prompt alone, and the request's answer is its tuple of rounds."""
    docs = _docs(3, seed=11)
    follow_ups = ToyTask(12).questions(3)  # a second question per doc, on the doc's own image
    seen: list[tuple[int, list[str]]] = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((round_idx, list(previous_output)))
        if round_idx == 2:
            return None, None, True, previous_output, previous_round_info
        index = docs.index(doc)
        question = follow_ups[index].question.replace("?", "") + "?"
        return [doc["image"]], question, False, previous_output, {"index": index}

    gen_kwargs = {"max_new_tokens": 3, "until": ["</s>"], "temperature": 0}
    lm = _plugin(recipe=RECIPE)
    lm.task_dict = {"toy": {"test": docs}}
    from lmms_eval.api.instance import Instance

    requests = [Instance(request_type="generate_until_multi_round", idx=0,
                         metadata={"task": "toy", "doc_id": i, "repeats": 1},
                         arguments=(doc["question"], dict(gen_kwargs), lambda d: [d["image"]], doc_to_text, i, "toy",
                                    "test"))
                for i, doc in enumerate(docs)]
    answers = lm.generate_until_multi_round(requests)
    single = [(d["question"], d) for d in docs] + [(f.question.replace("?", "") + "?", d)
                                                   for f, d in zip(follow_ups, docs)]
    single_docs = [{"image": d["image"], "question": q} for q, d in single]
    lm.task_dict = {"toy": {"test": single_docs}}
    alone = lm.generate_until(_requests(single_docs, "generate_until", lambda d: dict(gen_kwargs)))
    assert answers == [(alone[i], alone[len(docs) + i]) for i in range(len(docs))]
    assert [r for r, _ in seen] == [1, 2] * len(docs)
    assert seen[1][1] == list(answers[0])  # the task saw every round's answer
    assert lm.prune_summary()["samples"] == 4 * len(docs)  # both rounds of every doc, and the lone prompts
