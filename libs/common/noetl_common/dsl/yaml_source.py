"""YAML text -> plain Python data plus a location map (DSL §1: every problem carries its YAML line).

The location map goes from a path such as ``workflow[3].next[0].step`` to the 1-based line where that
key (mapping entries) or item (sequence entries) is written. It is built from the composed node tree of
the same parse that produces the data, so the two always agree. Syntax errors become `Problem`s with the
lines PyYAML reports; nothing here raises on bad input.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from .models import Problem

LineMap = dict[str, int]

_PARENT = re.compile(r"(.*)(?:\.[^.\[\]]*|\[\d+\])$")

# Limits (docs/security.md): a playbook is a few kilobytes; these leave room for large inline data while
# keeping one document from taking the server's memory. Aliases are counted as the copies they become
# once the data is serialised (a 552-byte "billion laughs" document expands to billions of nodes).
MAX_DOCUMENT_CHARS = 4 * 1024 * 1024
MAX_EXPANDED_NODES = 1_000_000
MAX_DOCUMENT_DEPTH = 200   # nesting levels; real playbooks use < 20, and the runtime nests results deeper still


class _TooLarge(Exception):
    def __init__(self, problem: Problem):
        self.problem = problem


def parse_yaml(text: str) -> tuple[Any, LineMap, list[Problem]]:
    """Parse one YAML document. Returns (data, lines, problems); data is None when there are errors."""
    if not isinstance(text, str):
        return None, {}, [Problem(path="", message=f"expected YAML text, got {type(text).__name__}")]
    if len(text) > MAX_DOCUMENT_CHARS:
        return None, {}, [Problem(path="", line=1, message=(
            f"the document is too large ({len(text):,} characters; the limit is {MAX_DOCUMENT_CHARS:,})"))]
    problems: list[Problem] = []
    lines: LineMap = {}
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, {}, [Problem(path="", line=1, message="the document is empty")]
            lines[""] = node.start_mark.line + 1     # where problems of the whole document are reported
            _count_expanded(node, {}, set())
            _index(node, "", lines, problems, set())
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except _TooLarge as exc:
        return None, {}, [exc.problem]
    except yaml.MarkedYAMLError as exc:
        return None, {}, [_syntax_problem(exc)]
    except yaml.YAMLError as exc:
        return None, {}, [Problem(path="", message=f"invalid YAML: {exc}")]
    except RecursionError:
        return None, {}, [Problem(path="", message="invalid YAML: the document is nested too deeply")]
    except Exception as exc:  # PyYAML can still raise plain errors on odd input (e.g. bad timestamps)
        return None, {}, [Problem(path="", message=f"invalid YAML: {type(exc).__name__}: {exc}")]
    return data, lines, problems


def line_for(lines: LineMap, path: str) -> int | None:
    """The line of `path`, or of its nearest located parent (``a.b[2].c`` -> ``a.b[2]`` -> ``a.b`` -> ``a``),
    else the document's first line (a missing top-level key, a document that is not a mapping)."""
    while path:
        if path in lines:
            return lines[path]
        match = _PARENT.fullmatch(path)
        if match is None:
            break
        path = match.group(1)
    return lines.get("")


def _syntax_problem(exc: yaml.MarkedYAMLError) -> Problem:
    """One problem located at the failure point; the message also names where the construct opened."""
    problem_mark, context_mark = exc.problem_mark, exc.context_mark
    parts = []
    if exc.context:
        where = f" (line {context_mark.line + 1}, column {context_mark.column + 1})" if context_mark else ""
        parts.append(f"{exc.context}{where}")
    if exc.problem:
        where = f" (line {problem_mark.line + 1}, column {problem_mark.column + 1})" if problem_mark else ""
        parts.append(f"{exc.problem}{where}")
    if exc.note:
        parts.append(exc.note)
    mark = problem_mark or context_mark
    message = "invalid YAML: " + ("; ".join(parts) or str(exc))
    return Problem(path="", line=mark.line + 1 if mark else None, message=message)


def _count_expanded(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The number of nodes the document holds once every alias is copied out; memoised per node, so the
    count itself is linear in the written document. Refuses a recursive alias and an expansion over the
    limit, naming the line of the node where the limit was crossed."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _TooLarge(Problem(path="", line=node.start_mark.line + 1,
                                message="invalid YAML: an alias refers to a node that contains it (recursive alias)"))
    total = 1
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        open_nodes.add(key)
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        for child in children:
            total += _count_expanded(child, sizes, open_nodes)
            if total > MAX_EXPANDED_NODES:
                raise _TooLarge(Problem(path="", line=node.start_mark.line + 1, message=(
                    f"the document expands to more than {MAX_EXPANDED_NODES:,} nodes (YAML aliases are counted "
                    f"as the copies they make); refused at the node on this line")))
        open_nodes.discard(key)
    sizes[key] = total
    return total


def _key_text(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    return f"<{node.tag.rsplit(':', 1)[-1]}>"


def _index(node: yaml.Node, path: str, lines: LineMap, problems: list[Problem], seen: set[int]) -> None:
    """Record the line of every key and item. An aliased node is indexed once (at its anchor), which
    also keeps recursive or exponentially aliased documents cheap."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys_here: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            child = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in keys_here and key != "<<":
                problems.append(Problem(
                    path=child, line=line, severity="warning",
                    message=f"duplicate key '{key}' (also on line {keys_here[key]}); the last one wins"))
            keys_here.setdefault(key, line)
            lines[child] = line
            _index(value_node, child, lines, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = f"{path}[{i}]"
            lines.setdefault(child, item.start_mark.line + 1)
            _index(item, child, lines, problems, seen)


def nested_too_deeply(data: Any, limit: int = MAX_DOCUMENT_DEPTH) -> bool:
    """True when mappings/lists nest more than `limit` levels: checked without recursion, so a hostile
    document (a parsed JSON body, say) is refused with one problem instead of a RecursionError later."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False
