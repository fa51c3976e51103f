"""Methods researchers compare against (pooling, VisPruner, FasterVLM, CDPruner), each recomputed another way."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from conftest import SHAPE576
from criteria_helpers import embeddings_with_images, inputs576
from prunekit.flops import DecoderDims, recipe_estimate

NEW_RECIPES = ["pooling-144", "pooling-64", "fastervlm-64", "fastervlm-128", "vispruner-64", "vispruner-128",
               "cdpruner-64", "cdpruner-128", "tome-144", "tome-64", "dart", "mustdrop-192"]


_inputs = inputs576
_embeddings = embeddings_with_images


def _visual(inputs, row=0):
    return inputs["input_ids"][row] == SHAPE576.image_token_id


@pytest.mark.parametrize("name", NEW_RECIPES)
def test_new_recipe_runs_through_generate_with_the_flops_models_counts(llava576, name):
    inputs = _inputs(batch=2, seed=11)
    with prunekit.apply(llava576, name) as pruner, torch.no_grad():
        out = llava576.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert name in prunekit.builtin_recipe_names()
    predicted = recipe_estimate(prunekit.load_recipe(name), DecoderDims.from_config(llava576.config), 576).visual_tokens
    for row in range(2):
        assert pruner.last_report.visual_tokens_per_layer[row].tolist() == predicted


# -- pooling ----------------------------------------------------------------------------------------------
def _pool_loop(tokens, side, size):
    """Average pooling written as loops over adaptive windows: [side*side, dim] -> [size*size, dim]."""
    out = []
    for i in range(size):
        r0, r1 = (i * side) // size, math.ceil((i + 1) * side / size)
        for j in range(size):
            c0, c1 = (j * side) // size, math.ceil((j + 1) * side / size)
            cells = [tokens[r * side + c] for r in range(r0, r1) for c in range(c0, c1)]
            out.append(sum(cells) / len(cells))
    return torch.stack(out)


@pytest.mark.parametrize("name,size", [("pooling-144", 12), ("pooling-64", 8)])
def test_pooling_equals_the_bare_model_on_a_hand_pooled_prompt(llava576, name, size):
    """Pooled prefill logits equal the bare model run on embeddings with the image replaced by its pooled grid."""
    inputs = _inputs(seed=12)
    visual = _visual(inputs)
    with torch.no_grad():
        embeds = _embeddings(llava576, inputs)[0]
        pooled = _pool_loop(embeds[visual], 24, size)
        first = int(visual.nonzero()[0])
        short = torch.cat([embeds[:first], pooled, embeds[first + 576:]])[None]
        expected = llava576(inputs_embeds=short, attention_mask=torch.ones(short.shape[:2], dtype=torch.long)).logits
        with prunekit.apply(llava576, name) as pruner:
            logits = llava576(**inputs).logits
    assert logits.shape[1] == short.shape[1]  # the logits follow the shortened sequence
    torch.testing.assert_close(logits[0, -1], expected[0, -1], rtol=1e-9, atol=1e-9)
    assert pruner.last_report[0].merged_counts.tolist() == [size * size]


def test_pooling_rejects_a_grid_that_is_not_square(llava64, single_inputs64):
    """36 tokens pool (6x6); a 7x7 target is larger than the grid and is named in the error."""
    recipe = prunekit.load_recipe("pooling-64", ["merge.size=7"])
    with pytest.raises(ValueError, match="size 7 is larger than the 6x6"), prunekit.apply(llava64, recipe):
        llava64(**single_inputs64)
    from prunekit.criteria.pooling import grid_side

    with pytest.raises(ValueError, match="square patch grid, got 35"):
        grid_side(35)


# -- FasterVLM and VisPruner (before the projector) -------------------------------------------------------
def _tower_reference(eager, inputs):
    """Eager vision tower: the CLS row of layer -2's attention (mean over heads) and layer -2's patch states."""
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    attention = out.attentions[-2][0].mean(0)[0, 1:]  # [576]
    return attention, out.hidden_states[-2][0][1:]  # [576], [576, dim]


def _vispruner_loop(attention, features, keep, ratio, step=8):
    """The official selection with Python lists: important by attention, then rounds of a/b matching."""
    n = len(attention)
    order = sorted(range(n), key=lambda i: (-float(attention[i]), i))
    important_n = int(keep * ratio)
    diverse_n = keep - important_n
    important, residual = order[:important_n], order[important_n:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse_n > 0:
        r = min(step, len(residual) - diverse_n)
        if r <= 0:
            break
        a, b = residual[0::2], residual[1::2]
        best = (unit[a] @ unit[b].T).max(dim=1).values.tolist()  # each a's most similar b
        ranked = sorted(range(len(a)), key=lambda k: (-best[k], k))
        residual = [a[k] for k in ranked[r:]] + b
    return important, residual[:diverse_n]


@pytest.mark.parametrize("keep", [64, 128])
def test_fastervlm_keeps_the_top_cls_attention_patches(llava576, llava576_eager, keep):
    inputs = _inputs(seed=13)
    with prunekit.apply(llava576, f"fastervlm-{keep}"), torch.no_grad():
        features = llava576.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    attention, hidden = _tower_reference(llava576_eager, inputs)
    kept = sorted(sorted(range(576), key=lambda i: -float(attention[i]))[:keep])
    with torch.no_grad():
        expected = llava576.model.multi_modal_projector(hidden[kept][None])[0]
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)  # eager vs sdpa tower


@pytest.mark.parametrize("keep", [64, 128])
def test_vispruner_matches_the_official_selection(llava576, llava576_eager, keep):
    inputs = _inputs(seed=14)
    with prunekit.apply(llava576, f"vispruner-{keep}") as pruner, torch.no_grad():
        llava576(**inputs)
        features = llava576.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    attention, hidden = _tower_reference(llava576_eager, inputs)
    important, diverse = _vispruner_loop(attention, hidden, keep, 0.5)
    assert len(important) == keep // 2 and len(diverse) == keep - keep // 2
    kept = sorted(important + diverse)
    first = int(_visual(inputs).nonzero()[0])
    assert pruner.last_report[0].kept[0].tolist() == [first + i for i in kept]
    with torch.no_grad():
        expected = llava576.model.multi_modal_projector(hidden[kept][None])[0]
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)  # eager vs sdpa tower


# -- CDPruner -------------------------------------------------------------------------------------------
def _relevance_loop(visual, text):
    """Mean over text tokens of -cos, min-max normalised with the official +1e-6: one value per visual token."""
    raw = []
    for v in visual:
        cosines = [float(v @ t) / float(v.norm() * t.norm()) for t in text]
        raw.append(-sum(cosines) / len(cosines))
    low, high = min(raw), max(raw)
    return [(r - low + 1e-6) / (high - low) for r in raw]


def _dpp_by_determinants(kernel, picks):
    """Greedy MAP by its definition: each step adds the token that maximises det(L[S + j]) (first on ties)."""
    n = kernel.shape[0]
    chosen = []
    for _ in range(picks):
        rest = [j for j in range(n) if j not in chosen]
        sets = torch.tensor([chosen + [j] for j in rest])  # [candidates, |S| + 1]
        dets = torch.linalg.det(kernel[sets[:, :, None], sets[:, None, :]])
        chosen.append(rest[int(dets.argmax())])
    return chosen


@pytest.mark.parametrize("theta", [1.0, 0.5])
def test_cdpruner_keeps_the_greedy_conditional_dpp_subset(llava576, theta):
    inputs = _inputs(seed=15)
    recipe = prunekit.load_recipe("cdpruner-64", ["schedule.stages=[{layer: 0, count: 16}]",
                                                  f"criteria.cdpruner.theta={theta}"])
    with prunekit.apply(llava576, recipe) as pruner, torch.no_grad():
        llava576(**inputs)
    visual = _visual(inputs)
    positions = visual.nonzero().flatten()
    with torch.no_grad():
        embeds = _embeddings(llava576, inputs)[0]
    instruction = embeds[int(positions[-1]) + 1:]  # the prompt after the image
    features = embeds[visual]
    relevance = torch.tensor(_relevance_loop(features, instruction), dtype=torch.float64)
    if theta < 1:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    unit = features / features.norm(dim=-1, keepdim=True)
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    expected = sorted(positions[_dpp_by_determinants(kernel, 16)].tolist())
    assert pruner.last_report[0].kept[0].tolist() == expected


# -- ToMe-style merging ---------------------------------------------------------------------------------
def _tome_loop(tokens, target):
    """Bipartite soft matching rounds with Python lists of (sum of members, size, representative index)."""
    items = [(t.clone(), 1.0, i) for i, t in enumerate(tokens)]
    while len(items) > target:
        n = len(items)
        r = min(n - target, n // 2)
        a, b = items[0::2], items[1::2]
        means = [s / z for s, z, _ in items]
        units = [m / m.norm() for m in means]
        b_units = torch.stack(units[1::2])
        best = []
        for k in range(len(a)):
            sims = (b_units @ units[2 * k]).tolist()  # this a against every b
            best.append((max(sims), sims.index(max(sims))))
        order = sorted(range(len(a)), key=lambda k: (-best[k][0], k))
        merged_a = set(order[:r])
        b = [list(x) for x in b]
        for k in order[:r]:
            j = best[k][1]
            b[j][0] = b[j][0] + a[k][0]
            b[j][1] = b[j][1] + a[k][1]
        survivors = [a[k] for k in range(len(a)) if k not in merged_a] + [tuple(x) for x in b]
        items = sorted(survivors, key=lambda item: item[2])
    return torch.stack([s / z for s, z, _ in items])


@pytest.mark.parametrize("name,target", [("tome-144", 144), ("tome-64", 64)])
def test_tome_equals_the_bare_model_on_a_hand_merged_prompt(llava576, name, target):
    inputs = _inputs(seed=16)
    visual = _visual(inputs)
    with torch.no_grad():
        embeds = _embeddings(llava576, inputs)[0]
        merged = _tome_loop(embeds[visual] * 1.0, target)  # sums start as the tokens themselves
        first = int(visual.nonzero()[0])
        short = torch.cat([embeds[:first], merged, embeds[first + 576:]])[None]
        expected = llava576(inputs_embeds=short, attention_mask=torch.ones(short.shape[:2], dtype=torch.long)).logits
        with prunekit.apply(llava576, name) as pruner:
            logits = llava576(**inputs).logits
    assert pruner.last_report[0].merged_counts.tolist() == [target]
    torch.testing.assert_close(logits[0, -1], expected[0, -1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cdpruner-64", "tome-64"])
def test_a_sample_gets_the_same_tokens_alone_or_in_a_padded_batch(llava576, name):
    """Relevance is normalised per sample (not over the batch) and merging is per image."""
    from conftest import unpad

    inputs = _inputs(batch=2, seed=17)
    assert not bool(inputs["attention_mask"].all())  # the batch is padded
    with prunekit.apply(llava576, name) as pruner, torch.no_grad():
        batched = llava576(**inputs).logits[:, -1]
        report = pruner.last_report
        for row in range(2):
            alone = llava576(**unpad(inputs, row)).logits[0, -1]
            torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)  # padded sdpa noise
            kept_alone = pruner.last_report[0].kept[0]
            pad = int((inputs["attention_mask"][row] == 0).sum())
            kept = report[0].kept[row]
            assert (kept[kept >= 0] - pad).tolist() == kept_alone[kept_alone >= 0].tolist()
