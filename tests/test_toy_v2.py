"""The LLaVA-layout toy (prunekit.toy.v2): its task, and once trained, its model's bars (docs/toy.md)."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from prunekit.toy.v2 import task as v2_task
from prunekit.toy.v2.model import WEIGHTS_DIR, build_processor, load_toy
from prunekit.toy.v2.task import ANSWERS, CHANCE, GRID, IMAGE_SIZE, KINDS, PATCH, ToyTask, draw_shape, prompt
from prunekit.toy.v2.train import accuracy, conversation_batch

needs_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").is_file(),
                                   reason="the LLaVA-layout toy is not trained yet (docs/toy.md)")


def test_the_task_is_seeded_balanced_and_knows_its_relevant_patches():
    a, b = ToyTask(3).questions(40), ToyTask(3).questions(40)
    assert [q.question for q in a] == [q.question for q in b] and [q.answer for q in a] == [q.answer for q in b]
    task = ToyTask(5)
    for kind in KINDS:
        counts: dict[str, int] = {}
        for _ in range(120):
            q = task.question(kind)
            assert q.answer in ANSWERS[kind] and q.kind == kind
            counts[q.answer] = counts.get(q.answer, 0) + 1
        assert min(counts.values()) > 120 / len(ANSWERS[kind]) / 2  # answers drawn uniformly per kind
    with pytest.raises(ValueError, match="unknown question kind 'size'; valid: color, shape"):
        task.question("size")



def test_training_conversations_ask_new_questions_on_one_scene_and_label_every_answer():
    task = ToyTask(7)
    questions = task.questions(4)
    follow_ups = [task.follow_ups(q, 4) for q in questions]
    follow_ups[2] = []
    assert all(len(turns) >= 2 for i, turns in enumerate(follow_ups) if i != 2)
    for question, turns in zip(questions, follow_ups):
        texts = [question.question] + [t.question for t in turns]
        assert len(set(texts)) == len(texts)  # each question asked once
        for text, answer, _ in turns:  # count and presence answers recounted from the scene
            words = text.split()
            if text.startswith("how many"):
                n = sum(s.color == words[2] for s in question.shapes)
                assert answer == v2_task.COUNTS[n - 1]
            elif text.startswith("is there"):
                found = any(s.color == words[3] and s.kind == words[4] for s in question.shapes)
                assert answer == ("yes" if found else "no")
    processor = build_processor()
    batch = conversation_batch(processor, questions, follow_ups, [False, True, False, False])
    assert batch["input_ids"].shape == batch["labels"].shape
    for row, (question, turns) in enumerate(zip(questions, follow_ups)):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        words = processor.tokenizer.convert_ids_to_tokens(labelled)
        if row == 1:  # the describe task: the description and its end
            assert words == v2_task.description(question.shapes).split() + ["</s>"]
        else:
            assert words == [w for a in [question.answer] + [t.answer for t in turns] for w in (a, "</s>")]
        text = " ".join(processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][row].tolist()))
        assert text.count("USER:") == (1 if row == 1 else 1 + len(turns))

def _pixels_of(shape) -> set[int]:
    """The patches a shape covers, counted pixel by pixel from its own drawing (not from shape_patches)."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, 255)
    pixels = canvas.load()
    return {(y // PATCH) * GRID + x // PATCH for y in range(IMAGE_SIZE) for x in range(IMAGE_SIZE) if pixels[x, y]}


def test_relevant_patches_are_the_patches_of_the_asked_objects():
    task = ToyTask(11)
    for kind in KINDS:
        for _ in range(10):
            q = task.question(kind)
            named = [s for s in q.shapes if f"{s.color} {s.kind}" in q.question
                     or f"{s.size} {s.kind}" in q.question or f"{s.size} {s.color} object" in q.question]
            if kind == "count":
                named = [s for s in q.shapes if s.color in q.question.split()]
            if kind == "presence" and q.answer == "no":
                words = q.question.split()
                named = [s for s in q.shapes if s.color in words or s.kind in words]
            assert q.relevant and all(0 <= p < GRID * GRID for p in q.relevant)
            assert set(q.relevant) == set().union(*(_pixels_of(s) for s in named)), q.question


def test_scenes_hold_small_objects_and_distractors():
    questions = ToyTask(2).questions(300)
    small = [s for q in questions for s in q.shapes if s.size == "small"]
    assert small and min(len(_pixels_of(s)) for s in small) <= 2  # some objects cover one or two patches
    color = [q for q in questions if q.kind == "color"]
    # every colour question has a distractor sharing the asked object's shape or colour
    assert all(sum(s.kind in q.question.split() or s.color == q.answer for s in q.shapes) >= 2 for q in color)


def test_objects_sit_on_the_patch_grid_one_patch_apart():
    """A small object inside one patch, a big one inside a 2x2 block, an empty patch between any two (pixel counts
    from each object's own drawing); the evaluated question mix is KINDS, ALL_KINDS can all be asked."""
    task = ToyTask(4)
    questions = task.questions(60)
    for q in questions:
        blocks = []
        for shape in q.shapes:
            patches = _pixels_of(shape)
            rows, columns = {p // GRID for p in patches}, {p % GRID for p in patches}
            side = 1 if shape.size == "small" else 2
            assert max(rows) - min(rows) < side and max(columns) - min(columns) < side, shape
            blocks.append((min(rows), min(columns), side))
        for i, (r1, c1, s1) in enumerate(blocks):
            for r2, c2, s2 in blocks[i + 1:]:
                apart = r1 + s1 < r2 or r2 + s2 < r1 or c1 + s1 < c2 or c2 + s2 < c1
                assert apart, (r1, c1, r2, c2)
    assert {q.kind for q in questions} == set(KINDS)
    assert all(task.question(kind).kind == kind for kind in v2_task.ALL_KINDS)


def test_the_prompt_is_llava_15s_chat_layout_with_the_image_first():
    assert prompt("how many red objects are there ?") == "<s> USER: <image>\nhow many red objects are there ? ASSISTANT:"
    processor = build_processor()
    q = ToyTask(0).question()
    batch = processor(images=[q.image], text=[prompt(q.question)], return_tensors="pt")
    ids = batch["input_ids"][0]
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image).sum()) == GRID * GRID == 144
    positions = (ids == image).nonzero().flatten()
    words = processor.tokenizer.convert_ids_to_tokens(ids[positions[-1] + 1:].tolist())
    assert words == q.question.split() + ["ASSISTANT:"]  # the question only after the image
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


@needs_weights
def test_the_shipped_model_answers_and_needs_the_image():
    model, processor = load_toy()
    held_out = ToyTask(20_000).questions(300)
    assert accuracy(model, processor, held_out) >= 0.95
    blank = ToyTask(20_000).questions(300)
    for q in blank:
        q.image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (100, 100, 100))
    assert accuracy(model, processor, blank) < CHANCE + 0.12  # chance is about 0.37 over the five kinds


