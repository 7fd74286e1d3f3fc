"""Structured paths into a value: the one walker for deferred templates, used by the fold and the worker.

A path is a list of keys: a `str` selects a mapping key (any text: dots, spaces, the empty string), an `int`
selects a list index. `["config", "headers", "X.Token"]` is the header `X.Token`, never `X` then `Token`.
Paths travel in JSON as they are, so both sides read exactly the same thing.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

Key = str | int
Path = Sequence[Key]


class PathError(LookupError):
    """The path does not exist in the value."""


def lookup(root: Any, path: Path) -> Any:
    """The value at `path`, or PathError naming the path."""
    node = root
    for depth, key in enumerate(path):
        node = _step(node, key, path, depth)
    return node


def replace(root: Any, path: Path, value: Any) -> Any:
    """`root` with the value at `path` replaced by `value`. The containers along the path are copied, never
    mutated: the caller's value (a Command's dicts) stays as it was."""
    if not path:
        return value
    copies = [root]
    for depth, key in enumerate(path[:-1]):
        copies.append(_step(copies[-1], key, path, depth))
    _step(copies[-1], path[-1], path, len(path) - 1)    # the last key must exist too
    for container, key in zip(reversed(copies), reversed(path)):
        copy = dict(container) if isinstance(container, dict) else list(container)
        copy[key] = value
        value = copy
    return value


def text(path: Path) -> str:
    """A readable form for messages: data.headers["X.Token"][0] (plain names dotted, others quoted)."""
    out = ""
    for key in path:
        if type(key) is int:
            out += f"[{key}]"
        elif isinstance(key, str) and key.isidentifier():
            out += f".{key}" if out else key
        else:
            out += f"[{json.dumps(key, ensure_ascii=False, default=repr)}]"
    return out


def from_dotted(dotted: str, root: Any) -> list[Key]:
    """A structured path from the dotted text older versions wrote (`config.headers.X.Token`), read against
    the value it points into with the rule those versions' worker used: the longest existing key wins, and a
    number selects a list index. For commands and snapshots written before paths were structured."""
    segments = dotted.split(".")
    path: list[Key] = []
    node = root
    while segments:
        if isinstance(node, dict):
            for n in range(len(segments), 0, -1):
                key = ".".join(segments[:n])
                if key in node:
                    path.append(key)
                    node, segments = node[key], segments[n:]
                    break
            else:
                raise PathError(f"path {dotted!r} does not exist")
        elif isinstance(node, list) and segments[0].isdigit() and int(segments[0]) < len(node):
            path.append(int(segments[0]))
            node, segments = node[int(segments[0])], segments[1:]
        else:
            raise PathError(f"path {dotted!r} does not exist")
    return path


def _step(node: Any, key: Key, path: Path, depth: int) -> Any:
    if type(key) is str and isinstance(node, dict):
        if key in node:
            return node[key]
    elif type(key) is int and isinstance(node, list):
        if 0 <= key < len(node):
            return node[key]
    raise PathError(f"path {text(path)} does not exist (no {key!r} at {text(path[:depth]) or 'the top'})")
