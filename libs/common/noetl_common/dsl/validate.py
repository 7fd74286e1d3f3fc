"""Checks on a playbook document and its normalised steps (DSL §1): every problem at once, located.

`validate(doc, lines)` runs the header checks, `normalise` (which reports what it cannot convert), the
cross-step checks (start, duplicates, next targets), the per-kind requirements, every template's syntax
and the warnings for keys that do not apply, then attaches YAML lines from the location map. The small
coercion helpers live here too, because they are where value problems get reported.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

from noetl_common.caps import DEFAULT_CAPS, Caps, step_maximum_setting
from noetl_common.render import syntax_error

from .models import ACTION_TYPES, CONTROL_TYPES, Edge, Playbook, Problem, SaveSpec, Step
from .yaml_source import LineMap, line_for

API_VERSION = re.compile(r"noetl\.io/v\d+")
DATA_KEYS = ("params", "args", "with", "data")                      # later wins
AUTH_KEYS = ("auth", "credential", "credentials")
CODE_KEYS = ("code", "code_b64", "code_base64")
SQL_KEYS = ("command", "commands", "sql", "query")
COMMON_KEYS = frozenset({"step", "desc", "description", "type", *DATA_KEYS, "next", "save", "retry", "timeout",
                         "assert", *AUTH_KEYS, "max_visits", "result", "loop"})
SAVE_KEYS = frozenset({"storage", "type", "data", "args", "name", "table", "mode", "key", "keys", *AUTH_KEYS,
                       "url", "endpoint", "method", "headers", *CODE_KEYS, "script", "command", "commands",
                       "sql", "statement", "database"})
KIND_KEYS: dict[str | None, frozenset[str]] = {
    None: frozenset(),
    "python": frozenset({*CODE_KEYS, "limits"}),
    "http": frozenset({"endpoint", "url", "method", "headers"}),
    "postgres": frozenset({*SQL_KEYS, "database"}),
    "duckdb": frozenset({*SQL_KEYS, "database"}),
    "playbook": frozenset({"path", "resource_path", "playbook_path", "version", "return_step"}),
    "iterator": frozenset({"collection", "in", "element", "mode", "concurrency", "where", "order_by", "limit",
                           "chunk", "task", "enumerate"}),
    "save": SAVE_KEYS - {"type"},
}
# Keys that only make sense on a step that runs an action, with the type that runs them: on a step without
# an action type they are errors (the step would run nothing), not ignored keys.
ACTION_KEYS = {**{k: "type: python" for k in (*CODE_KEYS, "script")},
               **{k: "type: postgres or type: duckdb" for k in SQL_KEYS},
               "endpoint": "type: http", "url": "type: http",
               **{k: "type: playbook" for k in ("path", "resource_path", "playbook_path", "return_step")},
               "collection": "type: iterator", "tool": ""}
CONTROL_ONLY = ("timeout", "assert", "auth")            # meaningless on a step that runs no action
NOT_IN_TASK = frozenset({"next", "result", "max_visits"})   # an iterator task is not a workflow node
RESERVED_NAMES = frozenset({"workload", "execution_id", "parent_execution_id", "vars", "secret", "env",
                            "result", "this", "data", "_loop", "index"})
NEVER_RENDERED = frozenset({*CODE_KEYS, "script"})
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
TEMPLATE_BUDGET = 200_000                                # strings/containers visited (guards alias bombs)


class Issues:
    """Collects problems with their location paths; `locate` attaches the lines. Carries the operator's caps
    the document is judged against (noetl_common.caps), so every check that needs one finds it here."""

    def __init__(self, caps: Caps = DEFAULT_CAPS) -> None:
        self.problems: list[Problem] = []
        self.caps = caps

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path=path, message=message))

    def warn(self, path: str, message: str) -> None:
        self.problems.append(Problem(path=path, message=message, severity="warning"))

    @property
    def error_count(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")


def validate(doc: Any, lines: LineMap | None = None, caps: Caps = DEFAULT_CAPS
             ) -> tuple[Playbook | None, list[Problem]]:
    """The Playbook (None when there is any error) and every problem, errors and warnings."""
    from .normalise import assemble, normalise_steps, workflow_key   # normalise imports this module
    issues, lines = Issues(caps), lines or {}
    if not isinstance(doc, dict):
        issues.error("", f"a playbook must be a mapping, got {type(doc).__name__}")
        return None, locate(issues.problems, lines)
    key = workflow_key(doc)
    check_header(doc, key, issues)
    steps = normalise_steps(doc, issues)
    check_steps(steps, key, issues)
    check_keys(doc.get(key), steps, issues)
    check_templates(doc, key, steps, issues)
    for step in steps:
        for each in _with_tasks(step):
            each.line = line_for(lines, each.path)
    problems = locate(issues.problems, lines)
    if any(p.severity == "error" for p in problems):
        return None, problems
    return assemble(doc, steps), problems


def locate(problems: list[Problem], lines: LineMap) -> list[Problem]:
    located = [p if p.line is not None else p.model_copy(update={"line": line_for(lines, p.path)})
               for p in problems]
    return sorted(located, key=lambda p: p.line or 0)


def check_header(doc: dict, key: str, issues: Issues) -> None:
    api = doc.get("apiVersion")
    if api is None:
        issues.error("apiVersion", "apiVersion is required (noetl.io/v1)")
    elif not isinstance(api, str) or not API_VERSION.fullmatch(api):
        issues.error("apiVersion", f"invalid apiVersion {api!r} (expected noetl.io/v<N>, e.g. noetl.io/v1)")
    if doc.get("kind") != "Playbook":
        issues.error("kind", "kind is required: Playbook" if doc.get("kind") is None
                     else f"invalid kind {doc.get('kind')!r} (expected Playbook)")
    meta = doc.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        issues.error("metadata", "metadata must be a mapping with name and path")
    elif meta is None and not any(_text(doc.get(field)) for field in ("name", "path")):
        issues.error("metadata", "metadata is required: a mapping with name and path")
    else:
        meta = meta or {}
        for field in ("name", "path"):
            if _text(meta.get(field)):
                if field in doc:
                    issues.warn(field, f"top-level '{field}' is ignored: metadata.{field} is used")
            elif _text(doc.get(field)):   # the reference's catalog accepts this form (12 of its 21 examples)
                issues.warn(field, f"top-level '{field}' belongs under metadata: (metadata.{field}); accepted")
            else:
                issues.error(f"metadata.{field}", f"metadata.{field} is required (a non-empty string), "
                                                  f"got {meta.get(field)!r}")
    if doc.get("workload") is not None and not isinstance(doc["workload"], dict):
        issues.error("workload", "workload must be a mapping")
    if "workflow" in doc and "steps" in doc:
        issues.error("steps", "both workflow and steps are given (steps is an alias of workflow): keep one")
    workflow = doc.get(key)
    if workflow is None:
        issues.error("workflow", "workflow is required: a list of steps starting at 'start'")
    elif not isinstance(workflow, list):
        issues.error(key, f"{key} must be a list of steps, got {type(workflow).__name__}")
    elif not workflow:
        issues.error(key, f"{key} is empty: it needs at least a 'start' step")
    entries, seen = doc.get("workbook"), {}
    if entries is not None and not isinstance(entries, list):
        issues.error("workbook", "workbook must be a list of named actions")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            issues.error(f"workbook[{i}]", "a workbook entry must be a mapping with a name and a type")
        elif name in seen:
            issues.error(f"workbook[{i}].name", f"duplicate workbook entry '{name}' (first at {seen[name]})")
        else:
            seen[name] = f"workbook[{i}]"


def identity(doc: dict) -> tuple[str, str]:
    """(name, path) of the playbook: `metadata.name`/`metadata.path`, else the top-level keys."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name, path = (meta.get(f) if _text(meta.get(f)) else doc.get(f) for f in ("name", "path"))
    return str(name or ""), str(path or "")


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_steps(steps: list[Step], key: str, issues: Issues) -> None:
    """Duplicates, `start`, next targets (then/else included) and each kind's required keys."""
    first: dict[str, str] = {}
    for step in steps:
        if step.name in first:
            issues.error(f"{step.path}.step", f"duplicate step name '{step.name}' (first defined at "
                                              f"{first[step.name]})")
        elif step.name:
            first[step.name] = step.path
            if step.name in RESERVED_NAMES:
                issues.warn(f"{step.path}.step", f"step name '{step.name}' hides the template name '{step.name}'")
    if steps and "start" not in first:
        issues.error(key, "no step named 'start': a workflow begins at its start step")
    for step in steps:
        for edge in _edges(step.next):
            if edge.step is not None and edge.step not in first:
                issues.error(f"{edge.path}.step", f"next target '{edge.step}' is not a step of this workflow")
        for each in _with_tasks(step):
            _check_action(each, issues)


