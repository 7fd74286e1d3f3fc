"""The NoETL DSL v10 constructs that gate or name a step's run, read at load (docs/dialect-v10.md):
`executor.spec.final_step` / `no_next_is_error` (V10-1.8), step `spec.policy.admit` (V10-5.9) and
`tool.output.as` (V10-10.3). Part of the second front end (dsl/v10.py); the fold applies them
(engine/v10_gates.py). Nothing here raises: problems go to `Issues` with location paths.
"""
from __future__ import annotations

from typing import Any

from .models import Step
from .validate import Issues

RESERVED = {"execution_id", "catalog_id", "job", "event", "output", "result", "iter", "ctx", "workload", "input",
            "keychain", "secret", "vars", "outcome", "error", "response", "this", "results", "_prev", "_task",
            "_attempt"}


def executor_spec(doc: dict, issues: Issues) -> dict[str, Any]:
    executor = doc.get("executor")
    if executor is None:
        return {}
    if not isinstance(executor, dict):
        issues.error("executor", "executor must be a mapping (profile, version, requires, spec)")
        return {}
    spec = executor.get("spec")
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        issues.error("executor.spec", "executor.spec must be a mapping (entry_step, final_step, no_next_is_error)")
        return {}
    return spec


def final_step(doc: dict, steps: dict[str, Step], entry: str, issues: Issues) -> str | None:
    """V10-1.8 `final_step`: a step of the workflow, run once after the rest is quiescent. It is reached by
    no arc (it would then run mid-run as well), is not the entry, and has no `next` (it ends the run)."""
    spec = executor_spec(doc, issues)
    final = spec.get("final_step")
    if final is None:
        return None
    where = "executor.spec.final_step"
    if not isinstance(final, str) or final not in steps:
        issues.error(where, f"final_step {final!r} names no step of the workflow")
        return None
    if final == entry:
        issues.error(where, f"final_step '{final}' is also the entry step: the final step runs after the "
                            f"workflow, once")
    for step in steps.values():
        for edge in step.next:
            if edge.step == final:
                issues.error(f"{edge.path}.step", f"arc to '{final}', the executor's final_step: the final step "
                                                  f"runs once after every other step has ended, never by an arc")
    if steps[final].next:
        issues.error(f"{steps[final].path}.next", f"final step '{final}' has next arcs: the final step ends the "
                                                  f"execution (route before it instead)")
    return final


def no_next_is_error(doc: dict, issues: Issues) -> bool:
    value = executor_spec(doc, issues).get("no_next_is_error", False)
    if not isinstance(value, bool):
        issues.error("executor.spec.no_next_is_error", f"no_next_is_error must be true or false, got {value!r}")
        return False
    return value


def admit_rules(spec: Any, path: str, issues: Issues) -> list[dict[str, Any]]:
    """V10-5.9 `spec.policy.admit.rules: [{when, then: {allow}}, {else: {then: {allow}}}]` -> [{when, allow,
    path}] (`when` None for the else rule). `else: {allow: x}` is read as `else: {then: {allow: x}}`, as
    policy rules are (V10-9.1)."""
    policy = spec.get("policy") if isinstance(spec, dict) else None
    if not isinstance(policy, dict) or "admit" not in policy:
        return []
    where = f"{path}.policy.admit"
    admit = policy["admit"]
    rules = admit.get("rules") if isinstance(admit, dict) else None
    if not isinstance(rules, list):
        issues.error(where, "admit needs rules: [{when, then: {allow: true|false}}, {else: {then: {allow}}}]")
        return []
    out = []
    for i, rule in enumerate(rules):
        at = f"{where}.rules[{i}]"
        if not isinstance(rule, dict):
            issues.error(at, "an admit rule must be a mapping (when/then or else)")
            continue
        if "else" in rule:
            body = rule["else"] if isinstance(rule["else"], dict) else {}
            then, when = body.get("then", body if "allow" in body else None), None
        else:
            then, when = rule.get("then"), rule.get("when")
            if when is None:
                issues.error(f"{at}.when", "an admit rule needs when: (or is an else: rule)")
                continue
            if not isinstance(when, str):
                when = "true" if when is True else "false" if when is False else str(when)
        if not isinstance(then, dict) or not isinstance(then.get("allow"), bool):
            issues.error(f"{at}.then.allow", "an admit rule needs then.allow: true or false")
            continue
        out.append({"when": when, "allow": then["allow"], "path": at})
    return out


def output_alias(output: Any, path: str, issues: Issues) -> str | None:
    """V10-10.3 Decision: `output.as: name` is an extra name for the result; the other `output` keys
    (external result storage) are ignored with a warning, as before."""
    if output is None:
        return None
    if not isinstance(output, dict):
        issues.warn(path, "output (external result storage) is ignored: results stay inline")
        return None
    others = sorted(str(k) for k in output if k != "as")
    if others:
        issues.warn(path, f"output {', '.join(others)} (external result storage) ignored: results stay inline")
    alias = output.get("as")
    if alias is None:
        return None
    if not isinstance(alias, str) or not alias.isidentifier():
        issues.error(f"{path}.as", f"output.as must be a plain name, got {alias!r}")
        return None
    if alias in RESERVED:
        issues.error(f"{path}.as", f"output.as '{alias}' is a reserved template name (V10-6.1)")
        return None
    return alias


def alias_clashes(raw_steps: list, steps: dict[str, Step], issues: Issues) -> None:
    """An `output.as` naming a step would be shadowed by that step's result (V10-7.7): a load error."""
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            continue
        tool = raw.get("tool")
        places = [(f"workflow[{i}].output", raw.get("output"))]
        if isinstance(tool, dict):
            places.append((f"workflow[{i}].tool.output", tool.get("output")))
        elif isinstance(tool, list):
            places += [(f"workflow[{i}].tool[{j}].output", task.get("output"))
                       for j, task in enumerate(tool) if isinstance(task, dict)]
        for path, output in places:
            alias = output.get("as") if isinstance(output, dict) else None
            if isinstance(alias, str) and alias in steps:
                issues.error(f"{path}.as", f"output.as '{alias}' names step '{alias}', whose result that name "
                                           f"already reads: pick another name")
