"""The pure fold: `advance(state, message) -> Transition`."""
from noetl_common.engine.fold import Transition, advance, fail_on_error

__all__ = ["Transition", "advance", "fail_on_error"]
