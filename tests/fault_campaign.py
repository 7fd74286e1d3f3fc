"""A fault campaign: a mixed workload submitted over HTTP while a seeded killer SIGKILLs and restarts processes.

The harness is the same for both modes (tests/integration/test_fault_campaign.py gives it the processes):
- five playbooks (a chain, a fan-out + join, an async iterator, a step that fails once and is retried, a
  child playbook), each with one python step that records its side effect: it appends one line (execution
  id, key, step) to a file, so a step that ran twice shows up as a duplicate line;
- `EXECUTIONS` submissions, paced, each with an `Idempotency-Key` (its key), retried like a real client on
  connection errors, timeouts, 429 and 5xx with the same key;
- a killer thread that, every few seconds (seeded: the seed is printed and NOETL_FAULT_SEED replays it),
  SIGKILLs one victim's process group, restarts it the way a supervisor would (same command, environment
  and directory) and waits until it is ready again before choosing the next victim;
- then a deadline for every execution to end, and the verdict: hung (not terminal), lost (accepted but
  unknown, or a key without exactly one execution), wrong (COMPLETED with another result), failed (with
  the errors of their events), duplicate side effects (a figure, not a failure).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

EXECUTIONS = int(os.environ.get("NOETL_FAULT_EXECUTIONS", "60"))
KINDS = ("chain", "fanout", "iterator", "retry", "child")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
RETRYABLE = (429, 500, 502, 503, 504)
STEP_SECONDS = 1.0      # the recording step's length: with a submission every 0.5 s, kills hit running steps


# ---------------------------------------------------------------------------------------------- playbooks
def _record(out: Path, value: str) -> str:
    """Python code: sleep a little (so kills land in running steps), append the side effect, return value."""
    return (f"import json, os, time\n"
            f"def main(eid, key, step, **args):\n"
            f"    time.sleep({STEP_SECONDS})\n"
            f"    line = json.dumps({{'eid': eid, 'key': key, 'step': step, 'worker': os.getppid(),\n"
            f"                       'time': time.time()}}) + '\\n'\n"
            f"    fd = os.open({str(out)!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
            f"    os.write(fd, line.encode())\n"
            f"    os.close(fd)\n"
            f"    return {{'value': {value}}}\n")


def _recording(name: str, out: Path, value: str, nxt: str, **data: Any) -> dict[str, Any]:
    return {"step": name, "type": "python", "code": _record(out, value), "next": [{"step": nxt}],
            "data": {"eid": "{{ execution_id }}", "key": "{{ workload.key }}", "step": name, **data}}


def _python(name: str, code: str, nxt: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"step": name, "type": "python", "code": code, "next": nxt, **extra}


def _doc(kind: str, steps: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"apiVersion": "noetl.io/v1", "kind": "Playbook",
                           "metadata": {"name": f"campaign_{kind}", "path": f"campaign/{kind}"},
                           "workload": {"key": "", "n": 0, "items": []}, "workflow": steps}, sort_keys=False)


def playbooks(out: Path, marks: Path) -> dict[str, str]:
    """path -> YAML. Every root playbook's result is {key, value}; `expected` says the value."""
    end = {"step": "end", "result": {"key": "{{ workload.key }}", "value": "{{ rec.value }}"}}
    chain = [{"step": "start", "next": [{"step": "a"}]},
             _python("a", "def main(n):\n    return {'x': n + 1}\n", [{"step": "b"}], data={"n": "{{ workload.n }}"}),
             _python("b", "def main(x):\n    return {'x': x * 3}\n", [{"step": "rec"}], data={"x": "{{ a.x }}"}),
             _recording("rec", out, "args['x']", "end", x="{{ b.x }}"), end]
    fanout = [{"step": "start", "next": [{"step": "left"}, {"step": "right"}]},
              _python("left", "def main(n):\n    return {'x': n * 2}\n",
                      [{"step": "rec", "data": {"left": "{{ result.x }}"}}], data={"n": "{{ workload.n }}"}),
              _python("right", "def main(n):\n    return {'x': n + 5}\n",
                      [{"step": "rec", "data": {"right": "{{ result.x }}"}}], data={"n": "{{ workload.n }}"}),
              _recording("rec", out, "args['left'] + args['right']", "end"), end]
    iterator = [{"step": "start", "next": [{"step": "squares"}]},
                {"step": "squares", "type": "iterator", "collection": "{{ workload.items }}", "element": "item",
                 "mode": "async", "concurrency": 3, "next": [{"step": "rec"}],
                 "task": {"type": "python", "data": {"i": "{{ item }}"},
                          "code": "import time\ndef main(i):\n    time.sleep(0.3)\n    return {'sq': i * i}\n"}},
                _recording("rec", out, "sum(args['squares'])", "end",
                           squares="{{ squares | map(attribute='sq') | list }}"), end]
    flaky = _recording("rec", out, "args['n'] + 100", "end", n="{{ workload.n }}")
    flaky["code"] = flaky["code"].replace(
        f"    time.sleep({STEP_SECONDS})\n",
        f"    mark = {str(marks)!r} + '/' + key\n"
        f"    if not os.path.exists(mark):\n"
        f"        open(mark, 'w').close()\n"
        f"        raise RuntimeError('the first attempt fails on purpose')\n"
        f"    time.sleep({STEP_SECONDS})\n")
    flaky["retry"] = {"max_attempts": 3, "initial_delay": 0.2}
    retry = [{"step": "start", "next": [{"step": "rec"}]}, flaky, end]
    child = [{"step": "start", "next": [{"step": "rec"}]},
             _recording("rec", out, "args['x'] * 7", "end", x="{{ workload.n }}"),
             {"step": "end", "result": {"value": "{{ rec.value }}"}}]
    parent = [{"step": "start", "next": [{"step": "call"}]},
              {"step": "call", "type": "playbook", "path": "campaign/child_of",
               "data": {"n": "{{ workload.n }}", "key": "{{ workload.key }}"}, "next": [{"step": "end"}]},
              {"step": "end", "result": {"key": "{{ workload.key }}", "value": "{{ call.value }}"}}]
    return {"campaign/chain": _doc("chain", chain), "campaign/fanout": _doc("fanout", fanout),
            "campaign/iterator": _doc("iterator", iterator), "campaign/retry": _doc("retry", retry),
            "campaign/child_of": _doc("child_of", child), "campaign/child": _doc("child", parent)}


