"""Attempt tokens: a fact about an attempt (started, heartbeat, completed, failed, child started, child
finished) counts only when it carries the token its command carried (issue 9 scope 4, docs/security.md
"Forged facts").

Command ids are predictable (`<execution>:<step>:<visit>:<attempt>`), so they prove nothing. Every execution
gets a random `fact_key` with its start (minted by the adapter that makes the start: the API, `noetl run`,
the worker that starts a child playbook; the core has no randomness). The token of an attempt is an HMAC of
its command id under that key: the fold computes it when it sends the command and again when a fact
arrives, so the fold stays a pure function of its messages (a replay sends the same tokens) and the state
stores no per-attempt secret. Without the key, a token cannot be derived from anything a caller sees
(events, ids); the key is in the start message and the state snapshot only, never in an event.

A re-send of the same attempt (a lost lease) keeps the command id, hence the token: the first worker's late
report is still accepted once (fold._lease_lost).
"""
from __future__ import annotations

import base64
import hmac

MAX_TOKEN = 200   # characters; a token is 43, a longer one is refused by the message schema unread


def attempt_token(key: str, command_id: str) -> str:
    """The token of the attempt `command_id` of an execution whose fact key is `key`."""
    digest = hmac.digest(key.encode("utf-8", "surrogatepass"), command_id.encode("utf-8", "surrogatepass"),
                         "sha256")   # one-shot: a few microseconds, on every command and every fact
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def token_for(key: str | None, command_id: str) -> str | None:
    """The token to put on a command (None for an execution started without a key, by an older version)."""
    return attempt_token(key, command_id) if key is not None else None


def genuine(key: str | None, command_id: str, token: str | None) -> bool:
    """Whether a fact about `command_id` carries its attempt's token. An execution started without a key
    (by a version before tokens) accepts facts without one: it cannot tell them apart."""
    if key is None:
        return True
    if not isinstance(token, str):
        return False
    expected = attempt_token(key, command_id).encode("ascii")
    return hmac.compare_digest(expected, token.encode("utf-8", "surrogatepass"))
