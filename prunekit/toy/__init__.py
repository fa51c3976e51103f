"""The built-in default: a synthetic visual question task and a small LLaVA trained on it.

``prunekit run`` and ``prunekit eval`` use it when no model is given: a real
``LlavaForConditionalGeneration`` (CLIP-style tower, MLP projector, 16-layer Llama decoder) whose
weights and tokenizer ship with the package, so the main job runs offline on a CPU.
"""

from prunekit.toy.task import Question, ToyTask

__all__ = ["Question", "ToyTask"]
