"""State that waits for a good step: computed from the current step's forward, applied only once
the step is known to be finite (dinov2 updates its centre the same way). Methods list such
state in ``BaseMethod.deferred_updates()``; ``BaseMethod`` commits every one after backward and
discards every one when the step is skipped, so no update of a skipped step is ever applied and
none is undone by hand."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class DeferredUpdate(Protocol):
    def commit(self) -> bool:
        """Apply the pending update (False when there was none)."""
        ...

    def discard(self) -> None:
        """Drop the pending update."""
        ...