# The resource limits a python step may ask for in `limits:` (docs/security.md "Limits"). Their defaults
# and maximums are the worker's settings (NOETL_STEP_*, NOETL_STEP_MAX_*). The load checks the shape, and the
# maximums when the adapter that loads the playbook passed them in (`Caps.step_maximums`: registration,
# `noetl run`, `noetl validate`); the worker checks the maximum of the pool that runs the step again.
STEP_LIMITS = ("memory_mb", "cpu_seconds", "processes", "open_files", "file_size_mb")


def check_limits(limits: Any, path: str, issues: Issues) -> None:
    maximums = issues.caps.step_max
    if not isinstance(limits, dict):
        issues.error(path, f"limits must be a mapping of {', '.join(STEP_LIMITS)}")
        return
    for name, value in limits.items():
        if name not in STEP_LIMITS:
            issues.error(f"{path}.{name}", f"unknown limit {name!r} (known: {', '.join(STEP_LIMITS)})")
        elif isinstance(value, str) and ("{{" in value or "{%" in value):
            continue   # rendered at dispatch; the worker checks what it renders to
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            issues.error(f"{path}.{name}", f"limits.{name} must be a positive whole number, got {value!r}")
        elif name in maximums and value > maximums[name]:   # the worker's own wording (python_pool.step_limits)
            issues.error(f"{path}.{name}", f"limits.{name} = {value} is above the maximum {maximums[name]} "
                                           f"({step_maximum_setting(name)})")


