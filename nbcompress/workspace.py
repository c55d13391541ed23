"""The histories of one IPython shell, by variable name."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .history import History


class Workspace:
    """Histories by variable name (what the magics keep per IPython shell)."""

    def __init__(self):
        self.histories: dict[str, History] = {}

    def get(self, name: str) -> History | None:
        return self.histories.get(name)

    @contextmanager
    def transaction(self, name: str, model: nn.Module, **settings):
        """The history of ``name`` (created for ``model`` if it has none) inside one transaction:
        if the block fails, the history is as it was, and one created here is dropped again."""
        h = self.histories.get(name)
        created = h is None
        if created:
            h = History(model, name=name, **settings)
            self.histories[name] = h
        try:
            with h.transaction():
                if not created:
                    h.observe(model)
                yield h
        except BaseException:
            if created:
                self.histories.pop(name, None)
                h.close()
            raise

    def clear(self) -> None:
        for h in self.histories.values():
            h.close()
        self.histories.clear()
