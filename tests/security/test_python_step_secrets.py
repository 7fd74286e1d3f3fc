"""Issue 9, findings: a python step read the server's environment through /proc/<ppid>/environ, the master
key (NOETL_SECRET_KEY, or `secret.key` beside the SQLite store) and the store itself, and decrypted every
stored credential. Here a step tries all of that, and more (every process's environ and argv, the engine's
memory), and returns whatever it found; nothing secret may come back.
"""
from __future__ import annotations

import os
import pwd

from engine_run import (CREDENTIAL_SECRET, DB_PASSWORD, MASTER_KEY, assert_no_engine_secret, as_root, engine_env,
                      run_playbook)

THIEF = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: thief, path: security/thief}
workload: {store: "", key_file: ""}
workflow:
  - step: start
    next: [{step: steal}]
  - step: steal
    type: python
    data: {store: "{{ workload.store }}", key_file: "{{ workload.key_file }}"}
    code: |
      import base64, glob, json, os, re

      def read(path, limit=1 << 20):
          try:
              if os.path.isdir(path):
                  return sorted(os.listdir(path))
              with open(path, "rb") as f:
                  return f.read(limit).decode("latin-1")
          except OSError as exc:
              return f"refused {exc.errno}"

      def engine_memory(pid, needle_bytes=None):
          # the readable, writable regions of an ancestor's memory (where a key would live)
          found = []
          try:
              maps = open(f"/proc/{pid}/maps").read().splitlines()
              mem = open(f"/proc/{pid}/mem", "rb")
          except OSError as exc:
              return [f"refused {exc.errno}"]
          total = 0
          for line in maps:
              span, perms = line.split()[:2]
              if not perms.startswith("rw") or total > 400 << 20:
                  continue
              start, end = (int(x, 16) for x in span.split("-"))
              try:
                  mem.seek(start)
                  chunk = mem.read(end - start)
              except (OSError, OverflowError, ValueError):
                  continue
              total += len(chunk)
              found += [m.decode("latin-1") for m in re.findall(rb"[A-Za-z0-9_-]{43}=", chunk)][:50]
              found += [m.decode("latin-1") for m in re.findall(rb"postgresql://[^\\x00\\s]{5,80}", chunk)][:10]
          return found

      def main(store, key_file):
          import subprocess
          found = {"uid": os.getuid(), "cwd": os.getcwd(), "env": dict(os.environ),
                   "left_running": subprocess.Popen(["sleep", "60"], start_new_session=True).pid}
          for d in glob.glob("/proc/[0-9]*"):
              found[d + "/environ"] = read(d + "/environ")
              found[d + "/cmdline"] = read(d + "/cmdline")
          pid, ancestors = os.getpid(), []
          while pid > 1:
              pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
              ancestors.append(pid)
          found["ancestors"] = ancestors
          found["memory"] = {p: engine_memory(p) for p in ancestors[:4]}
          for path in (store, store + "-wal", key_file, os.path.dirname(store)):
              found[path] = read(path)
          # decrypt the store's credentials with any Fernet key that turned up
          keys = set(re.findall(r"[A-Za-z0-9_-]{43}=", json.dumps(found)))
          tokens = set(re.findall(r"gAAAAA[A-Za-z0-9_=-]{40,}", json.dumps(found)))
          try:
              from cryptography.fernet import Fernet
              found["decrypted"] = [Fernet(k).decrypt(t.encode()).decode() for k in keys for t in tokens
                                    if _ok(Fernet, k, t)]
          except ImportError:
              found["decrypted"] = "no cryptography"
          return found

      def _ok(Fernet, k, t):
          try:
              Fernet(k).decrypt(t.encode())
              return True
          except Exception:
              return False
    next: [{step: check}]
  - step: check
    type: python
    data: {pid: "{{ steal.left_running }}"}
    code: |
      def main(pid):
          try:
              with open(f"/proc/{pid}/stat") as f:
                  return {"still_running": f.read().rsplit(")", 1)[1].split()[0] != "Z"}
          except FileNotFoundError:
              return {"still_running": False}
    next: [{step: end}]
  - step: end
"""


def _steal(home, **env):
    store = home / "store" / "noetl.db"
    return run_playbook(home, THIEF, payload={"store": str(store), "key_file": str(store.parent / "secret.key")},
                        env=engine_env(home, **env) if env else None)


def test_a_python_step_finds_no_engine_secret_with_the_key_in_the_environment(home):
    run = _steal(home)
    assert run.step("steal")["status"] == "COMPLETED", run.report
    found = run.step("steal")["result"]
    assert not any(k.startswith("NOETL_") for k in found["env"]), found["env"]   # scrubbed, not just filtered
    assert found["decrypted"] == [] or found["decrypted"] == "no cryptography"
    assert_no_engine_secret(run)


def test_a_python_step_cannot_read_the_key_file_or_the_store(home):
    """Without NOETL_SECRET_KEY the key lives in `secret.key` beside the store: both are 0600, the step's
    user is another one."""
    env = {k: v for k, v in engine_env(home).items() if k != "NOETL_SECRET_KEY"}
    store = home / "store" / "noetl.db"
    run = run_playbook(home, THIEF, payload={"store": str(store), "key_file": str(store.parent / "secret.key")},
                       env=env)
    found = run.step("steal")["result"]
    assert (store.parent / "secret.key").exists()     # the key file really is there
    key = (store.parent / "secret.key").read_text().strip()
    assert found[str(store)].startswith("refused") and found[str(store.parent / "secret.key")].startswith("refused")
    assert key not in run.everything and CREDENTIAL_SECRET not in run.everything
    assert_no_engine_secret(run)


@as_root
def test_python_steps_run_as_the_step_user_in_a_fresh_private_folder(home):
    run = _steal(home)
    found = run.step("steal")["result"]
    assert run.step("check")["result"] == {"still_running": False}
    assert found["uid"] == pwd.getpwnam("nobody").pw_uid
    workdir = found["cwd"]
    assert found["env"]["HOME"] == workdir == found["env"]["TMPDIR"]
    assert not os.path.exists(workdir)                # removed when the run's step process ended
    # the engine's memory and environment were out of reach
    assert run.pid in found["ancestors"]
    assert found["memory"][str(run.pid)][0].startswith("refused"), found["memory"]
    assert found[f"/proc/{run.pid}/environ"].startswith("refused")
    assert MASTER_KEY not in str(found) and DB_PASSWORD not in str(found)


def test_an_unprivileged_engine_is_not_readable_by_its_own_steps(home):
    """As a non-root user the engine cannot switch users: its steps share its uid. The engine is
    non-dumpable, so they still cannot read its environment or memory (the key is in NOETL_SECRET_KEY)."""
    if os.geteuid() == 0:
        run = run_playbook(home, THIEF, user="nobody", payload={"store": "", "key_file": ""})
    else:
        run = run_playbook(home, THIEF, payload={"store": "", "key_file": ""})
    assert run.step("steal")["status"] == "COMPLETED", run.report
    found = run.step("steal")["result"]
    assert run.pid in found["ancestors"] and found["uid"] == (pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0
                                                              else os.geteuid())
    assert found[f"/proc/{run.pid}/environ"].startswith("refused"), found[f"/proc/{run.pid}/environ"][:200]
    assert found["memory"][str(run.pid)][0].startswith("refused")
    assert run.step("check")["result"] == {"still_running": False}   # what the step started ended with it
    assert_no_engine_secret(run)
