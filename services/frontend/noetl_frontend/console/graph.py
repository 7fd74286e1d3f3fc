"""A playbook's graph laid out in Python and drawn as SVG: no layout library, nothing from the internet.

    edges_of(playbook)              every `next` edge as (source, target, when-label), then/else flattened
    layout(playbook)                a layered (Sugiyama-style) layout: ranks by longest path over the graph
                                    without its back edges, order in a rank by the barycentre of the
                                    neighbours (a few down and up sweeps), fixed-size boxes
    svg(layout, steps)              the SVG markup: a box per step coloured by its live status, the `when` of
                                    each edge on it, loops (back edges) dashed, an iterator's done/running/failed
                                    counts inside its box, a link to a child execution

One box per step whatever the size of an iterator: 5,000 items are three counts, never 5,000 nodes. Every
text that comes from a playbook or an execution is escaped (a step may be named `<script>`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup, escape

from noetl_common.dsl import Edge, Playbook

BOX_W, BOX_H = 168, 46
GAP_X, GAP_Y = 36, 70
MARGIN = 24
LABEL_CHARS = 28        # a `when` longer than this is cut in the drawing (the full text is its tooltip)
SWEEPS = 4


@dataclass
class Node:
    name: str
    kind: str           # python | http | ... | iterator | playbook | control
    rank: int = 0
    order: int = 0
    x: float = 0.0
    y: float = 0.0


@dataclass
class Layout:
    nodes: dict[str, Node]
    edges: list[tuple[str, str, str | None]]
    back: set[tuple[str, str]] = field(default_factory=set)   # edges that close a loop
    width: float = 0.0
    height: float = 0.0


def edges_of(playbook: Playbook) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    for name, step in playbook.steps.items():
        _flatten(name, step.next, None, out)
    return [e for e in out if e[1] in playbook.steps]


def _flatten(source: str, edges: list[Edge], condition: str | None, out: list[tuple[str, str, str | None]]) -> None:
    for edge in edges:
        label = _join(condition, edge.when)
        if edge.then is not None:
            _flatten(source, edge.then, label, out)
            _flatten(source, edge.otherwise or [], _join(condition, f"not ({edge.when})" if edge.when else None), out)
        elif edge.step:
            out.append((source, edge.step, label))


def _join(outer: str | None, inner: str | None) -> str | None:
    if outer and inner:
        return f"{outer} and {inner}"
    return outer or inner


def _kind(playbook: Playbook, name: str) -> str:
    return playbook.steps[name].type or "control"


def layout(playbook: Playbook) -> Layout:
    names = list(playbook.steps)
    edges = edges_of(playbook)
    children: dict[str, list[str]] = {n: [] for n in names}
    for source, target, _ in edges:
        children[source].append(target)
    back = _back_edges(names, children)
    forward = [(s, t) for s, t, _ in edges if (s, t) not in back and s != t]
    rank = {n: 0 for n in names}
    for _ in range(len(names)):                       # longest path over the acyclic part
        changed = False
        for source, target in forward:
            if rank[target] < rank[source] + 1:
                rank[target], changed = rank[source] + 1, True
        if not changed:
            break
    ranks: dict[int, list[str]] = {}
    for n in names:
        ranks.setdefault(rank[n], []).append(n)
    _order(ranks, forward)
    nodes: dict[str, Node] = {}
    widest = max((len(row) for row in ranks.values()), default=1)
    for r, row in ranks.items():
        offset = (widest - len(row)) * (BOX_W + GAP_X) / 2
        for i, n in enumerate(row):
            nodes[n] = Node(n, _kind(playbook, n), r, i, MARGIN + offset + i * (BOX_W + GAP_X),
                            MARGIN + r * (BOX_H + GAP_Y))
    width = 2 * MARGIN + widest * (BOX_W + GAP_X) - GAP_X + (BOX_W if back else 0)
    height = 2 * MARGIN + (max(ranks, default=0) + 1) * (BOX_H + GAP_Y) - GAP_Y
    return Layout(nodes, edges, back, width, height)


def _back_edges(names: list[str], children: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Edges into a step still on the depth-first path (iteratively: a long chain must not hit recursion)."""
    back: set[tuple[str, str]] = set()
    state: dict[str, int] = {}   # 1 on the path, 2 done
    for root in (["start"] if "start" in children else []) + names:
        if root in state:
            continue
        stack = [(root, iter(children[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(children[nxt])))
    return back


def _order(ranks: dict[int, list[str]], forward: list[tuple[str, str]]) -> None:
    ups: dict[str, list[str]] = {}
    downs: dict[str, list[str]] = {}
    for s, t in forward:
        downs.setdefault(s, []).append(t)
        ups.setdefault(t, []).append(s)
    levels = sorted(ranks)
    for sweep in range(SWEEPS):
        order = levels[1:] if sweep % 2 == 0 else list(reversed(levels[:-1]))
        for r in order:
            neighbours = ups if sweep % 2 == 0 else downs
            other = ranks.get(r - 1 if sweep % 2 == 0 else r + 1, [])
            position = {n: i for i, n in enumerate(other)}
            row = ranks[r]
            current = {n: i for i, n in enumerate(row)}

            def centre(n: str) -> float:
                near = [position[m] for m in neighbours.get(n, []) if m in position]
                return sum(near) / len(near) if near else current[n]
            row.sort(key=lambda n: (centre(n), current[n]))


# ------------------------------------------------------------------------------------------------ drawing
def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def svg(lay: Layout, steps: dict[str, dict[str, Any]] | None = None, execution_id: str | None = None) -> Markup:
    """`steps`: {name: {"status", "iter": {"done", "running", "failed", "total"}, "children": [ids]}}."""
    steps = steps or {}
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{lay.width:.0f}" '
             f'height="{lay.height:.0f}" viewBox="0 0 {lay.width:.0f} {lay.height:.0f}" role="img">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>']
    for source, target, when in lay.edges:
        parts.append(_edge(lay, source, target, when))
    for node in lay.nodes.values():
        parts.append(_node(node, steps.get(node.name, {}), execution_id))
    parts.append("</svg>")
    return Markup("".join(parts))


def _edge(lay: Layout, source: str, target: str, when: str | None) -> str:
    a, b = lay.nodes[source], lay.nodes[target]
    loop = (source, target) in lay.back or source == target
    if loop:   # around the right-hand side, upwards
        x1, y1 = a.x + BOX_W, a.y + BOX_H / 2
        x2, y2 = b.x + BOX_W, b.y + BOX_H / 2
        bend = max(x1, x2) + GAP_X + 20
        d = f"M{x1:.0f},{y1:.0f} C{bend:.0f},{y1:.0f} {bend:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
        lx, ly = bend - 6, (y1 + y2) / 2
    else:
        x1, y1 = a.x + BOX_W / 2, a.y + BOX_H
        x2, y2 = b.x + BOX_W / 2, b.y
        mid = (y1 + y2) / 2
        d = f"M{x1:.0f},{y1:.0f} C{x1:.0f},{mid:.0f} {x2:.0f},{mid:.0f} {x2:.0f},{y2:.0f}"
        lx, ly = (x1 + x2) / 2 + 4, mid
    cls = "edge loop" if loop else "edge"
    out = [f'<g class="{cls}" data-from="{escape(source)}" data-to="{escape(target)}">',
           f'<path d="{d}" marker-end="url(#arrow)"/>']
    if when:
        out.append(f'<text x="{lx:.0f}" y="{ly:.0f}" class="when"><title>{escape(when)}</title>'
                   f'{escape(_short(when, LABEL_CHARS))}</text>')
    out.append("</g>")
    return "".join(out)


def _node(node: Node, live: dict[str, Any], execution_id: str | None) -> str:
    status = str(live.get("status") or "PENDING").lower()
    out = [f'<g class="node {escape(status)}" data-step="{escape(node.name)}" tabindex="0">',
           f'<title>{escape(node.name)} ({escape(node.kind)}): {escape(status)}</title>',
           f'<rect x="{node.x:.0f}" y="{node.y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6"/>',
           f'<text x="{node.x + 8:.0f}" y="{node.y + 18:.0f}" class="name">{escape(_short(node.name, 22))}</text>']
    detail = node.kind if node.kind != "control" else ""
    counts = live.get("iter")
    if counts:
        detail = (f"{counts.get('done', 0)} done · {counts.get('running', 0)} run · "
                  f"{counts.get('failed', 0)} failed")
    elif live.get("attempts", 1) > 1:
        detail = f"{node.kind} · attempt {live['attempts']}"
    out.append(f'<text x="{node.x + 8:.0f}" y="{node.y + 36:.0f}" class="detail">{escape(detail)}</text>')
    children = live.get("children") or []
    if children:
        child = children[-1]
        out.append(f'<a href="/executions/{escape(child)}" class="child" data-child="{escape(child)}">'
                   f'<text x="{node.x + BOX_W - 8:.0f}" y="{node.y + 36:.0f}" text-anchor="end">'
                   f'child{"ren " + str(len(children)) if len(children) > 1 else ""} →</text></a>')
    out.append("</g>")
    return "".join(out)
