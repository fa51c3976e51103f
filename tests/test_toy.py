"""The built-in default: the synthetic task, the shipped toy LLaVA, `prunekit run` and `prunekit eval`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from prunekit.cli import main
from prunekit.toy.model import WEIGHTS_DIR, build_processor, load_toy
from prunekit.toy.task import ANSWERS, GRID, KINDS, ToyTask, prompt
from prunekit.toy.train import accuracy

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").is_file(),
                                   reason="the toy model's weights are not in the package")


def test_the_task_is_seeded_balanced_and_knows_its_relevant_patches():
    a, b = ToyTask(3).questions(40), ToyTask(3).questions(40)
    assert [q.question for q in a] == [q.question for q in b] and [q.answer for q in a] == [q.answer for q in b]
    for kind in KINDS:
        answers = [ToyTask(9).question(kind).answer for _ in range(1)]
        assert all(ans in ANSWERS[kind] for ans in answers)
    counts = {}
    task = ToyTask(5)
    for _ in range(300):
        q = task.question("count")
        counts[q.answer] = counts.get(q.answer, 0) + 1
    assert min(counts.values()) > 70  # three answers, roughly a third each
    q = ToyTask(1).question("color")
    assert q.relevant and all(0 <= p < GRID * GRID for p in q.relevant)
    shape = next(s for s in q.shapes if s.color == q.answer)
    x0, y0, x1, y1 = shape.box
    assert (y0 // 8) * GRID + (x0 // 8) in q.relevant and (y1 // 8) * GRID + min(x1 // 8, 7) in q.relevant


def test_the_processor_expands_one_image_into_64_tokens():
    processor = build_processor()
    q = ToyTask(0).question()
    batch = processor(images=[q.image], text=[prompt(q.question)], return_tensors="pt")
    assert int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64
    assert batch["pixel_values"].shape == (1, 3, 64, 64)


@needs_weights
def test_the_shipped_model_answers_and_needs_the_image():
    model, processor = load_toy()
    held_out = ToyTask(20_000).questions(300)
    assert accuracy(model, processor, held_out) >= 0.95
    blank = ToyTask(20_000).questions(300)
    for q in blank:
        q.image = Image.new("RGB", (64, 64), (100, 100, 100))
    assert accuracy(model, processor, blank) < 0.6  # chance is about 0.35 over the five kinds


@needs_weights
def test_prunekit_run_answers_twice_and_draws_the_kept_tokens(tmp_path, capsys):
    out = tmp_path / "run.png"
    assert main(["run", "--toy", "question-first", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "answer without pruning:" in text and "answer with transprune-high:" in text
    assert "from decoder layer 7: 56 of 64 visual tokens kept" in text
    assert "prefill FLOPs:" in text and out.is_file()
    image = Image.open(out)
    assert image.size[0] > image.size[1] > 100  # four panels side by side


@needs_weights
def test_prunekit_run_with_a_vision_stage_recipe(tmp_path, capsys):
    assert main(["run", "--toy", "question-first", "--recipe", "visionzip-64", "--override", "vision.count=24",
                 "vision.merge.contextual=4", "--out", str(tmp_path / "vz.png")]) == 0
    assert "before the language model: 24 of 64 visual tokens kept (+5 merged)" in capsys.readouterr().out


@needs_weights
def test_prunekit_eval_reports_each_recipe_and_a_sweep(tmp_path, capsys):
    plot = tmp_path / "eval.png"
    assert main(["eval", "--toy", "question-first", "-n", "60", "--recipes", "fastv", "random", "--sweep", "random",
                 "--ratios", "0.5", "0.125", "--plot", str(plot), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["recipe"]: r for r in result["rows"]}
    assert set(rows) == {"none", "fastv", "random"}
    assert rows["none"]["retention"] == 1.0 and rows["none"]["relevance_recall"] == 1.0
    assert rows["fastv"]["flops_ratio"] < 1 and 0 <= rows["random"]["relevance_recall"] <= 1
    assert [r["recipe"] for r in result["sweep"]] == ["random@0.5", "random@0.125"]
    assert result["sweep"][0]["flops_ratio"] > result["sweep"][1]["flops_ratio"]
    low, high = rows["fastv"]["accuracy_interval"]
    assert low <= rows["fastv"]["accuracy"] <= high
    assert result["comparisons"] == []  # one swept recipe: no pair to compare at a point
    assert plot.is_file()


def test_eval_relevance_recall_counts_kept_relevant_patches():
    from prunekit.toy.evaluate import _row
    from prunekit.toy.task import Question

    questions = [Question(Image.new("RGB", (8, 8)), "q", "red", "color", relevant=[1, 2, 3, 4]),
                 Question(Image.new("RGB", (8, 8)), "q", "no", "presence", relevant=[])]
    row, correct = _row("r", questions, ["red", "yes"], [{1, 2, 9}, {5}], base_correct=None, flops_ratio=0.5)
    assert row.accuracy == 0.5 and row.relevance_recall == 0.5 and row.by_kind == {"color": 1.0, "presence": 0.0}
    assert correct.tolist() == [True, False]


def test_run_without_a_model_rejects_image_and_prompt(capsys):
    assert main(["run", "--image", "x.png"]) == 2
    assert "go with --model" in capsys.readouterr().err


def test_the_oracle_keeps_the_relevant_patches_first_and_needs_the_truth():
    import prunekit
    from prunekit.errors import PrunekitError
    from prunekit.testing import llava_inputs, tiny_llava
    from prunekit.toy.oracle import ground_truth

    model = tiny_llava()
    inputs = llava_inputs(prefix=[[5], [5, 9]], question=[[6, 7, 8], [6, 7, 8]])  # left padding: both images at 3
    truth = [[0, 35, 17], [20, 21, 22, 23, 24]]
    with prunekit.apply(model, "oracle") as pruner, ground_truth(truth):
        model(**inputs)
    last = pruner.last_report.stages[-1].kept  # [batch, 4] original positions; 36 visual tokens keep int(4.5)
    assert set((last[0] - 3).tolist()) > set(truth[0])
    assert set((last[1] - 3).tolist()) < set(truth[1])  # more relevant patches than kept: only relevant ones
    with prunekit.apply(model, "oracle"), pytest.raises(PrunekitError, match="needs the toy task's ground truth"):
        model(**inputs)
