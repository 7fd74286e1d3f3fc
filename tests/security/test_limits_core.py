"""Issue 9 scope 5: caps on max_visits (at load, a located error) and on iterator sizes (in the core: the
step fails with a clear error, the execution and the others go on)."""
from __future__ import annotations

import pytest

from noetl_common.dsl import load_playbook
from noetl_common.dsl.normalise import MAX_VISITS_LIMIT
from noetl_common.engine.errors import StepError
from noetl_common.engine.iterator import MAX_ITERATOR_ITEMS, shape


def playbook(max_visits: int) -> str:
    return ("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: v, path: limits/visits}\nworkflow:\n"
            f"  - step: start\n    next: [{{step: loop}}]\n  - step: loop\n    max_visits: {max_visits}\n"
            "    next: [{step: end}]\n  - step: end\n")


def test_max_visits_over_the_cap_is_a_located_error():
    book, problems = load_playbook(playbook(MAX_VISITS_LIMIT + 1))
    errors = [p for p in problems if p.severity == "error"]
    assert book is None and errors and "max_visits must be <=" in errors[0].message and errors[0].line == 8


def test_max_visits_at_the_cap_is_valid():
    book, problems = load_playbook(playbook(MAX_VISITS_LIMIT))
    assert book is not None, problems


def iterator_spec(collection: str):
    from noetl_common.dsl.models import IteratorSpec
    # shape() reads collection/element/where/order_by/limit/chunk only; the task is not needed here
    return IteratorSpec.model_construct(collection=collection, element="x", where=None, order_by=None,
                                        limit=None, chunk=None)


def test_an_iterator_over_the_cap_fails_its_step_with_a_clear_error():
    with pytest.raises(StepError) as err:
        shape(iterator_spec("{{ range(100000) | list + range(10) | list }}"), {})
    assert f"over the limit of {MAX_ITERATOR_ITEMS:,}" in str(err.value)


def test_an_iterator_at_the_cap_is_shaped():
    assert len(shape(iterator_spec("{{ range(100000) | list }}"), {})) == MAX_ITERATOR_ITEMS