def expected(kind: str, n: int, items: list[int]) -> int:
    return {"chain": (n + 1) * 3, "fanout": n * 2 + n + 5, "iterator": sum(i * i for i in items),
            "retry": n + 100, "child": n * 7}[kind]


def _epoch(stamp: Any) -> float:
    """An event's timestamp (epoch seconds, or ISO 8601 as the API serves it) as epoch seconds."""
    if isinstance(stamp, (int, float)):
        return float(stamp)
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("nan")


# ------------------------------------------------------------------------------------------------ victims
@dataclass
class Victim:
    """A process the killer may SIGKILL: its process group dies (python children too), then `restart`
    brings it back and `ready` says when it serves again."""
    name: str
    kill: Callable[[], None]
    restart: Callable[[], None]
    ready: Callable[[], bool]
    weight: float = 1.0


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return value


def http_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def kill_group(pid: int, popen: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    """SIGKILL the process group `pid` leads and wait until `pid` is gone (reaped by us or by init)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if popen is not None:
        popen.wait(timeout)
        return

    def gone() -> bool:   # no such pid, or a zombie its parent has not reaped yet
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
    wait_for(gone, timeout, f"pid {pid} to die")


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Campaign:
    url: str
    headers: dict[str, str]
    victims: list[Victim]
    workdir: Path
    seed: int
    executions: int = EXECUTIONS
    pace: float = 0.5                  # seconds between submissions
    kill_every: tuple[float, float] = (3.0, 6.0)
    max_kills: int = 8                 # bounds the run's time: each kill is an outage the submissions wait out
    finish_within: float = 120.0
    kills: list[tuple[float, str]] = field(default_factory=list)
    in_flight: list[int] = field(default_factory=list)      # executions running at each kill
    refused: Counter[str] = field(default_factory=Counter)  # requests retried, by answer or error
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.out = self.workdir / "side_effects.jsonl"
        self.marks = self.workdir / "marks"
        # A worker started as root runs steps as NOETL_STEP_USER (nobody): the steps must be able to write here.
        self.marks.mkdir(parents=True, exist_ok=True)
        self.out.touch()
        for path, mode in ((self.workdir, 0o777), (self.marks, 0o777), (self.out, 0o666)):
            path.chmod(mode)
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=10)
        self.started, self.wall = time.monotonic(), time.time()

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        self.log.append(line)
        print(line, flush=True)

    # -- HTTP with a real client's patience: the same request again after a refusal or a dead connection
    def call(self, method: str, path: str, timeout: float = 60, **kwargs: Any) -> httpx.Response:
        deadline, delay = time.monotonic() + timeout, 0.2
        while True:
            try:
                answer = self.client.request(method, path, **kwargs)
                if answer.status_code not in RETRYABLE:
                    return answer
                why = f"{answer.status_code} {answer.text[:120]}"
                self.refused[str(answer.status_code)] += 1
                wait = float(answer.headers.get("Retry-After", delay)) if answer.status_code == 429 else delay
            except httpx.HTTPError as exc:   # connection refused/reset, timeout: the process is down
                why, wait = f"{type(exc).__name__}", delay
                self.refused[why] += 1
            if time.monotonic() + wait > deadline:
                raise AssertionError(f"{method} {path}: still refused after {timeout:.0f}s ({why})")
            time.sleep(min(wait, 5.0))
            delay = min(delay * 2, 2.0)

    def register(self, docs: dict[str, str]) -> None:
        for path, text in docs.items():
            answer = self.call("POST", "/api/catalog/register", json={"content": text})
            assert answer.status_code == 200, (path, answer.status_code, answer.text)

    # -- the killer
    def killer(self, stop: threading.Event) -> None:
        # Every victim once (in a seeded order), then at random, until the submissions are done; the first
        # round is finished even if the submissions end first (executions are still running then).
        first = self.rng.sample(self.victims, len(self.victims))
        while first or (not stop.is_set() and len(self.kills) < self.max_kills):
            time.sleep(self.rng.uniform(*self.kill_every))
            victim = first.pop() if first else self.rng.choices(self.victims, [v.weight for v in self.victims])[0]
            running = self.running()
            t = time.monotonic()
            victim.kill()
            self.kills.append((t - self.started, victim.name))
            self.in_flight.append(running)
            self.say(f"SIGKILL {victim.name} ({running} executions running)")
            victim.restart()
            wait_for(victim.ready, 90, f"{victim.name} ready after its restart")
            self.say(f"{victim.name} ready again after {time.monotonic() - t:.1f}s")

    def running(self) -> int:
        """Executions RUNNING now, as the API reports them (-1 if it does not answer): what a kill hits."""
        try:
            answer = self.client.get("/api/executions", params={"status": "RUNNING", "limit": 1}, timeout=2)
            return int(answer.headers.get("X-Total-Count", -1)) if answer.status_code == 200 else -1
        except httpx.HTTPError:
            return -1

    # -- the workload
    def plan(self) -> list[dict[str, Any]]:
        work = []
        for i in range(self.executions):
            kind = KINDS[i % len(KINDS)]
            n = self.rng.randint(0, 1000)
            items = [self.rng.randint(0, 50) for _ in range(self.rng.randint(2, 5))]
            work.append({"key": f"k{self.seed}-{i}", "kind": kind, "n": n, "items": items,
                         "expected": expected(kind, n, items)})
        return work

    def submit(self, item: dict[str, Any]) -> str:
        body = {"path": f"campaign/{item['kind']}",
                "parameters": {"key": item["key"], "n": item["n"], "items": item["items"]}}
        answer = self.call("POST", "/api/executions/run", json=body, headers={"Idempotency-Key": item["key"]})
        assert answer.status_code == 200, (item["key"], answer.status_code, answer.text)
        return answer.json()["execution_id"]

    def status(self, execution_id: str) -> dict[str, Any] | None:
        answer = self.call("GET", f"/api/executions/{execution_id}", params={"events": "false"})
        return answer.json() if answer.status_code == 200 else None

    def events(self, execution_id: str) -> list[dict[str, Any]]:
        answer = self.call("GET", f"/api/executions/{execution_id}/events")
        return answer.json().get("events", []) if answer.status_code == 200 else []

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.client.close()

    def _run(self) -> dict[str, Any]:
        self.say(f"seed {self.seed} (NOETL_FAULT_SEED={self.seed} replays it); {self.executions} executions")
        self.register(playbooks(self.out, self.marks))
        work = self.plan()
        stop = threading.Event()
        errors: list[BaseException] = []

        def guarded() -> None:
            try:
                self.killer(stop)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
        killer = threading.Thread(target=guarded, daemon=True)
        submit_start = time.monotonic()
        killer.start()
        ids: dict[str, str] = {}
        for item in work:
            ids[item["key"]] = self.submit(item)
            time.sleep(self.pace)
        stop.set()
        killer.join(180)
        assert not errors, f"the killer failed: {errors[0]!r}"
        assert not killer.is_alive(), "the killer did not stop"
        self.say(f"{len(ids)} submitted in {time.monotonic() - submit_start:.1f}s; {len(self.kills)} kills")

        states: dict[str, dict[str, Any] | None] = {}
        deadline = time.monotonic() + self.finish_within
        while time.monotonic() < deadline:
            for key, eid in ids.items():
                if (states.get(key) or {}).get("status") not in TERMINAL:
                    states[key] = self.status(eid)
            if all((s or {}).get("status") in TERMINAL for s in states.values()):
                break
            time.sleep(0.5)
        self.say(f"all ended {time.monotonic() - submit_start:.1f}s after the first submission"
                 if all((s or {}).get("status") in TERMINAL for s in states.values()) else "deadline passed")
        return self.verdict(work, ids, states)

    # -- the verdict
    def roots(self) -> list[str]:
        """Every root execution of the campaign's playbooks in the store: a retried submission that started
        a second execution shows up here as an id no submission was answered with."""
        found: list[str] = []
        for kind in KINDS:
            listed = self.call("GET", "/api/executions", params={"path": f"campaign/{kind}", "limit": 1000})
            assert listed.status_code == 200, listed.text
            found += [s["execution_id"] for s in listed.json() if not s.get("parent_execution_id")]
        return found

    def verdict(self, work: list[dict[str, Any]], ids: dict[str, str],
                states: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
        lost = sorted(k for k, s in states.items() if s is None)
        hung = sorted(k for k, s in states.items() if s is not None and s.get("status") not in TERMINAL)
        by_status = Counter((s or {}).get("status", "UNKNOWN") for s in states.values())
        wrong, failed = [], {}
        for item in work:
            state = states.get(item["key"]) or {}
            if state.get("status") == "COMPLETED":
                result = state.get("result")
                if result != {"key": item["key"], "value": item["expected"]}:
                    wrong.append((item["key"], item["kind"], ids[item["key"]], result, item["expected"]))
            elif state.get("status") == "FAILED":
                events = self.events(ids[item["key"]])
                failed[item["key"]] = {"kind": item["kind"], "execution_id": ids[item["key"]],
                                       "error": state.get("error"),
                                       "errors": [(e["event_type"], e.get("node_name"), e.get("attempt"),
                                                   e.get("error")) for e in events if e.get("error")]}
        retries: Counter[str] = Counter()     # action_retry events by kind (infrastructure | policy)
        for eid in ids.values():
            retries.update((e.get("result") or {}).get("kind", "policy") if isinstance(e.get("result"), dict)
                           else "policy" for e in self.events(eid) if e["event_type"] == "action_retry")
        stored = Counter(self.roots())
        not_one = {k: stored[eid] for k, eid in ids.items() if stored[eid] != 1}
        strays = sorted(set(stored) - set(ids.values()))
        lines = [json.loads(line) for line in self.out.read_text().splitlines()] if self.out.exists() else []
        effects = Counter(line["key"] for line in lines)
        completed = [item["key"] for item in work if (states.get(item["key"]) or {}).get("status") == "COMPLETED"]
        missing_effect = [k for k in completed if effects[k] == 0]
        duplicates = sum(n - 1 for n in effects.values() if n > 1)
        twice = [line for line in lines if effects[line["key"]] > 1]   # which process ran it, and when
        why = {}     # the events of each duplicated step: which attempts ran, where, and which retries
        for eid, step in sorted({(x["eid"], x["step"]) for x in twice}):
            why[eid] = [(e["event_type"], e.get("attempt"), (e.get("worker_id") or "")[-8:],
                         (e.get("result") or {}).get("kind") if isinstance(e.get("result"), dict) else None,
                         round(_epoch(e.get("timestamp")) - self.wall, 1))
                        for e in self.events(eid) if e.get("node_name") == step]
        return {"seed": self.seed, "executions": len(work), "kills": len(self.kills),
                "kills_by_victim": dict(Counter(v for _, v in self.kills)),
                "running_at_kills": self.in_flight, "kill_times": [(round(t, 1), v) for t, v in self.kills],
                "status": dict(by_status),
                "hung": hung, "lost": lost, "not_one_execution": not_one, "stray_executions": strays,
                "wrong": wrong, "failed": failed, "missing_side_effect": missing_effect,
                "side_effects": len(lines), "duplicate_side_effects": duplicates, "retries": dict(retries),
                "requests_retried": dict(self.refused),
                "duplicated": [(x["key"], x["eid"], x["step"], x["worker"], round(x["time"] - self.wall, 1))
                               for x in twice],
                "duplicated_events": why,
                "seconds": round(time.monotonic() - self.started, 1)}
