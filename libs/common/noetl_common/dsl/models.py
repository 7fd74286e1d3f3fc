"""The normalised playbook: what `load_playbook` produces and what the engine reads.

Aliases are already folded (`with/args/params` into `data`, `url` into `endpoint`, `sql/query/commands` into
`command`, `credential(s)` into `auth`, `steps` into `workflow`), workbook references are already resolved
into the entry's action, and every template is still a raw string: rendering happens at run time.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .read_only import refuse_edit, sealed

ACTION_TYPES = ("python", "http", "postgres", "duckdb", "playbook", "save", "secrets", "iterator")
CONTROL_TYPES = ("start", "end", "route")
SAVE_STORAGES = ("event", "postgres", "duckdb", "http", "python", "variable")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def __setattr__(self, name: str, value: Any) -> None:
        if sealed(self):   # a loaded playbook is shared by every run of it (read_only.py)
            refuse_edit()
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if sealed(self):
            refuse_edit()
        super().__delattr__(name)


class RetryPolicy(_Model):
    max_attempts: int = 3
    initial_delay: float = 0.0
    backoff_multiplier: float = 2.0
    max_delay: float = 60.0
    jitter: bool = False
    retry_when: str | None = None      # template; None = retry on any failure
    stop_when: str | None = None       # template; checked first

    def delay_before(self, next_attempt: int) -> float:
        """Seconds to wait before attempt `next_attempt` (2-based): min(initial × mult^(n-2), max)."""
        return min(self.initial_delay * self.backoff_multiplier ** (next_attempt - 2), self.max_delay)


class Edge(_Model):
    """One `next` entry. Either a target (`step`) or a then/else block (`then` is not None)."""
    step: str | None = None
    when: str | None = None            # template text; None = unconditional
    data: dict[str, Any] = Field(default_factory=dict)   # edge data (templates), merged over the target's data
    then: list[Edge] | None = None
    otherwise: list[Edge] | None = None   # the `else` list
    set: dict[str, Any] = Field(default_factory=dict)    # v10 arc `set` (V10-5.4): scope.key -> template
    path: str = ""                     # location, e.g. "workflow[3].next[0]"


class SaveSpec(_Model):
    """A normalised `save` block. `storage` is one of SAVE_STORAGES; `variable` is `save: {name: X, data: ...}`."""
    storage: str = "event"
    name: str | None = None            # variable name (storage == "variable")
    data: Any = None                   # template(s): rendered on the action side with result/this bound
    table: str | None = None
    mode: Literal["insert", "upsert"] = "insert"
    key: list[str] = Field(default_factory=list)
    auth: Any = None
    url: str | None = None
    method: str = "POST"
    headers: dict[str, Any] = Field(default_factory=dict)
    code: str | None = None            # python storage: main(data) (never rendered)
    command: str | None = None         # duckdb/postgres storage: explicit SQL (statement/commands/sql)
    database: str | None = None        # duckdb storage: file


class Step(_Model):
    name: str
    type: str | None = None            # None = control step; else one of ACTION_TYPES
    desc: str | None = None
    data: dict[str, Any] | str = Field(default_factory=dict)   # str: one `{{ expr }}` giving the inputs (§5)
    next: list[Edge] = Field(default_factory=list)
    save: SaveSpec | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None
    assert_expects: list[str] = Field(default_factory=list)
    assert_returns: list[str] = Field(default_factory=list)
    auth: Any = None
    max_visits: int = 100
    has_result: bool = False           # a `result:` key was given (its value may legitimately be null)
    result: Any = None
    # Action keys by kind (templates except `code`):
    #   python: code | http: endpoint, method, headers | postgres/duckdb: command, database
    #   playbook: path, version, return_step | secrets: name(s)
    config: dict[str, Any] = Field(default_factory=dict)
    iterator: IteratorSpec | None = None
    path: str = ""                     # location, e.g. "workflow[3]"
    line: int | None = None
    # v2/v10 (docs/dialect-v10.md): how `next` fires ("all" = v1 §3; "exclusive" = first match;
    # "inclusive" = every match) and the step-level `set` applied after a successful visit.
    next_mode: Literal["all", "exclusive", "inclusive"] = "all"
    set: dict[str, Any] = Field(default_factory=dict)
    # v10 `spec.policy.admit.rules` (V10-5.9), checked when the step is about to start: [{when, allow, path}]
    # (`when` None = the else rule); the first match decides, no match allows.
    admit: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def is_control(self) -> bool:
        return self.type is None


class IteratorSpec(_Model):
    collection: Any                    # template or literal list/dict
    element: str
    mode: Literal["sequential", "async"] = "sequential"
    concurrency: int = 1               # 1 for sequential; default 8 for async
    where: str | None = None
    order_by: str | None = None
    limit: int | None = None
    chunk: int | None = None
    task: Step                         # the nested action (name = the iterator step's name)
    # v10 `loop:` (V10-8.4/8.5): every iteration runs whatever fails, and the step result is
    # {results, stats} instead of the list of results.
    collect_all: bool = False


class Playbook(_Model):
    api_version: str
    kind: str = "Playbook"
    name: str
    path: str
    version: str | None = None
    description: str | None = None
    workload: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, Step]             # workflow steps by name, in document order
    dialect: Literal["v1", "v2", "v10"] = "v1"
    entry: str = "start"               # the first step (v10: executor.spec.entry_step or the first step)
    ctx: dict[str, Any] = Field(default_factory=dict)   # v10 root `ctx:` (V10-7.5): seeds the ctx map
    # v10 executor.spec (V10-1.8): the step run once after the workflow is quiescent, whatever its outcome,
    # and whether a step whose arcs all miss fails (instead of ending its branch).
    final: str | None = None
    no_next_is_error: bool = False

    def step(self, name: str) -> Step:
        return self.steps[name]


class Problem(_Model):
    """One validation problem, located."""
    path: str                          # e.g. "workflow[3].next[0].step"
    line: int | None = None
    message: str
    severity: Literal["error", "warning"] = "error"


Step.model_rebuild()
IteratorSpec.model_rebuild()
