"""Redaction: the secrets a worker handed out, and their common encodings, replaced by `***`.

A secret leaks in more shapes than its own: code that sends it in a URL writes it percent-encoded, Basic
auth writes it in base64 inside a longer base64 text, a log prints it upper-cased or JSON-escaped, a PEM
key is printed one line at a time. So each secret is searched in every form listed by `forms` (case
ignored for forms long enough not to garble ordinary text). A deliberate transformation (slicing,
reversing, encrypting) is not caught: code that may read a secret may also reveal it, as in every CI
system (docs/security.md).

Two scopes use it: each command redacts what it emits with the secrets *it* resolved (`Redactor`, owned by
`credentials.Secrets`), and every log record of the process, from any library, is redacted with every
secret the process has handed out so far (`register_process_secret`, via a log record factory), because
httpx and friends log URLs and errors that carry them.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "***"
_CASELESS_MIN = 6    # shorter secrets are matched exactly only: "abc" must not eat every "ABC"
_ENCODED_MIN = 8     # shorter encoded or partial forms would match ordinary text
_EDGE_MIN = 3        # where output was cut, a piece of a secret this long or longer is redacted too


def forms(secret: str) -> set[str]:
    """Every string to redact for one secret (the secret itself included)."""
    found = {secret}
    raw = secret.encode("utf-8")
    encoded = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
               quote(secret, safe=""), quote_plus(secret), raw.hex()}   # other URL forms: url_encoded
    for offset in range(3):
        # base64 of the secret inside a longer text: the characters that depend on the secret's bytes
        # only, for each of the three alignments it can have.
        start, end = -(-8 * offset // 6), 8 * (offset + len(raw)) // 6
        for alphabet in (base64.b64encode, base64.urlsafe_b64encode):
            encoded.add(alphabet(b"\0" * offset + raw).decode("ascii")[start:end])
    if "\n" in secret:     # a multi-line secret (a PEM key) is often printed or logged line by line
        encoded.update(line.strip() for line in secret.splitlines())
    found.update(form for form in encoded if len(form) >= _ENCODED_MIN)
    return found


def url_encoded(secret: str) -> str | None:
    """A regex for the secret percent-encoded by any encoder: each character outside [A-Za-z0-9_.~-] may be
    written as itself or as %XX (a space also as +), since encoders differ in what they leave alone."""
    if len(secret) < _ENCODED_MIN or re.fullmatch(r"[A-Za-z0-9_.~-]*", secret):
        return None
    parts = []
    for char in secret:
        if re.fullmatch(r"[A-Za-z0-9_.~-]", char):
            parts.append(re.escape(char))
            continue
        encoded = "".join(f"%{b:02X}" for b in char.encode("utf-8"))
        options = [re.escape(char), re.escape(encoded)] + (["\\+"] if char == " " else [])
        parts.append(f"(?:{'|'.join(options)})")
    return "".join(parts)


def _pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    every = [(len(f), f"(?i:{re.escape(f)})" if len(f) >= _CASELESS_MIN else re.escape(f))
             for f in {form for value in values for form in forms(value)}]
    every += [(len(v), f"(?i:{u})") for v in values if (u := url_encoded(v)) is not None]
    if not every:
        return None
    # Longest first, so a secret that contains another is replaced whole.
    return re.compile("|".join(p for _, p in sorted(every, key=lambda e: e[0], reverse=True)))


class Redactor:
    """A set of secret values and the pattern that finds them (rebuilt only when a value is added)."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._stale = False
        self._lock = threading.Lock()   # the process-wide one is fed from several event loops

    @property
    def active(self) -> bool:
        return bool(self._values)

    def add(self, value: str) -> None:
        if value and value not in self._values:
            with self._lock:
                self._values.add(value)
                self._stale = True

    def text(self, text: str) -> str:
        pattern = self._current()
        return pattern.sub(REDACTED, text) if pattern is not None else text

    def value(self, value: Any) -> Any:
        """value with every secret replaced (strings inside dicts and lists too, keys included)."""
        pattern = self._current()
        return value if pattern is None or value is None else _walk(value, pattern)

    def cut_edges(self, text: str, marker: str) -> str:
        """Redact the pieces of a secret left on either side of `marker`, where output was cut in two:
        the start of a secret before it and the end of one after it. Called before `text`."""
        if marker not in text or not self._values:
            return text
        head, _, tail = text.partition(marker)
        every = [f.lower() for v in self._values for f in forms(v)]
        low_head, low_tail = head.lower(), tail[::-1].lower()
        cut_head = max((_overlap(low_head, f) for f in every), default=0)
        cut_tail = max((_overlap(low_tail, f[::-1]) for f in every), default=0)
        if cut_head >= _EDGE_MIN:
            head = head[:-cut_head] + REDACTED
        if cut_tail >= _EDGE_MIN:
            tail = REDACTED + tail[cut_tail:]
        return head + marker + tail

    def _current(self) -> re.Pattern[str] | None:
        if self._stale:
            with self._lock:
                self._pattern = _pattern(self._values)
                self._stale = False
        return self._pattern


def _overlap(text: str, secret: str) -> int:
    """The length of the longest proper prefix of `secret` that `text` ends with (prefix function, linear)."""
    if len(secret) < 2:
        return 0
    joined = secret + "\0" + text[-(len(secret) - 1):]
    border = [0] * len(joined)
    for i in range(1, len(joined)):
        k = border[i - 1]
        while k and joined[i] != joined[k]:
            k = border[k - 1]
        if joined[i] == joined[k]:
            k += 1
        border[i] = k
    return border[-1]


def _walk(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value)
    if isinstance(value, dict):
        return {_walk(k, pattern) if isinstance(k, str) else k: _walk(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, pattern) for v in value]
    return value


# --- every log record of the process ---------------------------------------------------------------
_PROCESS = Redactor()
_installed = False
_install_lock = threading.Lock()


def register_process_secret(value: str) -> None:
    """Redact `value` (in all its forms) from every log record this process writes from now on."""
    _PROCESS.add(value)
    if not _installed:
        _install()


def redact_log_text(text: str) -> str:
    return _PROCESS.text(text)


def _install() -> None:
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _PROCESS.active:
                _redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:   # a malformed call (bad %-args) is the logging module's to report
        return
    clean = _PROCESS.text(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        # Formatters reuse exc_text when it is set: the traceback (exception messages often carry the
        # URL or the query) is formatted and redacted here, once.
        record.exc_text = _PROCESS.text(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = _PROCESS.text(record.stack_info)

