"""Take the console screenshots in docs/console/ with the real browser (Chromium from the distribution,
through Playwright), against a throwaway `noetl server`:

    python scripts/console_screenshots.py [--out docs/console]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from console_support import ServerProcess, browser, logged_in_page  # noqa: E402
from support import free_port  # noqa: E402

EXAMPLES = ("hello_world", "fan_out_join", "iterator", "retry_and_timeout", "child_multiply", "child_playbook")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "console"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="noetl-shots-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
        server = ServerProcess(Path(tmp), free_port(), env).start()
        try:
            server.register_all()
            for name in EXAMPLES:
                server.api("POST", "/api/catalog/register",
                           json={"content": (ROOT / "examples" / f"{name}.yaml").read_text()})
            runs = {name: server.run(f"examples/{name}") for name in EXAMPLES if name != "child_multiply"}
            failed = server.run("console/fails")
            waiting = server.run("console/retrying")
            for execution_id in [*runs.values(), failed]:
                server.wait_status(execution_id, ("COMPLETED", "FAILED"))
            time.sleep(1.0)
            with browser() as chromium:
                page = logged_in_page(chromium, server, width=1280, height=860)

                def shot(name: str, url: str, click: str | None = None, full: bool = False) -> None:
                    page.goto(server.url + url)
                    if click:
                        page.locator(click).first.click()
                        page.wait_for_selector("#step-name")
                    page.wait_for_timeout(400)
                    page.screenshot(path=str(out / f"{name}.png"), full_page=full)
                    print(out / f"{name}.png")

                shot("executions", "/")
                shot("execution", f"/executions/{runs['fan_out_join']}")
                shot("failed-step", f"/executions/{failed}", 'g.node[data-step="explode"]')
                shot("iterator", f"/executions/{runs['iterator']}", full=True)
                shot("retry-explainer", f"/executions/{waiting}")
                shot("catalog-playbook", "/catalog/playbook?path=examples/fan_out_join")
            server.api("POST", f"/api/executions/{waiting}/cancel", json={})
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
