"""Render one template on a bounded budget: in a forked child process with a deadline, an address-space
limit and a cap on the size of the answer (docs/security.md, "Limits").

Why a process and not a thread: the sandbox bounds each operation (noetl_common.render_limits), but a
template can still loop for hours (`range` in `range` in `range`) or build a large output from many small
pieces, and a thread cannot be stopped. A child is killed at the deadline, its memory is capped, and the
server's event loop only waits on a pipe (from a worker thread). Forking is cheap (copy-on-write; the
child already holds the compiled-template cache and the context); see the numbers in docs/security.md.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
from typing import Any

from noetl_common.render import TemplateError, render

RENDER_SECONDS = 2.0                    # a preview render; a real one is milliseconds
MAX_RENDERED_BYTES = 4 * 1024 * 1024    # the JSON of the rendered value
EXTRA_ADDRESS_SPACE = 512 * 1024 * 1024  # on top of the server's own size, for the child
MAX_DEPTH = 100                         # lists/objects in lists/objects, in the template and in its value


class RenderRefused(ValueError):
    """The render overran its budget or rendered to something that is not a JSON answer."""


class TemplateFailed(Exception):
    """The template itself failed (TemplateError in the child); str() is its message."""


def deeper_than(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists/dicts nest more than `limit` levels (iterative: a deep value cannot overflow it).
    JSON encoding and FastAPI's response encoding recurse, a few frames per level."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def render_in_child(template: Any, context: dict[str, Any], *, seconds: float = RENDER_SECONDS,
                    max_bytes: int = MAX_RENDERED_BYTES) -> Any:
    """render(template, context) in a forked child. Raises a template error a template error (the caller
    decides strictness) as TemplateFailed, and RenderRefused for a budget overrun or a value that is not JSON."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns
        os.close(read_end)
        _child(write_end, template, context, max_bytes)
    os.close(write_end)
    try:
        raw = _read_until(read_end, time.monotonic() + seconds, max_bytes)
    finally:
        os.close(read_end)
        _reap(pid)
    if raw is None:
        raise RenderRefused(f"the render took longer than {seconds:g} s and was stopped")
    kind, _, payload = raw.partition(b"\n")
    if kind == b"ok":
        return json.loads(payload)
    if kind == b"template":
        raise TemplateFailed(payload.decode("utf-8", "replace"))
    raise RenderRefused(payload.decode("utf-8", "replace") or "the render failed (out of memory?)")


def _child(fd: int, template: Any, context: dict[str, Any], max_bytes: int) -> None:
    status = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's handlers are not the child's business
        _cap_address_space()
        try:
            value = render(template, context)
            if deeper_than(value):
                raise ValueError(f"it nests lists/objects more than {MAX_DEPTH} levels deep")
            encoded = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
            if len(encoded) > max_bytes:
                out = b"refused\n" + (f"the rendered value is {len(encoded):,} bytes of JSON, over the limit "
                                      f"of {max_bytes:,}").encode()
            else:
                out = b"ok\n" + encoded
        except TemplateError as exc:
            out = b"template\n" + str(exc).encode("utf-8", "replace")
        except (TypeError, ValueError) as exc:       # json: a set, a callable, NaN/Infinity
            out = b"refused\n" + f"the rendered value is not JSON: {exc}".encode("utf-8", "replace")
        except MemoryError:
            out = b"refused\nthe render ran out of its memory budget"
        except RecursionError:
            out = b"refused\nthe template or its value is nested too deeply"
        view = memoryview(out)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:                            # noqa: BLE001 - the child must end here, whatever happened
        status = 1
    finally:
        os._exit(status)


def _cap_address_space() -> None:
    try:
        with open("/proc/self/statm") as statm:
            size = int(statm.read().split()[0]) * resource.getpagesize()
        limit = size + EXTRA_ADDRESS_SPACE
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError):
        pass                                          # no /proc (not Linux): the deadline still holds


def _read_until(fd: int, deadline: float, max_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes + 64:                    # the child checks the size; this is the backstop
            return b"refused\nthe rendered value is over the size limit"


def _reap(pid: int) -> None:
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done == 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
