"""Split SQL text into statements (DSL §2.3).

A `;` ends a statement only outside quoted text, so a scanner (not a regex) walks the text once and tracks
which lexical context it is in: '...' strings (with '' escapes, and E'...' with backslash escapes),
"..." identifiers, $tag$ ... $tag$ bodies (function definitions contain `;`), `--` line comments and
`/* */` block comments (nested, as postgres allows). Comments stay inside the statements they belong to
(they are harmless there and keep error positions right), but a fragment that is only comments and
whitespace is dropped: the reference sent those to the database and got "empty query" errors.
"""
from __future__ import annotations

import re

# A dollar-quote opener: $$ or $tag$ where tag is an identifier (not $1, which is a parameter).
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_sql(text: str) -> list[str]:
    """The statements of `text`, in order, stripped, without the terminating `;`."""
    statements: list[str] = []
    start = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "'":
            # E'...' strings treat backslash as an escape; plain strings only know ''.
            backslash = i > 0 and text[i - 1] in "eE" and (i < 2 or not _ident_char(text[i - 2]))
            i = _skip_quoted(text, i + 1, "'", backslash)
        elif c == '"':
            i = _skip_quoted(text, i + 1, '"', False)
        elif c == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif c == "/" and text.startswith("/*", i):
            i = _skip_block_comment(text, i)
        elif c == "$" and (i == 0 or not _ident_char(text[i - 1])):
            m = _DOLLAR.match(text, i)
            if m:
                close = text.find(m.group(0), m.end())
                i = n if close < 0 else close + len(m.group(0))
            else:
                i += 1
        elif c == ";":
            _append(statements, text[start:i])
            i += 1
            start = i
        else:
            i += 1
    _append(statements, text[start:])
    return statements


def _ident_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _skip_quoted(text: str, i: int, quote: str, backslash: bool) -> int:
    """Index just past the closing quote (a doubled quote is an escaped one); end of text if unclosed."""
    n = len(text)
    while i < n:
        c = text[i]
        if backslash and c == "\\":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and text[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return n


def _skip_block_comment(text: str, i: int) -> int:
    depth = 0
    n = len(text)
    while i < n:
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _append(statements: list[str], fragment: str) -> None:
    fragment = fragment.strip()
    if fragment and strip_comments(fragment).strip():
        statements.append(fragment)


def strip_comments(text: str) -> str:
    """`text` with comments removed (quoted text kept): used to tell comment-only fragments apart."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in "'\"":
            j = _skip_quoted(text, i + 1, c, False)
            out.append(text[i:j])
            i = j
        elif text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            i = _skip_block_comment(text, i)
        elif c == "$" and (i == 0 or not _ident_char(text[i - 1])) and (m := _DOLLAR.match(text, i)):
            close = text.find(m.group(0), m.end())
            j = n if close < 0 else close + len(m.group(0))
            out.append(text[i:j])
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)