def _check_action(step: Step, issues: Issues) -> None:
    config, path = step.config, step.path
    if step.type == "python" and not (config.get("code") or "").strip():
        issues.error(f"{path}.code", "a python step needs code defining main()")
    if step.type == "python" and "limits" in config:
        check_limits(config["limits"], f"{path}.limits", issues)
    elif step.type == "http":
        if not isinstance(config.get("endpoint"), str) or not config["endpoint"].strip():
            issues.error(f"{path}.endpoint", "an http step needs endpoint (or url)")
        _check_method(config.get("method"), f"{path}.method", issues)
    elif step.type in ("postgres", "duckdb") and not config.get("command"):
        issues.error(f"{path}.command", f"a {step.type} step needs SQL in command (or commands/sql/query)")
    elif step.type == "playbook":
        if not isinstance(config.get("path"), str) or not config["path"].strip():
            issues.error(f"{path}.path", "a playbook step needs path: <catalog path of the child playbook>")
        if config.get("return_step") is not None and not isinstance(config["return_step"], str):
            issues.error(f"{path}.return_step", "return_step must be a step name")
    elif step.type == "save" and config:
        _check_save(SaveSpec(**config), path, issues)
    if step.save is not None:
        _check_save(step.save, f"{path}.save", issues)


def _check_save(spec: SaveSpec, path: str, issues: Issues) -> None:
    if spec.mode == "upsert" and not spec.key and not spec.command:
        issues.error(f"{path}.mode", "mode: upsert needs key (a column name or a list of them)")
    if spec.storage == "variable" and not (spec.name or "").isidentifier():
        issues.error(f"{path}.name", f"a variable save needs name: <identifier>, got {spec.name!r}")
    if spec.storage == "postgres" and not spec.table and not spec.command:
        issues.error(path, "a postgres save needs table (or an explicit statement)")
    if spec.storage == "http":
        if not (spec.url or "").strip():
            issues.error(path, "an http save needs url (or endpoint)")
        _check_method(spec.method, f"{path}.method", issues)


