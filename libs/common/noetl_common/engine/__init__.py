"""The pure fold: `advance(state, message) -> Transition`."""
from noetl_common.engine.fold import Transition, advance

__all__ = ["Transition", "advance"]
