"""Built-in criteria (TTV, accumulated TTV, IGA, attention, FastV, random, video frames) and combiners."""

from __future__ import annotations

from prunekit.api import Criterion, Merger
from prunekit.hookspecs import hookimpl

from .attention import IGA, Attention, FastVAttention, PDropAttention
from .cdpruner import CDPruner
from .dart import DART
from .diversity import DivPrune, L2Norm, Redundancy
from .fastvid import FastVID, FastVIDMerge
from .holitom import HoliTom, HoliTomMerge
from .mustdrop import MustDropDualAttention, MustDropMerge, MustDropWindows
from .pooling import GridPool, Uniform
from .prunevid import PruneVid, PruneVidMerge
from .random import RandomScore
from .sparsevlm import SparseVLMRaters, SparseVLMRecycling
from .tome import ToMeMerge
from .ttv import TTV, AccumulatedTTV
from .video import DyCokeTTM, FrameDifference, UniformFrames
from .visionzip import VisionZipContextual, VisionZipDominant, VisionZipReceived, VisionZipTargets
from .vispruner import ClsAttention, VisPruner

BUILTIN_CRITERIA: list[type[Criterion]] = [
    TTV, AccumulatedTTV, IGA, Attention, FastVAttention, PDropAttention, SparseVLMRaters, DivPrune, Redundancy,
    L2Norm, RandomScore, VisionZipDominant, Uniform, ClsAttention, VisPruner,
    CDPruner, DART, MustDropWindows, UniformFrames, FrameDifference, DyCokeTTM, FastVID,
    HoliTom, PruneVid, VisionZipReceived, MustDropDualAttention,
]
BUILTIN_MERGERS: list[type[Merger]] = [
    SparseVLMRecycling, VisionZipContextual, GridPool, ToMeMerge, MustDropMerge, FastVIDMerge,
    HoliTomMerge, PruneVidMerge, VisionZipTargets,
]


@hookimpl
def prunekit_add_criteria() -> list[type[Criterion]]:
    return list(BUILTIN_CRITERIA)


@hookimpl
def prunekit_add_mergers() -> list[type[Merger]]:
    return list(BUILTIN_MERGERS)
