"""What the backends share: loading each component once, refusing feeds a component does not take.

The interface itself, `Backend` with its `Component` and `Feeds`, is the runtime's (`fluxexport.runtime.backend`).
"""

from __future__ import annotations

from fluxexport.errors import FluxExportError
from fluxexport.runtime.backend import Component, Feeds


def refuse_unknown_feeds(component: str, feeds: Feeds, inputs) -> None:
    """A feed the component does not take is an error (engines would drop it or say only "invalid input")."""
    unknown = sorted(set(feeds) - set(inputs))
    if unknown:
        raise FluxExportError(f"{component} has no input {unknown[0]!r}: it takes {', '.join(inputs)}")


class LoadedComponents:
    """What the backends share: components loaded once by `_load(name)`, released by `close()` or `with`."""

    def __init__(self) -> None:
        self._components: dict[str, Component] = {}

    def _load(self, name: str) -> Component:
        raise NotImplementedError

    def component(self, name: str) -> Component:
        if name not in self._components:
            self._components[name] = self._load(name)
        return self._components[name]

    def close(self) -> None:
        """Drop every loaded component (and with it its weights, session or engine)."""
        self._components.clear()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