def _check_method(method: Any, path: str, issues: Issues) -> None:
    if not isinstance(method, str) or ("{" not in method and method not in HTTP_METHODS):
        issues.error(path, f"unknown http method {method!r} (expected one of: {', '.join(HTTP_METHODS)})")


def check_keys(raw_steps: Any, steps: list[Step], issues: Issues) -> None:
    """Warnings for keys that do not apply to a step's kind (they are ignored)."""
    for raw, step in zip(raw_steps if isinstance(raw_steps, list) else [], steps):
        _warn_keys(raw, step, issues, task=False)


def _warn_keys(raw: Any, step: Step, issues: Issues, task: bool) -> None:
    if not isinstance(raw, dict) or "loop" in raw or step.type == "secrets":
        return
    declared = raw.get("type").strip().lower() if isinstance(raw.get("type"), str) else raw.get("type")
    if declared not in (None, "workbook", *ACTION_TYPES, *CONTROL_TYPES) or (declared == "workbook"
                                                                              and step.type is None):
        return   # an unknown type or a missing workbook entry is already an error
    allowed = COMMON_KEYS | KIND_KEYS.get(step.type, frozenset()) | ({"name", "task"} if declared == "workbook"
                                                                      else set())
    if task:
        allowed = (allowed | {"task", "name"}) - NOT_IN_TASK
    what = "an iterator task" if task else "a control step" if step.type is None else f"a {step.type} step"
    for key in raw:
        if step.type is None and key in ACTION_KEYS:
            continue   # an error already (normalise.step_kind): the step would run nothing
        if key not in allowed or (step.type is None and key in CONTROL_ONLY):
            issues.warn(f"{step.path}.{key}", f"key '{key}' does not apply to {what} (ignored)")
    if step.iterator is not None:
        _warn_keys(raw.get("task"), step.iterator.task, issues, task=True)


def check_templates(doc: dict, key: str, steps: list[Step], issues: Issues) -> None:
    """Every template in the steps and workbook entries must parse (`code` is never rendered)."""
    reported: set[str] = set()
    budget = [TEMPLATE_BUDGET]
    for section in (key, "workbook"):
        _walk_templates(doc.get(section), section, issues, reported, budget, set())
    for step in steps:          # conditions written without braces were wrapped by normalise
        for each in _with_tasks(step):
            exprs = [(f"{e.path}.when", e.when) for e in _edges(each.next)]
            if each.retry is not None:
                exprs += [(f"{each.path}.retry.retry_when", each.retry.retry_when),
                          (f"{each.path}.retry.stop_when", each.retry.stop_when)]
            if each.iterator is not None:
                exprs += [(f"{each.path}.where", each.iterator.where),
                          (f"{each.path}.order_by", each.iterator.order_by)]
            for path, text in exprs:
                if text is not None and text not in reported:
                    _check_text(text, path, issues, reported)


