"""Issue 9 scope 5: the template sandbox refuses values that would cost seconds of CPU or gigabytes at once.

Findings: `{{ 7**(10**7) }}` blocked the server's loop for 6-10 s; `{{ 'a'*10**9 }}` took it to 1 GB. Each
bomb below must be refused with a TemplateError naming the limit, before the value is built; ordinary uses
of the same operators keep working.
"""
from __future__ import annotations

import pytest

from noetl_common.render import TemplateError, render

BOMBS = [
    "{{ 7**(10**7) }}",                          # seconds of CPU in one bytecode
    "{{ 2**(2**40) }}",
    "{{ (10**5000) * (10**5000) * (10**5000) * (10**5000) * (10**5000) }}",
    "{{ 'a'*10**9 }}",                           # 1 GB string
    "{{ 10**9*'a' }}",
    "{{ [0]*10**9 }}",                           # 8 GB list
    "{{ ('a',)*10**8 }}",
    "{{ '%0999999999d' % 1 }}",                  # padding through %-formatting
    "{{ '%*d' % (10**9, 1) }}",
    "{{ '%0999999999d' | format(1) }}",
    "{{ '{:>999999999}'.format(1) }}",           # ... through str.format
    "{{ '{:>{}}'.format(1, 10**9) }}",
    "{{ 'a'.ljust(10**9) }}",                    # ... through str methods and filters
    "{{ 'a'.zfill(10**9) }}",
    "{{ 'a' | center(10**9) }}",
    "{{ ('\n' * 10**6) | indent(10**4) }}",
    "{{ ('\t' * 10**6).expandtabs(10**4) }}",
    "{{ ('a'*10**6).replace('a', 'a'*10**6) }}",  # growth by substitution and joining
    "{{ ('a'*10**6).join(['x']*10**6) }}",
    "{{ (['a'*10**6]*10**6) | join }}",
    "{% for i in range(10**9) %}{% endfor %}",   # Jinja's own range bound still holds
]


@pytest.mark.parametrize("template", BOMBS)
def test_the_sandbox_refuses_a_value_too_large_to_build(template):
    with pytest.raises(TemplateError) as err:
        render(template, {})
    assert any(says in str(err.value) for says in ("too large", "not allowed", "Range too big", "more than",
                                                   "longer than")), err.value


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ 2**10 }}", 1024),
    ("{{ 2**64 }}", 2**64),
    ("{{ 1**(10**9) }}", 1),
    ("{{ (-1)**(10**9+1) }}", -1),
    ("{{ 1.5**2 }}", 2.25),
    ("{{ 6*7 }}", 42),
    ("{{ 'ab'*3 }}", "ababab"),
    ("{{ [0]*3 }}", [0, 0, 0]),
    ("{{ 7 % 3 }}", 1),
    ("{{ '%05.1f' % 3.14159 }}", "003.1"),
    ("{{ '%(a)s-%(b)s' % {'a': 1, 'b': 2} }}", "1-2"),
    ("{{ '%03d' | format(7) }}", "007"),
    ("{{ '{:>5}|{:.2f}'.format('x', 1) }}", "    x|1.00"),
    ("{{ 'a'.ljust(3, '.') }}", "a.."),
    ("{{ 'a' | center(5) }}", "  a  "),
    ("{{ 'a\nb' | indent(2) }}", "a\n  b"),
    ("{{ 'a-b'.replace('-', '+') }}", "a+b"),
    ("{{ ','.join(xs) }}", "1,2"),
    ("{{ xs | join('/') }}", "1/2"),
    ("{{ rows | map(attribute='v') | join(',') }}", "1,2"),
])
def test_ordinary_uses_of_the_same_operations_still_work(template, expected):
    assert render(template, {"xs": ["1", "2"], "rows": [{"v": 1}, {"v": 2}]}) == expected
