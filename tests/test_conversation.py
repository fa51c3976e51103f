"""Conversations: a later turn brings a new image on the (pruned) KV cache of the earlier turns.

Each turn's visual tokens are pruned in that turn, on the cache that exists; the turn is scored on its own
tokens (its instruction's attention over the turn's keys). The reference below runs the whole conversation
as one cache-free sequence by hand (tests/reference.py's formulas), pruning each turn's image at each stage.
"""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit.compat import cache_of, with_cache
from prunekit.errors import LayoutError
from prunekit.testing import MATRIX, LlavaShape, family_inputs, llava_inputs, missing_module, tiny_family_model
from reference import RefModel, rms_norm

SHAPE = LlavaShape()
STEPS = 4  # answer tokens per turn


def _turns(dtype: torch.dtype, seeds=(3, 4, 5)) -> list[dict]:
    return [llava_inputs(SHAPE, batch=1, seed=seed, dtype=dtype) for seed in seeds]


def chat(model, turns: list[dict], steps: int = STEPS) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
    """One generate() call per turn, each on the cache of the last, as a chat front-end runs them.

    Returns the whole conversation's ids [seq], where each turn's forward starts, where each turn's prompt
    ends (its last token), and the logits of every answer token [turns * steps, vocab].
    """
    cache, ids, starts, prompt_ends, logits = None, None, [], [], []
    for turn in turns:
        new = turn["input_ids"] if ids is None else torch.cat([ids, turn["input_ids"][:, 1:]], dim=1)  # no 2nd <s>
        # a turn's forward starts at the last answer token (generate returns it, the cache has not seen it yet)
        starts.append(0 if ids is None else ids.shape[1] - 1)
        prompt_ends.append(new.shape[1] - 1)
        kwargs = with_cache(model, cache) if cache is not None else {}
        out = model.generate(input_ids=new, attention_mask=torch.ones_like(new), pixel_values=turn["pixel_values"],
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kwargs)
        cache, ids = cache_of(out), out.sequences
        logits.append(torch.stack(out.logits)[:, 0])  # [steps, vocab]
    return ids[0], starts, prompt_ends, torch.cat(logits)


def conversation_reference(ref: RefModel, ids: torch.Tensor, images: torch.Tensor, starts: list[int],
                           prompt_ends: list[int], stages: list[tuple[int, float]], positions: str) -> torch.Tensor:
    """Cache-free logits [seq, vocab] of the whole conversation with FastV pruning of each turn's image.

    At a stage's layer, turn t keeps the int(keep * its visual count) visual tokens that its last prompt token
    attended to most at the layer before (mean over heads, softmax over the turn's own tokens only).
    """
    h = ref.embeddings(ids, images)  # [seq, hidden]
    original = torch.arange(ids.shape[0])  # original index of every current token
    turn_of = torch.bucketize(original, torch.tensor(starts[1:]), right=True)  # [seq] turn of every token
    visual = ids == ref.image_token_id
    visual_count = [int((visual & (turn_of == t)).sum()) for t in range(len(starts))]
    pos = original.clone()
    stage_layers = [layer for layer, _ in stages]
    previous_x = None
    for index, layer in enumerate(ref.layers):
        if index in stage_layers:
            keep_fraction = stages[stage_layers.index(index)][1]
            before = ref.layers[index - 1]
            q, k, _ = ref.qkv(before, previous_x, pos)  # [heads, seq, head_dim]
            keep = ~visual.clone()
            for t, end in enumerate(prompt_ends):
                columns = torch.nonzero((turn_of == t) & (original <= end)).flatten()  # the turn's own tokens
                last = int(torch.nonzero(original == end).flatten()[0])
                logit = torch.einsum("hd,hnd->hn", q[:, last], k[:, columns]) / math.sqrt(ref.head_dim)  # [heads, n]
                row = torch.softmax(logit, dim=-1).mean(0)  # [n]
                candidates = visual[columns]
                score, slots = row[candidates], columns[candidates]
                order = torch.sort(score, descending=True, stable=True).indices[:int(visual_count[t] * keep_fraction)]
                keep[slots[order]] = True
            h, original, turn_of, visual, pos = h[keep], original[keep], turn_of[keep], visual[keep], pos[keep]
            if positions == "compact":
                pos = torch.arange(h.shape[0])
        x = rms_norm(h, layer.input_layernorm)
        previous_x = x
        h = h + ref.attention(layer, x, pos)
        h = h + ref.mlp(layer, rms_norm(h, layer.post_attention_layernorm))
    return ref.lm_head(rms_norm(h, ref.final_norm)), original


