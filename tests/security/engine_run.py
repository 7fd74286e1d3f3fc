"""Helpers for the security tests (imported as `engine_run`; conftest.py holds the fixtures): the engine is the real `noetl run` process, with the secrets an operator
gives it (master key, database URL, a stored credential) in its environment and store, and the playbook is
what an attacker who may run playbooks would write. Each test then looks for those secrets in everything
the run produced.

Tests run as root on the project's machines, so the engine runs as root and python steps as
NOETL_STEP_USER=nobody (the path docs/security.md recommends); test_python_step_secrets.py also runs an
engine as an unprivileged user, where steps share its uid.
"""
from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

NOETL = Path(sys.executable).with_name("noetl")
MASTER_KEY = Fernet.generate_key().decode()
DB_PASSWORD = "db-pw-Kx81-never-in-a-step"
DSN = f"postgresql://noetl:{DB_PASSWORD}@127.0.0.1:9/noetl"
CREDENTIAL_SECRET = "cred-pw-Tq42-decrypted-by-nobody"
PLAYBOOK_SECRET = "api-tok-Zr93-only-by-name"        # NOETL_SECRET_API: a secret steps may use by name
ENGINE_SECRETS = (MASTER_KEY, DB_PASSWORD, CREDENTIAL_SECRET)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the step user is switched only when the engine runs as root")


@dataclass
class Run:
    code: int
    report: dict[str, Any]
    stdout: str
    stderr: str
    pid: int            # the engine's process id

    @property
    def everything(self) -> str:
        return self.stdout + self.stderr

    def step(self, name: str) -> dict[str, Any]:
        return self.report["steps"][name]


def engine_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of an engine an operator configured: master key, database URL, one playbook secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    env.update(NOETL_SECRET_KEY=MASTER_KEY, NOETL_DATABASE_URL=DSN, NOETL_SECRET_API=PLAYBOOK_SECRET,
               NOETL_STORE=str(home / "store" / "noetl.db"), NOETL_STEP_USER="nobody", HOME=str(home))
    env.update(extra)
    return env


def run_playbook(home: Path, playbook: str, *, payload: dict[str, Any] | None = None, user: str | None = None,
                 env: dict[str, str] | None = None, credentials: bool = True, timeout: float = 120) -> Run:
    """`noetl run PLAYBOOK --json` as the engine (as `user` when given), with a stored credential `db`."""
    home.mkdir(parents=True, exist_ok=True)
    file = home / "playbook.yaml"
    file.write_text(textwrap.dedent(playbook))
    args = [str(NOETL), "run", str(file), "--json", "--timeout", str(timeout)]
    if payload is not None:
        args += ["--payload", json.dumps(payload)]
    if credentials:
        creds = home / "creds.json"
        creds.write_text(json.dumps({"db": {"type": "postgres", "data": {
            "host": "127.0.0.1", "port": 9, "user": "app", "password": CREDENTIAL_SECRET, "database": "app"}}}))
        args += ["--credentials", str(creds)]
    kwargs: dict[str, Any] = {}
    run_env = dict(env if env is not None else engine_env(home))
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in [home, *home.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        python, path = interpreter_for(entry.pw_uid)
        args = [python, "-c", "from noetl_cli.main import app; app()", *args[1:]]
        run_env["PYTHONPATH"] = path
    popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=home,
                             env=run_env, **kwargs)
    try:
        out, err = popen.communicate(timeout=timeout + 60)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.communicate()
    lines = [line for line in out.splitlines() if line.strip().startswith("{")]
    assert lines, f"no JSON report (exit {popen.returncode}):\n{out}\n{err}"
    return Run(popen.returncode, json.loads(lines[-1]), out, err, popen.pid)


def interpreter_for(uid: int) -> tuple[str, str]:
    """A Python that user `uid` may execute, and the PYTHONPATH that gives it this project and its
    dependencies: this interpreter when the user can reach it, else the system's of the same version (the
    project's machines install Python under /root, which no other user may enter)."""
    import sysconfig
    site = sysconfig.get_paths()["purelib"]
    project = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([*filter(None, [os.environ.get("PYTHONPATH")]),   # a checkout under test first
                            *(str(p) for p in sorted((project / "libs").iterdir()) if p.is_dir()),
                            *(str(p) for p in sorted((project / "services").iterdir()) if p.is_dir()), site])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            probe = subprocess.run([python, "-c", "import noetl_cli.main"], user=uid, env={"PYTHONPATH": path},
                                   capture_output=True, cwd="/")
        except OSError:     # not there, or not for this user
            continue
        if probe.returncode == 0:
            return python, path
    pytest.fail(f"no {version} that uid {uid} may run with this project (install the system's {version})")


def assert_no_engine_secret(run: Run) -> None:
    """None of the engine's secrets, in any common form, anywhere the run wrote (report, events, logs)."""
    import base64
    for secret in ENGINE_SECRETS:
        for form in (secret, base64.b64encode(secret.encode()).decode()[:-4], secret.encode().hex()):
            assert form not in run.everything, f"an engine secret leaked ({form[:6]}…)"
