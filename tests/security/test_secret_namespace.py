"""Issue 9, finding: `{{ secret.known | tojson | b64encode }}` in a worker-side template walked the whole
secret mapping (and base64 slipped past the exact-match redaction). The `secret` namespace now answers
one name at a time and cannot be listed, iterated, printed or serialised."""
from __future__ import annotations

import base64

import pytest

from noetl_common.render import TemplateError
from noetl_worker.credentials import Secrets

from engine_run import PLAYBOOK_SECRET, run_playbook

WALK = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: walk, path: security/walk}
workflow:
  - step: start
    next: [{step: leak}]
  - step: leak
    type: python
    data:
      used: "{{ secret.API }}"
      everything: "{{ secret.known | tojson | b64encode }}"
    code: |
      def main(used, everything):
          return {"used": used, "everything": everything}
    next: [{step: end}]
  - step: end
"""


def test_a_template_cannot_walk_the_secrets(home):
    run = run_playbook(home, WALK)
    encoded = base64.b64encode(PLAYBOOK_SECRET.encode()).decode()
    assert PLAYBOOK_SECRET not in run.everything and encoded[:-4] not in run.everything
    assert run.step("leak")["status"] == "FAILED" and "known" in run.step("leak")["error"], run.step("leak")


@pytest.mark.parametrize("template", [
    "{{ secret | tojson }}", "{{ secret | list }}", "{{ secret | dictsort }}", "{{ secret.items() | list }}",
    "{{ secret.keys() | join(',') }}", "{{ secret | length }}", "{% for k in secret %}{{ k }}{% endfor %}",
    "{{ secret._known }}", "{{ secret.__dict__ }}", "{{ secret | pprint }}", "{{ secret | string }}",
    "{{ secret.API }}{{ secret | map('upper') | list }}",
])
async def test_the_namespace_gives_nothing_but_named_values(template):
    secrets = Secrets(None, {"NOETL_SECRET_API": PLAYBOOK_SECRET, "NOETL_SECRET_OTHER": "other-Vq61-value"})
    await secrets.secret("OTHER")          # resolved earlier in the same command: still not listable
    try:
        text = str(await secrets.render(template, {}, 0.0))
    except TemplateError as exc:
        text = str(exc)
    for value in (PLAYBOOK_SECRET, "other-Vq61-value"):
        assert value not in text and base64.b64encode(value.encode()).decode()[:-4] not in text, text
    assert "OTHER" not in text.replace("NOETL_SECRET_OTHER", "")   # not even the names


async def test_the_namespace_cannot_be_handed_to_step_code():
    """A lone `{{ secret }}` is not a value: rendering refuses it, and the namespace object itself cannot be
    pickled (what python steps receive) should it ever get through."""
    import pickle

    from noetl_worker.credentials import _Known
    secrets = Secrets(None, {"NOETL_SECRET_API": PLAYBOOK_SECRET})
    assert await secrets.render("{{ secret.API }}", {}, 0.0) == PLAYBOOK_SECRET
    with pytest.raises(TemplateError) as refused:
        await secrets.render({"all": "{{ secret }}"}, {}, 0.0)
    assert PLAYBOOK_SECRET not in str(refused.value)
    with pytest.raises(TypeError, match="cannot be serialised"):
        pickle.dumps(_Known({"API": PLAYBOOK_SECRET}))
