"""The Postgres DSN from a file (`--database-url-file`, `NOETL_DATABASE_URL_FILE`), so that it never has to
be typed on a command line: argv is readable by every local user (`ps`, /proc/<pid>/cmdline), a file with
mode 0600 or a mounted Secret is not. Docs: docs/security.md, "Deployment".

The file holds the DSN on its first line; surrounding whitespace and one trailing newline are ignored.
Anything else (unreadable, empty, more than one non-empty line, NUL bytes, larger than MAX_BYTES) is a
ValueError whose message names the file but never repeats its content (it may be a password).
"""
from __future__ import annotations

from pathlib import Path

MAX_BYTES = 8192      # a DSN with every option fits many times over; a wrong file (a dump, a key) does not


def read_dsn_file(path: str | Path) -> str:
    where = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the database URL file {where}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ValueError(f"the database URL file {where} is larger than {MAX_BYTES} bytes: not a DSN")
    if b"\0" in data:
        raise ValueError(f"the database URL file {where} contains NUL bytes: not a DSN")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"the database URL file {where} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"the database URL file {where} is empty")
    if len(lines) > 1:
        raise ValueError(f"the database URL file {where} has {len(lines)} non-empty lines: put only the DSN in it")
    return lines[0]
