"""prunekit: training-free visual token pruning for Hugging Face vision-language models.

    import prunekit
    with prunekit.apply(model, "transprune-high") as pruner:
        out = model.generate(**inputs, max_new_tokens=32)
    pruner.last_report.stages[0].kept
"""

from prunekit.api import Adapter, Combiner, Criterion, ForwardContext, LayerInputCriterion, Merger, Schedule, Stage
from prunekit.engine import Pruner, apply
from prunekit.errors import (
    AdapterError,
    LayoutError,
    PluginError,
    PrunekitError,
    PrunerStateError,
    RecipeError,
)
from prunekit.hookspecs import hookimpl
from prunekit.plugins import get_registry, register_plugin, unregister_plugin
from prunekit.layout import TokenLayout
from prunekit.probes import (AttentionRows, DecoderKeys, LayerInput, ModuleIO, VisionAttention,
                             VisionAttentionReceived, VisionFeatures, VisionHidden, VisionKeys)
from prunekit.recipe import Recipe, builtin_recipe_names, load_recipe
from prunekit.report import PruneReport, StageReport

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterError", "AttentionRows", "Combiner", "Criterion", "DecoderKeys", "ForwardContext", "LayerInput",
    "LayerInputCriterion", "LayoutError", "Merger", "ModuleIO", "PluginError", "PruneReport", "Pruner", "PrunekitError",
    "PrunerStateError", "Recipe", "RecipeError", "Schedule", "Stage", "StageReport", "TokenLayout", "VisionAttention",
    "VisionAttentionReceived", "VisionFeatures", "VisionHidden", "VisionKeys", "apply", "builtin_recipe_names",
    "get_registry", "hookimpl", "load_recipe", "register_plugin", "unregister_plugin",
]