KEEP_ALL = {"name": "keep-all", "criteria": {"fastv": {"type": "fastv_attention"}},
            "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 1.0}, {"layer": 5, "keep": 1.0}]}}


def test_keeping_everything_is_the_bare_conversation(llava64):
    turns = _turns(torch.float64)
    bare = chat(llava64, turns)
    with prunekit.apply(llava64, KEEP_ALL) as pruner:
        kept = chat(llava64, turns)
        assert pruner.last_report.stages[-1].kept_counts.tolist() == [SHAPE.visual_tokens]  # the last turn's image
    assert torch.equal(bare[0], kept[0])
    torch.testing.assert_close(kept[3], bare[3], rtol=0, atol=1e-10)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("stages", [[(2, 0.5)], [(2, 0.5), (4, 0.25)]])
def test_each_turn_is_pruned_on_the_cache_as_a_slow_reference_prunes_it(llava64, positions, stages):
    turns = _turns(torch.float64)
    schedule = ",".join(f"{{layer: {layer}, keep: {keep}}}" for layer, keep in stages)
    overrides = [f"positions={positions}", f"schedule.stages=[{schedule}]"]
    reports = []
    with prunekit.apply(llava64, "fastv", overrides) as pruner:
        ids, starts, prompt_ends, logits = chat(llava64, turns)
        reports.append(pruner.last_report)
    images = torch.cat([t["pixel_values"] for t in turns])
    ref_logits, ref_original = conversation_reference(RefModel(llava64), ids, images, starts, prompt_ends, stages,
                                                      positions)
    # the last turn's report: its kept visual tokens, as columns of the turn's forward input
    ref_kept = ref_original[(ids[ref_original] == SHAPE.image_token_id) & (ref_original >= starts[-1])] - starts[-1]
    assert reports[0].stages[-1].kept[0].tolist() == ref_kept.tolist()
    # every answer token's logits: row j of the reference predicts token j + 1
    answer_rows = [end + i for end in prompt_ends for i in range(STEPS)]
    rows = [int(torch.nonzero(ref_original == r).flatten()[0]) for r in answer_rows]
    allowed = ref_logits[rows].clone()
    allowed[:, llava64.generation_config.eos_token_id] = -math.inf  # min_new_tokens: no end before STEPS tokens
    assert ids[[r + 1 for r in answer_rows]].tolist() == allowed.argmax(-1).tolist()
    # generate hands the logits out in float32: the float64 run agrees to float32's rounding
    torch.testing.assert_close(logits.double(), ref_logits[rows], rtol=1e-6, atol=1e-6)


def test_a_turn_on_a_cache_filled_without_pruning_is_pruned(llava64):
    """A first turn run without prunekit (say a cached system prompt and image) and a pruned second turn."""
    turns = _turns(torch.float64, seeds=(3, 4))
    first = llava64.generate(**turns[0], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, turns[1]["input_ids"][:, 1:]], dim=1)
    with prunekit.apply(llava64, "fastv") as pruner:
        llava64.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=turns[1]["pixel_values"],
                         **with_cache(llava64, cache_of(first)), max_new_tokens=2, do_sample=False)
    assert pruner.last_report.stages[0].kept_counts.tolist() == [SHAPE.visual_tokens // 2]


@pytest.mark.parametrize("recipe,message", [
    ("visionzip-64", "recipe 'visionzip-64' has a vision stage.*new visual tokens"),
    ("divprune", "recipe 'divprune' prunes before layer 0"),  # generate() counts from layer 0's shorter cache
])
def test_a_new_image_on_a_cache_the_recipe_cannot_continue_is_refused(llava64, recipe, message):
    turns = _turns(torch.float64, seeds=(3, 4))
    with prunekit.apply(llava64, recipe):
        first = llava64.generate(**turns[0], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, turns[1]["input_ids"][:, 1:]], dim=1)
        with pytest.raises(LayoutError, match=message):
            llava64.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                             pixel_values=turns[1]["pixel_values"], **with_cache(llava64, cache_of(first)))


def test_a_cache_pruned_by_another_pruner_is_refused(llava64):
    turns = _turns(torch.float64, seeds=(3, 4))
    with prunekit.apply(llava64, "fastv"):
        first = llava64.generate(**turns[0], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, turns[1]["input_ids"][:, 1:]], dim=1)
    with prunekit.apply(llava64, "fastv"), pytest.raises(LayoutError, match="pruned by another pruner"):
        llava64.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=turns[1]["pixel_values"],
                         **with_cache(llava64, cache_of(first)), max_new_tokens=2)


