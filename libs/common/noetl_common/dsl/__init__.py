"""The playbook DSL: load (parse + normalise + validate) a `noetl.io/v1` playbook.

    playbook, problems = load_playbook(yaml_text_or_dict)

`problems` holds every error and warning, each with its location path and YAML line where known;
`playbook` is None exactly when at least one problem is an error. Loading never raises on a bad document.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from .models import Edge, IteratorSpec, Playbook, Problem, RetryPolicy, SaveSpec, Step
from .normalise import normalise as normalise_document
from .validate import validate as validate_document
from .yaml_source import LineMap, line_for, parse_yaml

parse_playbook_yaml = parse_yaml   # text -> (data, {path: line}, problems)


def load_playbook(source: str | dict) -> tuple[Playbook | None, list[Problem]]:
    """YAML text (str) or an already-parsed document (dict) -> (Playbook | None, problems).

    Memoised: the broker re-reads states (and so playbooks) on every batch, and thousands of executions
    share a playbook. Callers only read the Playbook they get back; the problem list is a fresh copy.
    """
    try:
        key = source if isinstance(source, str) else json.dumps(source, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return _load(source)
    playbook, problems = _load_cached(key, isinstance(source, str))
    return playbook, list(problems)


@lru_cache(maxsize=256)
def _load_cached(key: str, is_text: bool) -> tuple[Playbook | None, tuple[Problem, ...]]:
    playbook, problems = _load(key if is_text else json.loads(key))
    return playbook, tuple(problems)


def _load(source: str | dict) -> tuple[Playbook | None, list[Problem]]:
    try:
        if isinstance(source, str):
            data, lines, problems = parse_yaml(source)
            if any(p.severity == "error" for p in problems):
                return None, problems
        else:
            data, lines, problems = source, {}, []
        playbook, found = validate_document(data, lines)
        return playbook, problems + found
    except Exception as exc:   # last line of defence: a bad document must never surface as a traceback
        return None, [Problem(path="", message=f"could not load the playbook: {type(exc).__name__}: {exc}")]


def problems_as_dicts(problems: list[Problem]) -> list[dict[str, Any]]:
    """JSON-ready problems (path, line, message, severity), e.g. for `noetl validate --json`."""
    return [p.model_dump() for p in problems]


__all__ = ["Edge", "IteratorSpec", "LineMap", "Playbook", "Problem", "RetryPolicy", "SaveSpec", "Step",
           "line_for", "load_playbook", "normalise_document", "parse_playbook_yaml", "parse_yaml",
           "problems_as_dicts", "validate_document"]
