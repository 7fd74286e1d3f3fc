"""Loaded playbooks are read-only: `load_playbook` memoises what it loads and hands the same `Playbook` to
every caller (thousands of executions share one), so an edit in place by one caller (a step's `config`,
its `data`, the `workload` defaults) would leak into every later run of that playbook.

`read_only(playbook)` runs once per cache entry (nothing per call; a private copy per caller cost a third of
a short execution's fold, bench/playbook_read_only_bench.py): every dict becomes a `ReadOnlyDict` and every list
a `ReadOnlyList` (subclasses, so `isinstance(x, dict)`, rendering and JSON keep working), and the models
refuse attribute assignment. An edit raises TypeError. A caller that needs to change something takes a
copy: `dict(x)`, `list(x)`, `{**x, ...}`, `model.model_copy(update=...)`, or `plain(x)` (deep) for data it
adopts as its own, as the fold does with the `workload` and `ctx` defaults of a new execution's state.
"""
from __future__ import annotations

import weakref
from typing import Any, NoReturn

from pydantic import BaseModel


def refuse_edit(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError("a loaded playbook is shared by every run of it and cannot be changed in place: change a "
                    "copy (dict(x), list(x), model.model_copy(update=...), noetl_common.dsl.read_only.plain(x))")


class ReadOnlyDict(dict):
    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = refuse_edit  # type: ignore

    def __reduce_ex__(self, _protocol: Any) -> tuple:   # copy.copy, copy.deepcopy and pickle: a plain dict
        return dict, (dict(self),)


class ReadOnlyList(list):
    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = refuse_edit  # type: ignore
    append = extend = insert = remove = pop = clear = sort = reverse = refuse_edit  # type: ignore

    def __reduce_ex__(self, _protocol: Any) -> tuple:
        return list, (list(self),)


# Sealed models by id (pydantic models are not hashable); the weak reference drops the entry when the model
# goes (an evicted cache entry), so a new model that reuses the id is not taken for a sealed one.
_SEALED: dict[int, weakref.ref] = {}


def sealed(model: BaseModel) -> bool:
    ref = _SEALED.get(id(model))
    return ref is not None and ref() is model


def _seal(model: BaseModel) -> None:
    key = id(model)
    _SEALED[key] = weakref.ref(model, lambda _gone: _SEALED.pop(key, None))


def read_only(value: Any) -> Any:
    """`value` with every container replaced by its read-only form; models are changed in place and sealed."""
    if isinstance(value, BaseModel):
        fields = value.__dict__
        for name, field_value in fields.items():
            fields[name] = read_only(field_value)
        _seal(value)
        return value
    if isinstance(value, dict):
        return ReadOnlyDict((k, read_only(v)) for k, v in value.items())
    if isinstance(value, list):
        return ReadOnlyList(read_only(v) for v in value)
    return value


def plain(value: Any) -> Any:
    """A deep, mutable copy of read-only data (plain dicts and lists all the way down)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
