"""Unit tests for noetl_common.render (DSL section 5 templates)."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from noetl_common.render import (
    TemplateError,
    evaluate,
    missing_paths,
    referenced_names,
    render,
    syntax_error,
    this_view,
    truthy,
    unwrap,
)

ITEMS = [{"id": 1, "name": "<a&b>"}, {"id": 2, "name": "c'd"}]


@pytest.fixture
def ctx():
    return {
        "workload": {
            "n": 3, "ratio": 0.5, "flag": True, "items": ITEMS, "nested": {"deep": {"value": 42}},
            "keys": "K", "values": [7, 8], "who": "me",
        },
        "envelope": {"x": 10, "text": "[1]"},
        "rows": [{"v": 1}, {"v": 2}],
        "execution_id": "e-1",
        "s": "true",
    }


# --- native values ----------------------------------------------------------------------

@pytest.mark.parametrize("template, expected, typ", [
    ("{{ workload.n }}", 3, int),
    ("{{ workload.ratio }}", 0.5, float),
    ("{{ workload.flag }}", True, bool),
    ("{{ workload.items }}", ITEMS, list),
    ("{{ workload.nested }}", {"deep": {"value": 42}}, dict),
    ("{{ workload.nested.deep.value }}", 42, int),
    ("{{ workload.n + workload.nested.deep.value }}", 45, int),
    ("  {{ workload.n }}\n", 3, int),
    ("{{- workload.n -}}", 3, int),
    ("{{ workload.who }}", "me", str),
    ("{{ none }}", None, type(None)),
    ("{{ [workload.n, 2] }}", [3, 2], list),
    ("{{ rows | map(attribute='v') }}", [1, 2], list),   # generator materialised
    ("{{ execution_id | length > 0 }}", True, bool),
])
def test_lone_expression_keeps_native_type(ctx, template, expected, typ):
    got = render(template, ctx)
    assert got == expected
    assert type(got) is typ


def test_native_list_is_the_same_object_not_a_copy(ctx):
    assert render("{{ workload.items }}", ctx) is ctx["workload"]["items"]


def test_str_result_is_never_reparsed(ctx):
    assert render("{{ workload.items | tojson }}", ctx) == json.dumps(ITEMS)
    assert render("{{ envelope.text }}", ctx) == "[1]"
    assert render("{{ '42' }}", ctx) == "42"
    assert render("{{ 'True' }}", ctx) == "True"
    assert render("{{ '{\"a\": 1}' }}", ctx) == '{"a": 1}'


def test_mixed_text_renders_to_str(ctx):
    assert render("n={{ workload.n }}", ctx) == "n=3"
    assert render("{{ workload.n }}{{ workload.n }}", ctx) == "33"
    assert render("{{ workload.n }} and {{ workload.who }}", ctx) == "3 and me"
    assert render("{% if workload.flag %}yes{% endif %}", ctx) == "yes"
    assert render("{% for r in rows %}{{ r.v }},{% endfor %}", ctx) == "1,2,"


def test_non_templates_pass_through(ctx):
    assert render("plain {text} }}", ctx) == "plain {text} }}"
    assert render(5, ctx) == 5
    assert render(None, ctx) is None
    obj = object()
    assert render(obj, ctx) is obj


def test_recursive_render_keys_untouched(ctx):
    value = {"{{ k }}": "{{ workload.n }}", "l": ["{{ workload.flag }}", "x={{ workload.n }}", 1],
             "d": {"deep": "{{ workload.nested.deep }}"}}
    assert render(value, ctx) == {"{{ k }}": 3, "l": [True, "x=3", 1], "d": {"deep": {"value": 42}}}
    assert value["l"][0] == "{{ workload.flag }}"   # input not mutated


def test_evaluate(ctx):
    assert evaluate("{{ workload.n > 2 }}", ctx) is True
    assert evaluate("{{ workload.items }}", ctx) == ITEMS
    assert evaluate("true", ctx) == "true"


# --- lookups ------------------------------------------------------------------------------

def test_keys_win_over_dict_methods(ctx):
    assert render("{{ workload.items }}", ctx) == ITEMS
    assert render("{{ workload.keys }}", ctx) == "K"
    assert render("{{ workload.values }}", ctx) == [7, 8]
    assert render("{{ workload['items'] }}", ctx) == ITEMS
    assert render("{{ workload['values'][1] }}", ctx) == 8


def test_dict_methods_still_usable_when_no_such_key(ctx):
    assert render("{% for k, v in envelope.items() %}{{ k }}{% endfor %}", ctx) == "xtext"


def test_keys_win_on_mapping_subclass():
    class Secrets(Mapping):
        def __init__(self, d): self._d = d
        def __getitem__(self, k): return self._d[k]
        def __iter__(self): return iter(self._d)
        def __len__(self): return len(self._d)

    assert render("{{ secret.items }}", {"secret": Secrets({"items": "s3cr3t"})}) == "s3cr3t"
    assert render("{{ secret.data.items }}", {"secret": Secrets({"items": "s"})}) == "s"


def test_lenient_data_result_on_dicts(ctx):
    for t in ("{{ envelope.x }}", "{{ envelope.data.x }}", "{{ envelope.result.data.x }}",
              "{{ envelope.result.x }}", "{{ envelope['data']['x'] }}"):
        assert render(t, ctx) == 10, t


def test_real_data_key_wins_over_lenient(ctx):
    c = {"r": {"data": {"x": 1}, "x": 2}}
    assert render("{{ r.data.x }}", c) == 1
    assert render("{{ r.x }}", c) == 2


def test_lenient_data_result_on_lists(ctx):
    assert render("{{ rows.data }}", ctx) == ctx["rows"]
    assert render("{{ rows.result }}", ctx) == ctx["rows"]
    assert render("{{ rows.data[1].v }}", ctx) == 2
    assert render("{{ rows['data'] | length }}", ctx) == 2


# --- undefined ------------------------------------------------------------------------------

def test_lenient_data_result_on_null():
    # a control step's result is null: `{{ start.data }}` is that null, but nothing goes further down it
    assert render("{{ start.data }}", {"start": None}) is None
    assert render("{{ start['result'] }}", {"start": None}) is None
    with pytest.raises(TemplateError, match="'x'"):
        render("{{ start.data.x }}", {"start": None})
    with pytest.raises(TemplateError, match="'other'"):
        render("{{ start.other }}", {"start": None})


def test_undefined_name_error_names_it(ctx):
    with pytest.raises(TemplateError) as ei:
        render("{{ workload.not_there_at_all }}", ctx)
    msg = str(ei.value)
    assert "undefined name 'not_there_at_all' in template '{{ workload.not_there_at_all }}'" == msg
    assert ei.value.template == "{{ workload.not_there_at_all }}"
    assert ei.value.cause is not None


@pytest.mark.parametrize("template, name", [
    ("{{ nope }}", "nope"),
    ("x {{ nope }} y", "nope"),
    ("{{ nope.deeper }}", "nope"),
    ("{{ workload.missing.deeper }}", "missing"),
    ("{{ [1, nope] }}", "nope"),        # undefined inside a computed native value
    ("a {{ [1, nope] }}", "nope"),      # and inside text (repr must not print 'Undefined')
    ("{{ {'k': nope} }}", "nope"),
])
def test_undefined_anywhere_fails(ctx, template, name):
    with pytest.raises(TemplateError, match=f"'{name}'"):
        render(template, ctx)


def test_undefined_inside_recursive_render_fails(ctx):
    with pytest.raises(TemplateError, match="absent"):
        render({"a": ["{{ workload.absent }}"]}, ctx)


def test_list_index_out_of_range(ctx):
    with pytest.raises(TemplateError, match="no element 5"):
        render("{{ rows[5] }}", ctx)


def test_default_and_is_defined(ctx):
    assert render("{{ workload.absent | default('dflt') }}", ctx) == "dflt"
    assert render("{{ nope | default(7) }}", ctx) == 7
    assert render("{{ nope is defined }}", ctx) is False
    assert render("{{ workload.n is defined }}", ctx) is True
    assert render("{{ workload.absent is defined }}", ctx) is False
    assert render("{% if nope is defined %}a{% else %}b{% endif %}", ctx) == "b"


def test_python_errors_become_template_errors(ctx):
    with pytest.raises(TemplateError, match="ZeroDivisionError") as ei:
        render("{{ 1 / 0 }}", ctx)
    assert isinstance(ei.value.cause, ZeroDivisionError)
    with pytest.raises(TemplateError, match="not json"):
        render("{{ 'not json' | fromjson }}", ctx)


# --- filters ------------------------------------------------------------------------------

def test_tojson_is_plain_json_dumps(ctx):
    assert render("{{ workload.items | tojson }}", ctx) == \
        '[{"id": 1, "name": "<a&b>"}, {"id": 2, "name": "c\'d"}]'
    assert render("x={{ {'a': 1, 'b': [1, 2]} | tojson }}", ctx) == 'x={"a": 1, "b": [1, 2]}'


def test_fromjson(ctx):
    got = render("{{ '{\"k\": [1, 2]}' | fromjson }}", ctx)
    assert got == {"k": [1, 2]} and type(got) is dict


def test_b64(ctx):
    assert render("{{ 'hi' | b64encode }}", ctx) == "aGk="
    assert render("{{ 'aGk=' | b64decode }}", ctx) == "hi"
    assert render("{{ 'héllo ✓' | b64encode | b64decode }}", ctx) == "héllo ✓"


def test_no_nondeterministic_helpers(ctx):
    with pytest.raises(TemplateError):
        render("{{ [1, 2] | random }}", ctx)
    with pytest.raises(TemplateError):
        render("{{ lipsum() }}", ctx)
    with pytest.raises(TemplateError, match="now"):
        render("{{ now() }}", ctx)       # not a global: the caller supplies it
    assert render("{{ now() }}", {"now": lambda: "2026-01-01T00:00:00Z"}) == "2026-01-01T00:00:00Z"


def test_builtin_globals_still_available(ctx):
    assert render("{{ range(3) | list }}", ctx) == [0, 1, 2]
    assert render("{% set ns = namespace(t=0) %}{% for r in rows %}{% set ns.t = ns.t + r.v %}"
                  "{% endfor %}{{ ns.t }}", ctx) == "3"


# --- sandbox ------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "x {{ workload.__class__ }}",
    "{{ workload['__class__'] }}",
    "{{ rows.__len__() }}",
    "{{ (1).__class__.__subclasses__() }}",
])
def test_sandbox_blocks_internals(ctx, template):
    with pytest.raises(TemplateError, match="unsafe|undefined"):
        render(template, ctx)


def test_templates_cannot_mutate_context(ctx):
    with pytest.raises(TemplateError):
        render("{{ workload.values.append(9) }}", ctx)
    with pytest.raises(TemplateError):
        render("{% set _ = envelope.update({'x': 0}) %}", ctx)
    assert ctx["workload"]["values"] == [7, 8] and ctx["envelope"]["x"] == 10
    render("{% set workload = 1 %}{{ workload }}", ctx)
    assert isinstance(ctx["workload"], dict)


# --- truthy ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (None, False), (0, False), (1, True), (0.0, False), (2.5, True),
    ([], False), ([0], True), ({}, False), ({"a": 1}, True),
    ("true", True), ("TRUE", True), (" Yes ", True), ("1", True), ("anything", True),
    ("false", False), ("False", False), ("no", False), ("0", False), ("none", False),
    ("None", False), ("null", False), ("NULL", False), ("", False), ("  ", False), (" false\n", False),
])
def test_truthy(value, expected):
    assert truthy(value) is expected


def test_when_rendering_then_truthy(ctx):
    assert truthy(evaluate("{{ s }}", ctx)) is True
    assert truthy(evaluate("{{ workload.n > 5 }}", ctx)) is False
    assert truthy(evaluate("{{ 'false' }}", ctx)) is False


# --- syntax_error, referenced_names --------------------------------------------------------

def test_syntax_error():
    assert syntax_error("{{ workload.x }}") is None
    assert syntax_error("plain") is None
    assert syntax_error("a {{ x }} {% if y %}b{% endif %}") is None
    msg = syntax_error("{{ workload.x + }}")
    assert msg is not None and "{{ workload.x + }}" in msg
    assert syntax_error("{% if x %}") is not None
    assert syntax_error("{{ x | no_such_filter }}") is not None


def test_syntax_error_at_render(ctx):
    with pytest.raises(TemplateError, match="syntax error"):
        render("{{ workload.x + }}", ctx)
    with pytest.raises(TemplateError, match="syntax error"):   # cached error re-raised
        render("{{ workload.x + }}", ctx)


def test_referenced_names():
    value = {"a": "{{ workload.n }} {{ step1.data.x }}", "b": ["{{ vars.y }}", 3, "plain"],
             "c": {"d": "{% for i in items %}{{ i }}{{ loop.index }}{% endfor %}"},
             "k": "{% set z = 1 %}{{ z }}"}
    assert referenced_names(value) == {"workload", "step1", "vars", "items"}
    assert referenced_names("no templates") == set()
    assert referenced_names(5) == set()
    names = referenced_names("{{ a }}")
    names.add("mutated")
    assert referenced_names("{{ a }}") == {"a"}     # cache is not exposed


# --- this_view, unwrap, missing_paths -----------------------------------------------------

def test_this_view_dict():
    r = {"profile_score": 5, "url": "u"}
    v = this_view(r)
    assert v == {"profile_score": 5, "url": "u", "data": r, "result": r,
                 "status": "COMPLETED", "error": None}
    assert render("{{ this.data.url }}|{{ this.profile_score }}|{{ this.result.url }}",
                  {"this": v}) == "u|5|u"


def test_this_view_non_dict_and_failure():
    v = this_view([1, 2], status="FAILED", error="boom")
    assert v == {"data": [1, 2], "result": [1, 2], "status": "FAILED", "error": "boom"}
    assert this_view(None)["data"] is None


def test_this_view_overlay_wins():
    r = {"status": 200, "data": {"a": 1}}
    v = this_view(r)
    assert v["status"] == "COMPLETED" and v["data"] is r


def test_unwrap():
    assert unwrap({"status": "success", "data": {"x": 1}}) == {"x": 1}
    assert unwrap({"status": "ok", "data": None}) is None
    assert unwrap({"data": 1}) == {"data": 1}
    assert unwrap({"status": 1}) == {"status": 1}
    assert unwrap([1]) == [1]
    assert unwrap("s") == "s"


def test_missing_paths():
    v = {"summary": {"count": 0, "rows": [{"id": 1}]}, "flag": None}
    assert missing_paths(v, ["summary.count", "summary.total", "status_flag", "flag"]) == \
        ["summary.total", "status_flag"]
    assert missing_paths(v, ["summary.rows.0.id", "summary.rows.1", "summary.rows.x",
                             "summary.count.x"]) == ["summary.rows.1", "summary.rows.x", "summary.count.x"]
    assert missing_paths([{"a": 1}], ["0.a", "-1.a", "data"]) == ["data"]
    assert missing_paths(None, ["a"]) == ["a"]
    assert missing_paths(v, []) == []


# --- values: every rendered value is JSON or a TemplateError naming the template (docs/decisions.md) ------

@pytest.mark.parametrize("template, says", [
    ("{{ workload.items }}", "`workload.items` is a method of the mapping, not a value (the mapping has no key "
                             "'items') in template '{{ workload.items }}'"),
    ("{{ workload['values'] }}", "is a method of the mapping"),   # keys win: this one exists
    ("{{ cycler }}", "`cycler` is a class (Cycler), not a value"),
    ("{{ dict }}", "`dict` is a class (dict), not a value"),
    ("{{ now }}", "`now` is a function, not a value (call it: add `()`)"),
    ("{{ 'abc'.upper }}", "is a method of str, not a value"),
    ("{{ namespace(a=1) }}", "is a Namespace object, not a JSON value"),
    ("{{ joiner() }}", "is a callable Joiner object, not a value"),
    ("{{ workload.nan | float }}", "is nan, not a JSON number"),
    ("{{ workload.inf | float }}", "is inf, not a JSON number"),
    ("{{ {1: 2} }}", "is a key 1 (int): JSON object keys are strings"),
    ("{{ {'a': [1, workload.keys]} }}", "holds a method of the mapping, not a value (the mapping has no key "
                                        "'keys') at ['a'][1]"),
    ("{{ '\\ud800' }}", "is a string with a lone surrogate (not valid Unicode)"),
    ("{{ 10 ** 5000 }}", "10 ** 5000 has more than 4300 digits"),
    ("{{ 2 ** 100000000 }}", "has more than 4300 digits"),
    ("{{ 'x' * 100000000 }}", "a str repeated 100000000 times is longer than 10,000,000"),
    ("{{ [0] * 100000000 }}", "a list repeated 100000000 times is longer than 10,000,000"),
    ("n={{ workload.items }}", "an expression in the text is a method of the mapping, not a value"),
    ("{% for x in [1] %}{{ cycler }}{% endfor %}", "an expression in the text is a class (Cycler)"),
    ("a{{ '\\ud800' }}", "an expression in the text is a string with a lone surrogate"),
])
def test_a_template_that_produces_no_json_value_is_an_error_naming_it(ctx, template, says):
    ctx = {**ctx, "now": lambda: "t", "workload": {**ctx["workload"], "nan": "nan", "inf": "inf"}}
    ctx["workload"].pop("items")
    ctx["workload"].pop("values")
    ctx["workload"].pop("keys")
    with pytest.raises(TemplateError) as info:
        render(template, ctx)
    assert says in str(info.value) and repr(template) in str(info.value)


def test_json_values_still_render_natively(ctx):
    assert render("{{ 10 ** 4299 > 1 }}", ctx) is True
    assert render("{{ 2 ** 62 }}", ctx) == 2 ** 62
    assert render("{{ 'ab' * 3 }}", ctx) == "ababab" and render("{{ [1] * 3 }}", ctx) == [1, 1, 1]
    # a tuple is a JSON array, handed back as the list it becomes in JSON (a replay sees the same value)
    assert render("{{ (1, 'a') }}", ctx) == [1, "a"]
    assert render("{{ {'a': 1} | dictsort }}", ctx) == [["a", 1]]
    assert render("{{ 'é\\U0001F600' }}", ctx) == "é\U0001F600"
    assert render("{{ {'k.with.dots': 1, '': 2} }}", ctx) == {"k.with.dots": 1, "": 2}
    assert render("{{ workload.ratio * 2 }}", ctx) == 1.0
    assert render("{{ workload.items() | list | length }}", {"workload": {"a": 1}}) == 1   # calling is fine


def test_a_value_nested_deeper_than_the_limit_is_refused():
    from noetl_common.render import value_problem
    deep: list = []
    for _ in range(100):
        deep = [deep]
    assert value_problem(deep) == ("a value nested deeper than 100 levels", "[0]" * 100)
    assert value_problem(deep[0]) is None
    with pytest.raises(TemplateError, match="nested deeper than 100 levels"):
        render("{{ x | list }}", {"x": deep})
    # a template nested deeper than Jinja's parser can follow is a syntax error, for the validator too
    literal = "{{ " + "[" * 300 + "]" * 300 + " }}"
    with pytest.raises(TemplateError, match="nested too deeply to parse"):
        render(literal, {})
    assert syntax_error(literal) and "nested too deeply" in syntax_error(literal)
    assert referenced_names({"k": "{{ x }}"}) == {"x"}
    with pytest.raises(TemplateError, match="nested too deeply"):
        referenced_names({"k": literal})


def test_a_pure_path_to_context_data_is_not_walked_again():
    big = {"rows": [{"i": i} for i in range(50_000)]}
    assert render("{{ workload.big }}", {"workload": {"big": big}}) is big


def test_evaluate_and_truthy_refuse_a_method_too(ctx):
    with pytest.raises(TemplateError, match="method of the mapping"):
        evaluate("{{ {'a': 1}.items }}", ctx)


def test_value_problem_reports_the_first_problem_and_its_place():
    from noetl_common.render import value_problem
    assert value_problem({"a": [1, "x", None, True, 1.5, (2,)]}) is None
    assert value_problem({"a": [1, {2}]}) == ("a set, not a JSON value (make it a list: `| list | sort`)", "['a'][1]")
    assert value_problem(b"x") == ("bytes, not a JSON value (decode it to text)", "")
    assert value_problem(10 ** 4300)[0] == "an integer of more than 4300 digits"
    assert value_problem(10 ** 4299) is None
