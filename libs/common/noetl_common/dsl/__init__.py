"""The playbook DSL: load (parse + detect the dialect + normalise + validate) a NoETL playbook.

    playbook, problems = load_playbook(yaml_text_or_dict)            # judged against the default caps
    playbook, problems = load_playbook(yaml_text_or_dict, caps)      # against the operator's (noetl_common.caps)

`problems` holds every error and warning, each with its location path and YAML line where known;
`playbook` is None exactly when at least one problem is an error. Loading never raises on a bad document.
A document in a later NoETL dialect (v2, v10: `dialect.py`) goes to the second front end (`v10.py`), never
half-read as v1.
"""
from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from noetl_common.caps import DEFAULT_CAPS, Caps

from .dialect import Dialect, detect_dialect
from .models import Edge, IteratorSpec, Playbook, Problem, RetryPolicy, SaveSpec, Step
from .normalise import normalise as normalise_document
from .read_only import read_only
from .v10 import normalise_v10
from .validate import Issues, locate
from .validate import identity as playbook_identity
from .validate import validate as validate_document
from .yaml_source import MAX_DOCUMENT_DEPTH, LineMap, line_for, nested_too_deeply, parse_yaml

parse_playbook_yaml = parse_yaml   # text -> (data, {path: line}, problems)


def load_playbook(source: str | dict, caps: Caps = DEFAULT_CAPS) -> tuple[Playbook | None, list[Problem]]:
    """YAML text (str) or an already-parsed document (dict) -> (Playbook | None, problems), judged against
    `caps` (the operator's, passed in by the adapter; the core reads no setting).

    Memoised: the broker re-reads states (and so playbooks) on every batch, and thousands of executions
    share a playbook. So the Playbook is read-only (read_only.py: an edit in place raises TypeError instead
    of leaking into later runs); the problem list is a fresh copy.
    """
    try:
        key = source if isinstance(source, str) else json.dumps(source, sort_keys=True, default=str)
    except RecursionError:   # nested past what json can walk; shallower ones are judged by _load (cache miss)
        return None, [_too_deep()]
    except (TypeError, ValueError):
        playbook, found = _load(source, caps)
        return read_only(playbook), found
    playbook, problems = _load_cached(key, isinstance(source, str), caps)
    return playbook, list(problems)


@lru_cache(maxsize=256)
def _load_cached(key: str, is_text: bool, caps: Caps) -> tuple[Playbook | None, tuple[Problem, ...]]:
    playbook, problems = _load(key if is_text else json.loads(key), caps)
    return read_only(playbook), tuple(problems)


def _load(source: str | dict, caps: Caps = DEFAULT_CAPS) -> tuple[Playbook | None, list[Problem]]:
    try:
        if isinstance(source, str):
            data, lines, problems = parse_yaml(source)
            if any(p.severity == "error" for p in problems):
                return None, problems
        else:
            data, lines, problems = source, {}, []
        if nested_too_deeply(data):   # before anything below walks it recursively
            return None, [_too_deep()]
        dialect = detect_dialect(data)
        if dialect.name in ("v2", "v10"):
            return problems_v10(data, dialect, lines, problems, caps)
        playbook, found = validate_document(data, lines, caps)
        return playbook, problems + found
    except Exception as exc:   # last line of defence: a bad document must never surface as a traceback
        return None, [Problem(path="", message=f"could not load the playbook: {type(exc).__name__}: {exc}")]


def _too_deep() -> Problem:
    return Problem(path="", message=f"the document is nested too deeply (more than {MAX_DOCUMENT_DEPTH} levels)")


def problems_v10(data: dict, dialect: Dialect, lines: LineMap, problems: list[Problem], caps: Caps = DEFAULT_CAPS
                 ) -> tuple[Playbook | None, list[Problem]]:
    """The second front end (dsl/v10.py): a v2/v10 document is read only by it, never half as v1."""
    issues = Issues(caps)
    if dialect.type_step:
        issues.error(dialect.type_step, f"this document mixes v1 'type:' steps ({dialect.type_step}) with NoETL "
                                        f"DSL {dialect.name} steps ({dialect.reason}): use one dialect (V10-1.1)")
        return None, problems + locate(issues.problems, lines)
    playbook = normalise_v10(data, dialect.name, issues)
    found = locate(issues.problems, lines)
    if any(p.severity == "error" for p in found):
        return None, problems + found
    return playbook, problems + found


def unsupported_dialect(dialect: Dialect, lines: LineMap) -> Problem:
    """The one error for a document in a dialect this engine does not run yet (no other problem is
    reported: checking it against v1 rules would only list symptoms of reading it as the wrong dialect)."""
    mixed = f"; it also has a v1 'type:' step at {dialect.type_step}" if dialect.type_step else ""
    return Problem(path=dialect.path, line=line_for(lines, dialect.path),
                   message=f"NoETL DSL {dialect.name} is not supported yet: this playbook is written in it "
                           f"({dialect.reason}{mixed}); this engine runs the v1 dialect (steps with 'type:', "
                           f"'next:' lists)")


def problems_as_dicts(problems: list[Problem]) -> list[dict[str, Any]]:
    """JSON-ready problems (path, line, message, severity), e.g. for `noetl validate --json`."""
    return [p.model_dump() for p in problems]


__all__ = ["Dialect", "Edge", "IteratorSpec", "LineMap", "Playbook", "Problem", "RetryPolicy", "SaveSpec", "Step",
           "detect_dialect", "line_for", "load_playbook", "normalise_document", "parse_playbook_yaml", "parse_yaml",
           "playbook_identity", "problems_as_dicts", "unsupported_dialect", "validate_document"]
