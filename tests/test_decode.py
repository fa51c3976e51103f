"""Decode steps under a recipe: inputs built once per step, the pruner's clock, the static-cache refusal."""

from __future__ import annotations

import time

import pytest
import torch

import prunekit
import prunekit.engine
from conftest import SHAPE
from prunekit.errors import LayoutError
from prunekit.step import decode_layer_kwargs
from prunekit.testing import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(SHAPE, seed=2, dtype=torch.float32)


def _generate(model, inputs, steps=4, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, **kwargs)


def _decoding(model) -> bool:
    """Whether the forward now running continues a non-empty cache (a decode step)."""
    return getattr(model, "_test_decoding", False)


def _mark_decode_steps(model):
    """A model pre-hook (installed before the pruner's) noting whether each forward is a decode step."""
    def pre(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        module._test_decoding = cache is not None and cache.get_seq_length() > 0
    return model.register_forward_pre_hook(pre, with_kwargs=True)


def test_a_decode_step_builds_each_stage_inputs_once_and_every_layer_of_the_stage_gets_them(model, monkeypatch):
    inputs = llava_inputs(SHAPE, batch=3, seed=4)  # padded: every stage's mask is a tensor
    marker = _mark_decode_steps(model)
    seen: list[dict[int, tuple[int, int]]] = []  # per decode step: layer -> (id of mask, id of rotary)
    handles = []
    try:
        with prunekit.apply(model, "transprune-high") as pruner:
            stages = pruner.stage_layers
            built = []
            real = pruner.adapter.stage_kwargs

            def counting(*args, **kwargs):
                if _decoding(model):
                    built.append(args[5] if len(args) > 5 else kwargs["layer_idx"])
                return real(*args, **kwargs)

            monkeypatch.setattr(pruner.adapter, "stage_kwargs", counting)

            def grab(i):
                def hook(module, args, kwargs):
                    if _decoding(model):
                        if i == stages[0]:
                            seen.append({})
                        seen[-1][i] = (id(kwargs["attention_mask"]), id(kwargs["position_embeddings"]))
                return hook

            for i in range(stages[0], SHAPE.num_layers):  # after the pruner's hooks: the layer's final inputs
                handles.append(model.model.language_model.layers[i].register_forward_pre_hook(grab(i),
                                                                                             with_kwargs=True))
            steps = 4
            _generate(model, inputs, steps)
    finally:
        marker.remove()
        for handle in handles:
            handle.remove()
    assert len(seen) == steps - 1  # the first new token comes from the prefill
    assert built == list(stages) * (steps - 1)  # once per stage and step, at the stage's first layer
    for step in seen:
        for i in range(stages[0], SHAPE.num_layers):
            first = max(layer for layer in stages if layer <= i)
            assert step[i] == step[first], f"layer {i} did not get stage {first}'s prebuilt inputs"
        assert len({step[layer] for layer in stages}) == len(stages)


def test_sharing_a_stage_inputs_gives_what_building_them_per_layer_gives(model, monkeypatch):
    inputs = llava_inputs(SHAPE, batch=3, seed=6)
    with prunekit.apply(model, "transprune-high"):
        shared = _generate(model, inputs, 6, return_dict_in_generate=True, output_logits=True)

    def per_layer(decode, adapter, model_, key, layer_idx, hidden):  # the reference: no reuse across layers
        out = decode_layer_kwargs(decode, adapter, model_, key, layer_idx, hidden)
        del decode.layer_kwargs[key]
        return out

    monkeypatch.setattr(prunekit.engine, "decode_layer_kwargs", per_layer)
    with prunekit.apply(model, "transprune-high"):
        alone = _generate(model, inputs, 6, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(shared.sequences, alone.sequences)
    for a, b in zip(shared.logits, alone.logits):
        assert torch.equal(a, b)


def test_the_clock_times_the_hooks_of_every_decode_step_and_only_those(model):
    inputs = llava_inputs(SHAPE, batch=2, seed=1)
    marker = _mark_decode_steps(model)
    step_seconds: list[float] = []
    start = {}

    def before(module, args, kwargs):
        start["t"] = time.perf_counter()

    def after(module, args, kwargs, output):
        if _decoding(module):
            step_seconds.append(time.perf_counter() - start["t"])

    handles = [model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        with prunekit.apply(model, "transprune-high", measure=True) as pruner:
            with torch.no_grad():
                model(**inputs, use_cache=True)  # a prefill alone: no decode time
            assert pruner.clock.decode_steps == 0 and pruner.clock.decode_seconds == 0.0
            assert pruner.clock.total > 0.0
            prefill_work = pruner.clock.total
            _generate(model, inputs, steps=5)
            clock = pruner.clock
    finally:
        marker.remove()
        for handle in handles:
            handle.remove()
    assert clock.decode_steps == len(step_seconds) == 4
    assert 0.0 < clock.decode_seconds < sum(step_seconds)  # inside the steps, a part of them
    assert clock.per_decode_step == pytest.approx(clock.decode_seconds / 4)
    assert clock.total > prefill_work  # the generate's own prefill is counted in the prefill parts


@pytest.mark.parametrize("compiled", [False, True])
def test_a_static_cache_is_refused_before_any_layer_runs(compiled):
    model = tiny_llava(SHAPE, seed=3, dtype=torch.float32)
    inputs = llava_inputs(SHAPE, batch=2, seed=2)
    dynamic_bare = _generate(model, inputs)
    assert torch.equal(_generate(model, inputs, cache_implementation="static"), dynamic_bare), \
        "the bare model's static cache must work for this check to mean anything"
    if compiled:
        model.forward = torch.compile(model.forward, backend="eager")
    layer_calls = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: layer_calls.append(1))
    try:
        with prunekit.apply(model, "fastv"):
            with pytest.raises(LayoutError, match="static KV cache"):
                _generate(model, inputs, cache_implementation="static")
            assert not layer_calls
            after_error = _generate(model, inputs)  # the pruner still works with the default cache
        with prunekit.apply(model, "fastv"):
            fresh = _generate(model, inputs)
    finally:
        handle.remove()
        if compiled:
            del model.forward
    assert torch.equal(after_error, fresh)


def test_a_prepared_4d_mask_is_refused_with_its_shape(model):
    inputs = llava_inputs(SHAPE, batch=1, seed=2)
    seq = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, seq, seq)
    with prunekit.apply(model, "fastv"), torch.no_grad(), \
            pytest.raises(LayoutError, match=rf"shape \(1, 1, {seq}, {seq}\)"):
        model(**inputs)


def _llama_step_kwargs(model):
    """An adapter-side ``step_kwargs`` for a Llama decoder written out by hand: one rotary call over the
    groups' positions stacked along the batch, one causal mask per group (the reference is stage_kwargs)."""
    from transformers.masking_utils import create_causal_mask

    from prunekit.compat import MASK_CACHE_KWARG

    calls = []

    def step_kwargs(model_, hidden, masks_2d, positions, cache, layer_idxs):
        calls.append(list(layer_idxs))
        decoder = model_.model.language_model
        text = torch.cat([p[0] for p in positions])  # [groups * batch, q]
        cos, sin = decoder.rotary_emb(hidden, text)
        batch = hidden.shape[0]
        out = []
        for g, (mask_2d, p, layer) in enumerate(zip(masks_2d, positions, layer_idxs)):
            mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=mask_2d,
                                      **{MASK_CACHE_KWARG: cache}, position_ids=p[0], layer_idx=layer)
            rows = slice(g * batch, (g + 1) * batch)
            out.append({"attention_mask": mask, "position_ids": p[0], "position_embeddings": (cos[rows], sin[rows])})
        return out

    return step_kwargs, calls


