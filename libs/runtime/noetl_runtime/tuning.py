"""Process tuning for the runtimes (never for the pure core).

The fold allocates many small, short-lived objects and keeps large execution states alive; with CPython's
default thresholds (700 allocations) the cyclic collector keeps re-traversing those states, which was
measured to cost about half of the fold's time. Raising the first threshold and freezing what exists at
startup keeps collection cheap without turning it off.
"""
from __future__ import annotations

import gc

THRESHOLDS = (50_000, 50, 100)   # allocations before a gen-0 pass; gen-0 passes per gen-1; gen-1 per gen-2


def tune_gc() -> None:
    gc.set_threshold(*THRESHOLDS)
    gc.freeze()   # modules, compiled templates and settings loaded so far are never garbage
