"""Deep merge of workloads and step data (DSL §1)."""
from __future__ import annotations

from typing import Any


def deep_merge(base: Any, override: Any) -> Any:
    """Dicts merge recursively; anything else in `override` (scalars, lists) wins. Inputs are not mutated."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override