def test_an_adapter_step_kwargs_builds_every_stage_in_one_call_and_decodes_as_stage_kwargs(model, monkeypatch):
    inputs = llava_inputs(SHAPE, batch=3, seed=8)
    with prunekit.apply(model, "transprune-high"):
        reference = _generate(model, inputs, 5, return_dict_in_generate=True, output_logits=True)
    with prunekit.apply(model, "transprune-high") as probe:
        adapter = probe.adapter
    step_kwargs, calls = _llama_step_kwargs(model)
    monkeypatch.setattr(adapter, "step_kwargs", step_kwargs, raising=False)
    with prunekit.apply(model, "transprune-high") as pruner:
        out = _generate(model, inputs, 5, return_dict_in_generate=True, output_logits=True)
    assert calls == [list(pruner.stage_layers)] * 4  # once per decode step, every stage's first layer
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.logits, reference.logits):
        assert torch.equal(a, b)


def test_an_adapter_step_kwargs_returning_the_wrong_count_is_named(model, monkeypatch):
    inputs = llava_inputs(SHAPE, batch=1, seed=8)
    with prunekit.apply(model, "fastv") as probe:
        adapter = probe.adapter
    monkeypatch.setattr(adapter, "step_kwargs", lambda *args: [], raising=False)
    with prunekit.apply(model, "fastv"), pytest.raises(prunekit.errors.AdapterError, match="returned 0 sets"):
        _generate(model, inputs, 3)
