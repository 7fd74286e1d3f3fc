"""The operator's caps on what one playbook may ask of the engine (docs/security.md, "Loops and iterators").

The core never reads the environment (architecture §2.2), so the caps arrive as values: the adapters read the
settings (NOETL_MAX_VISITS, NOETL_MAX_ITERATOR_ITEMS, NOETL_STEP_MAX_*; noetl_runtime.settings) and hand a
`Caps` to the loader (`load_playbook(text, caps)`) and to the fold (`advance(state, msg, caps)`).

The fold reads the caps only when it folds a start, and records them in the execution's state: every later
message of that execution, a replay after an error and a restart with other settings decide with the caps the
execution started under. So a setting changed between two starts changes the new executions only, the same in
every runtime (`noetl run`, `noetl server`, the broker of `noetl server --kafka` and of a cluster).

Where each cap is judged:
- `max_visits`: where a playbook is loaded (registration, a run's start, `noetl validate`, and the fold's own
  load of the start): a located error, so a registration is a 400 and a start in the fold fails the execution.
- `max_iterator_items`: when an iterator step shapes its collection, in the fold: that step fails.
- `step_maximums`: the largest `limits:` a python step may ask for (the worker pool's NOETL_STEP_MAX_*). Judged
  at load where the adapter knows them (registration, `noetl run`, `noetl validate`); empty in the fold, which
  does not run steps. The worker checks them again when the step runs (its pool may differ).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Defaults: what the engine allowed when these were constants. A loop's visits and an iterator's items are
# each a command and a few events held in one execution's state and log.
DEFAULT_MAX_VISITS = 10_000
DEFAULT_MAX_ITERATOR_ITEMS = 100_000
# Ceilings of the settings themselves. An iterator's items (and their results, by index) live in the execution's
# state, which is written whole after every batch: at ten million items that state is gigabytes, past what
# one execution can be given without harming the others. A step's default max_visits (100) is capped too.
CEILING_MAX_VISITS = 1_000_000
CEILING_MAX_ITERATOR_ITEMS = 10_000_000
DEFAULT_STEP_MAX_VISITS = 100

# The settings' names, for messages: the core names them (an operator must know what to change), never reads them.
MAX_VISITS_SETTING = "NOETL_MAX_VISITS"
MAX_ITERATOR_ITEMS_SETTING = "NOETL_MAX_ITERATOR_ITEMS"


def step_maximum_setting(name: str) -> str:
    return f"NOETL_STEP_MAX_{name.upper()}"


@dataclass(frozen=True)
class Caps:
    max_visits: int = DEFAULT_MAX_VISITS
    max_iterator_items: int = DEFAULT_MAX_ITERATOR_ITEMS
    # (limit name, maximum) pairs, sorted: hashable, because the loader memoises on (document, caps). Empty:
    # the maximums are not known here, the worker judges them.
    step_maximums: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name, value, ceiling in (("max_visits", self.max_visits, CEILING_MAX_VISITS),
                                     ("max_iterator_items", self.max_iterator_items, CEILING_MAX_ITERATOR_ITEMS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
                raise ValueError(f"{name} must be a whole number from 1 to {ceiling:,}, got {value!r}")

    @classmethod
    def of(cls, max_visits: int = DEFAULT_MAX_VISITS, max_iterator_items: int = DEFAULT_MAX_ITERATOR_ITEMS,
           step_maximums: Mapping[str, int] | None = None) -> Caps:
        return cls(max_visits, max_iterator_items, tuple(sorted((step_maximums or {}).items())))

    def for_fold(self) -> Caps:
        """What the fold is given and records: the step maximums are the workers' business there."""
        return Caps(self.max_visits, self.max_iterator_items) if self.step_maximums else self

    @property
    def step_max(self) -> dict[str, int]:
        return dict(self.step_maximums)


DEFAULT_CAPS = Caps()