def test_a_later_turn_is_pruned_on_m_rope_models():
    model = tiny_family_model("qwen2_5_vl", num_layers=8, dtype=torch.float64)
    turns = [family_inputs(model, "qwen2_5_vl", seed=seed, sizes=[(24, 32)]) for seed in (1, 2)]
    visual = int((turns[1]["input_ids"] == model.config.image_token_id).sum())
    with prunekit.apply(model, "fastv") as pruner:
        first = model.generate(**turns[0], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([first.sequences, turns[1]["input_ids"][:, 1:]], dim=1)
        types = torch.cat([torch.zeros_like(first.sequences), turns[1]["mm_token_type_ids"][:, 1:]], dim=1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                             pixel_values=turns[1]["pixel_values"], image_grid_thw=turns[1]["image_grid_thw"],
                             **with_cache(model, cache_of(first)), max_new_tokens=3, min_new_tokens=3,
                             do_sample=False)
    assert pruner.last_report.stages[0].kept_counts.tolist() == [visual // 2]
    assert out.shape[1] == ids.shape[1] + 3



# ----------------------------------------------------------------------------------------------
# Every family of the matrix: a second turn with its own image, on the cache of the first
# ----------------------------------------------------------------------------------------------
FASTV_HALF = {"name": "half-at-2", "criteria": {"fastv": {"type": "fastv_attention"}},
              "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
KEEP_ALL_8 = {"name": "keep-all", "criteria": {"fastv": {"type": "fastv_attention"}},
              "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 1.0}, {"layer": 4, "keep": 1.0}]}}


def _family_chat(model, turns: list[dict], steps: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each turn one generate() on the cache of the last; returns the ids after every turn and every answer's
    logits. Token-type inputs of the earlier turns are zeros (text); each turn brings its own pixel inputs."""
    cache, ids, all_ids, all_logits = None, None, [], []
    for turn in turns:
        skip = 0 if ids is None else 1  # a later turn drops its leading <bos>
        new = turn["input_ids"] if ids is None else torch.cat([ids, turn["input_ids"][:, skip:]], dim=1)
        extra = {k: v for k, v in turn.items() if k not in ("input_ids", "attention_mask")}
        for key in [k for k in extra if k.endswith("token_type_ids")]:
            earlier = torch.zeros(1, new.shape[1] - turn[key].shape[1] + skip, dtype=turn[key].dtype)
            extra[key] = torch.cat([earlier, turn[key][:, skip:]], dim=1)
        out = model.generate(input_ids=new, attention_mask=torch.ones_like(new), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True,
                             **extra, **(with_cache(model, cache) if cache is not None else {}))
        cache, ids = cache_of(out), out.sequences
        all_ids.append(ids)
        all_logits.append(torch.stack(out.logits))
    return all_ids, all_logits


def _bare_blocks_cover_the_cache(family: str, version: tuple[int, ...]) -> bool:
    """Whether the bare model lays a later turn's bidirectional blocks over the keys as prunekit does (always
    true for families without blocks). Gemma 3's own generate() hands a later turn's forward the token types
    from the start of the conversation on transformers 5.24, but slices them to the new tokens on 5.19, and
    PaliGemma's always slices them: the mask functions index the blocks by absolute position, so the bare
    model misplaces the turn's block (its prefix), while prunekit lays it over the turn's own keys. Keep-all
    equality is checked where the bare model does the same."""
    if family == "paligemma":
        return False
    return family != "gemma3" or version >= (5, 24)


@pytest.mark.parametrize("row", [r for r in MATRIX if r.reason is None], ids=lambda r: r.family)
def test_every_family_prunes_a_later_turns_image_on_the_cache(row):
    import re

    import transformers

    version = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:3])
    if version < tuple(int(p) for p in row.min_transformers.split(".")):
        pytest.skip(f"{row.family} needs transformers >= {row.min_transformers}")
    if missing_module(row.needs):
        pytest.skip(f"{row.family}: {missing_module(row.needs)}")
    model = tiny_family_model(row.family, num_layers=8, seed=1)
    turns = [family_inputs(model, row.family, seed=seed) for seed in (3, 4)]
    with torch.no_grad():
        bare_ids, bare_logits = _family_chat(model, turns)
        with prunekit.apply(model, KEEP_ALL_8):
            ids, logits = _family_chat(model, turns)
        if _bare_blocks_cover_the_cache(row.family, version):
            assert all(torch.equal(a, b) for a, b in zip(ids, bare_ids)), row.family
            assert all(torch.equal(a, b) for a, b in zip(logits, bare_logits)), row.family
        with prunekit.apply(model, FASTV_HALF) as pruner:
            ids, _ = _family_chat(model, turns)
            report = pruner.last_report  # the second turn's
    first_turn = bare_ids[0].shape[1]
    turn_input = ids[1][0, first_turn - 1:]  # what generate passed the model in turn 2 (the last answer token first)
    visual = report.visual_tokens.tolist()
    assert report.stages[0].kept_counts.tolist() == [visual[0] // 2], row.family
    kept = report.stages[0].kept[0]
    assert visual[0] > 0 and bool((kept < turn_input.shape[0]).all())
    assert ids[1].shape[1] == bare_ids[1].shape[1]  # the pruned turn answered as many tokens


@pytest.mark.parametrize("recipe", ["pdrop", "transprune-high", "sparsevlm-64", "dart", "l2norm"])
def test_a_later_turn_keeps_the_counts_the_flops_model_predicts(llava64, recipe):
    """Multi-stage recipes, a merging one (SparseVLM's recycling) and DART on the second and third turns: each
    turn's tokens per layer are the recipe's, as for a first prefill (``prunekit flops`` counts them so)."""
    from prunekit.flops import DecoderDims, recipe_estimate

    overrides = ["reference_depth=32"] if recipe != "dart" else []
    with prunekit.apply(llava64, recipe, overrides) as pruner:
        chat(llava64, _turns(torch.float64), steps=2)
        report = pruner.last_report
    predicted = recipe_estimate(pruner.recipe, DecoderDims.from_config(llava64.config), SHAPE.visual_tokens)
    assert report.visual_tokens_per_layer[0].tolist() == predicted.visual_tokens
