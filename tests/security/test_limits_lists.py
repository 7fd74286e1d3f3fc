"""Issue 9 scope 5: every list route answers one bounded page. Finding: the catalog list returned 115 MB with
every version's content. Now it is a page (at most 1000 entries, 100 with content), without content unless
asked, with the total; credentials likewise; an over-large page size is refused, not served."""
from __future__ import annotations


BIG = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {{name: big, path: limits/big}}\n" \
      "workload: {{blob: \"{blob}\"}}\nworkflow:\n  - step: start\n    next: [{{step: end}}]\n  - step: end\n"


def test_the_catalog_list_is_a_page_without_content_by_default(limits_server):
    server = limits_server
    text = BIG.format(blob="x" * 100_000)
    for _ in range(5):
        assert server.post("/api/catalog/register", json={"content": text}, timeout=30).status_code == 200
    response = server.get("/api/catalog/list", params={"limit": 3}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert len(body["entries"]) == 3 and body["total"] >= 5 and response.headers["X-Total-Count"] == str(body["total"])
    assert all("content" not in e and "payload" not in e for e in body["entries"])
    assert len(response.content) < 10_000                     # 5 x 100 KB registered, a few hundred bytes listed
    versions = [e["version"] for e in body["entries"]]
    rest = server.get("/api/catalog/list", params={"limit": 3, "offset": 3}, timeout=30).json()["entries"]
    assert not set(versions) & {e["version"] for e in rest if e["path"] == "limits/big"} - {None}

    with_content = server.get("/api/catalog/list", params={"limit": 1, "include_content": "true"}, timeout=30)
    assert with_content.status_code == 200 and len(with_content.json()["entries"][0]["content"]) > 100_000


def test_an_over_large_page_is_refused(limits_server):
    server = limits_server
    assert server.get("/api/catalog/list", params={"limit": 1001}, timeout=30).status_code == 422
    assert server.get("/api/catalog/list", params={"limit": 101, "include_content": "true"},
                     timeout=30).status_code == 400
    assert server.get("/api/executions", params={"limit": 1001}, timeout=30).status_code == 422
    assert server.get("/api/credentials", params={"limit": 1001}, timeout=30).status_code == 422
    assert server.get("/api/catalog/list", params={"offset": -1}, timeout=30).status_code == 422


def test_the_credentials_list_is_a_page(limits_server):
    server = limits_server
    for i in range(3):
        response = server.post("/api/credentials", json={"name": f"limits_c{i}", "type": "generic",
                                                              "data": {"token": f"t{i}"}}, timeout=30)
        assert response.status_code in (200, 201), response.text
    body = server.get("/api/credentials", params={"limit": 2, "q": "limits_c"}, timeout=30).json()
    assert len(body["items"]) == 2 and body["total"] == 3
