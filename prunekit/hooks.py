"""A set of installed hooks (and attention taps) that removes itself in one call."""

from __future__ import annotations

from typing import Any

from torch.utils.hooks import RemovableHandle

from prunekit.attention import AttentionTap, CaptureFn


class HookSet:
    """Everything one pruner (or one of its stages) installed on a model."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._taps: list[AttentionTap] = []

    def add(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def tap(self, config: Any, capture: CaptureFn) -> None:
        """Route ``config``'s attention through a capturing wrapper of its own implementation."""
        self._taps.append(AttentionTap(config, capture))

    def __len__(self) -> int:
        return len(self._handles) + len(self._taps)

    def remove(self) -> None:
        """Remove every hook and restore every tapped config, last installed first; safe to call twice."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
        for tap in reversed(self._taps):  # a tap may wrap an earlier one on the same config
            tap.close()
        self._taps.clear()
