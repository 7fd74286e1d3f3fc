"""The Fernet key that encrypts credentials at rest, and JSON-dict encryption with it.

The key comes from `NOETL_SECRET_KEY` (a urlsafe-base64 Fernet key) when set; otherwise from
`<store dir>/secret.key`, generated on first use with mode 0600. Losing that file makes stored
credentials unreadable, which is the point: the database alone never reveals them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from cryptography.fernet import Fernet, InvalidToken

ENV_VAR = "NOETL_SECRET_KEY"
KEY_FILE = "secret.key"

__all__ = ["ENV_VAR", "KEY_FILE", "InvalidToken", "load_key", "fernet", "encrypt_json", "decrypt_json"]


def load_key(store_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> bytes:
    """Return the Fernet key: from the environment, else from (or newly into) `<store_dir>/secret.key`."""
    env = os.environ if env is None else env
    from_env = env.get(ENV_VAR, "").strip()
    if from_env:
        key = from_env.encode()
        Fernet(key)  # fail early and clearly on a malformed key
        return key
    path = Path(store_dir) / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        # O_EXCL: if two processes race on first use, exactly one key wins and the other reads it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)  # the umask may have narrowed it further; make it exactly 0600
    return key


def _read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    Fernet(key)
    return key


def fernet(store_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Fernet:
    return Fernet(load_key(store_dir, env))


def encrypt_json(f: Fernet, data: Mapping[str, Any]) -> bytes:
    """Encrypt a JSON-serialisable dict into a Fernet token."""
    return f.encrypt(json.dumps(dict(data), separators=(",", ":"), sort_keys=True).encode())


def decrypt_json(f: Fernet, token: bytes | str) -> dict[str, Any]:
    """Decrypt a token from `encrypt_json`; raises `InvalidToken` for a wrong key or tampered data."""
    if isinstance(token, str):
        token = token.encode()
    value = json.loads(f.decrypt(token))
    if not isinstance(value, dict):
        raise ValueError("decrypted secret is not a JSON object")
    return value