@needs_weights
def test_blind_pruning_hurts_and_the_oracle_keeps_the_answer():
    """On TransPrune's schedule keeping 12.5% at the last stage: random loses, the oracle keeps (issue's bar)."""
    from prunekit.toy.evaluate import run_eval

    model, processor = load_toy()
    result = run_eval(model, processor, [], n=200, seed=77, sweep=["random", "oracle"], ratios=[0.125], progress=False,
                      task=v2_task)
    none = result["rows"][0].accuracy
    points = {r.recipe: r for r in result["sweep"]}
    assert points["random@0.125"].accuracy <= none - 0.15
    assert points["oracle@0.125"].retention >= 0.95
    assert points["oracle@0.125"].flops_ratio == points["random@0.125"].flops_ratio  # matched FLOPs
    (comparison,) = result["comparisons"]
    assert comparison.verdict == "random@0.125 < oracle@0.125"


@needs_weights
def test_prunekit_run_uses_the_llava_layout_toy_by_default(tmp_path, capsys):
    """README's first command: the default toy, 144 patches, drawn stage by stage."""
    from prunekit.cli import main

    out = tmp_path / "run.png"
    assert main(["run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "answer without pruning:" in text and "answer with transprune-high:" in text
    assert "from decoder layer 7: 126 of 144 visual tokens kept" in text  # 7/8 of the 12 x 12 grid
    image = Image.open(out)
    assert image.size[0] > image.size[1] > 100  # four panels side by side


def test_eval_and_run_pick_the_toy_by_name(tmp_path, capsys):
    """``--toy llava`` evaluates the LLaVA-layout task on its own model folder (random weights here)."""
    import json

    import torch
    from transformers import LlavaForConditionalGeneration

    from prunekit.cli import main
    from prunekit.toy.v2.model import build_config

    torch.manual_seed(0)
    LlavaForConditionalGeneration(build_config()).save_pretrained(tmp_path / "toy")
    build_processor().save_pretrained(tmp_path / "toy")
    code = main(["eval", "--toy", "llava", "--weights", str(tmp_path / "toy"), "--recipes", "fastv", "-n", "6",
                 "--json", "--plot", str(tmp_path / "eval.png")])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and [row["recipe"] for row in result["rows"]] == ["none", "fastv"]
    assert 0 <= result["rows"][1]["relevance_recall"] <= 1
    assert main(["run", "--toy", "nonesuch"]) == 2
    assert "invalid choice: 'nonesuch' (choose from 'question-first', 'llava')" in capsys.readouterr().err
    assert main(["run", "--toy", "llava", "--model", "x", "--image", "y", "--prompt", "z"]) == 2
    assert "--toy picks the built-in toy model; it does not go with --model" in capsys.readouterr().err