def _walk_templates(node: Any, path: str, issues: Issues, reported: set[str], budget: list[int],
                    active: set[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        return
    if isinstance(node, str):
        _check_text(node, path, issues, reported)
    elif isinstance(node, (dict, list)) and id(node) in active:
        issues.error(path, "this value contains itself (a recursive YAML alias)")
    elif isinstance(node, (dict, list)):
        active.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, value in items:
            if isinstance(node, dict) and k in NEVER_RENDERED:
                continue
            _walk_templates(value, f"{path}.{k}" if isinstance(node, dict) else f"{path}[{k}]", issues,
                            reported, budget, active)
        active.discard(id(node))


def _check_text(text: str, path: str, issues: Issues, reported: set[str]) -> None:
    error = syntax_error(text)
    if error:
        reported.add(text)
        issues.error(path, error if text in error else f"{error} (template: {text})")


def _edges(edges: list[Edge]) -> Iterator[Edge]:
    for edge in edges:
        yield edge
        yield from _edges((edge.then or []) + (edge.otherwise or []))


def _with_tasks(step: Step) -> Iterator[Step]:
    yield step
    if step.iterator is not None:
        yield from _with_tasks(step.iterator.task)


# ---------------------------------------------------------------- coercions that report problems

def fold_data(raw: dict, path: str, issues: Issues, keys: tuple[str, ...] = DATA_KEYS,
              whole: bool = False) -> dict[str, Any] | str:
    """Merge the input aliases into one mapping; later keys in `keys` win.

    With `whole` (a step's inputs), the inputs may instead be one template expression, `data: "{{ x.data }}"`:
    DSL §5 gives a lone expression its native value, so it is kept as text here and rendered at dispatch,
    where it must give a mapping. It cannot be merged with another alias given as a mapping (the merge
    would depend on values only known at run time)."""
    merged: dict[str, Any] = {}
    expr_key: str | None = None
    for key in keys:
        value = raw.get(key)
        if isinstance(value, dict):
            merged.update(value)
        elif whole and is_lone_expression(value) and expr_key is None:
            expr_key = key
        elif value is not None:
            what = "a mapping of named inputs" + (" or one template expression ({{ … }})" if whole else "")
            issues.error(f"{path}.{key}", f"'{key}' must be {what}, got {type(value).__name__}"
                         + (f" (only one of {', '.join(keys)} may be an expression)" if expr_key else ""))
    if expr_key is None:
        return merged
    if merged:
        other = next(k for k in keys if isinstance(raw.get(k), dict))
        issues.error(f"{path}.{expr_key}", f"'{expr_key}' is one template expression and cannot be merged with "
                                           f"the mapping in '{other}': give the inputs in one of them")
        return merged
    return raw[expr_key]


def is_lone_expression(value: Any) -> bool:
    """`{{ expr }}` and nothing else (the rendering decides what the expression is)."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    return (text.startswith("{{") and text.endswith("}}") and text.count("{{") == 1
            and "{%" not in text and "{#" not in text)


def as_expr(value: Any, path: str, issues: Issues) -> str | None:
    """A condition as template text: a bare expression is wrapped as ``{{ … }}``; booleans become true/false."""
    if value is None:
        return None
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        issues.error(path, f"expected an expression, got {type(value).__name__}")
        return None
    return value if ("{{" in value or "{%" in value) else "{{ " + value.strip() + " }}"


def integer(value: Any, path: str, issues: Issues, what: str, minimum: int = 1,
            maximum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        issues.error(path, f"{what} must be an integer >= {minimum}, got {value!r}")
        return None
    if value < minimum:
        issues.error(path, f"{what} must be >= {minimum}, got {value}")
        return None
    if maximum is not None and value > maximum:
        issues.error(path, f"{what} must be <= {maximum:,}, got {value:,}")
        return None
    return value


def number(value: Any, path: str, issues: Issues, what: str, positive: bool = False) -> float | None:
    try:
        result = None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        result = None
    if value is not None and (result is None or result != result or result < 0 or (positive and result == 0)):
        issues.error(path, f"{what} must be a number {'> 0' if positive else '>= 0'} (seconds), got {value!r}")
        return None
    return result


def join_sql(value: Any, path: str, issues: Issues) -> str | None:
    """SQL text; a list of statements joins with newlines."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    if isinstance(value, str):
        return value
    issues.error(path, "SQL must be a string or a list of strings")
    return None
