"""The cloud's dashboard (``/ui``) in a real headless Chromium against real tier processes (``make test-ui``):
a start without a credential, with a user's credential pasted in, and with a revoked admin credential each shows
its 401 and the reason on the page; with the admin credential rounds start, their users' progress shows, and they
commit; a long round is cancelled from the page. Skips where Chromium or playwright is missing.
``SPLITLLM_UI_SCREENSHOT=path`` keeps a screenshot of the page after the committed rounds (the README's)."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from shared.http.credentials import Credential, issue, load_private_key
from shared.lab.cluster import Cluster

pytestmark = pytest.mark.ui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLOUD_ARGS = os.environ.get("SPLITLLM_UI_CLOUD_ARGS", "--model tiny-bert --split 1,3 --data trec "
                            "--max-examples-per-client 32 --eval-examples-per-client 8").split()
ROUNDS = int(os.environ.get("SPLITLLM_UI_ROUNDS", "2"))


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update",
                                          "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("ui"), CLOUD_ARGS, users=2, edges=1)
    c.start()
    yield c
    c.stop()


def test_the_dashboard_starts_rounds_and_shows_them_commit(browser, cluster) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{cluster.cloud.url}/ui")
    expect(page.locator("#health")).to_contain_text("2 users")

    def refused(credential: str, reason: str) -> None:
        page.fill("#token", credential)
        page.dispatch_event("#token", "change")
        page.click("#start")
        expect(page.locator("#message")).to_contain_text(f"401 Unauthorized: {reason}")
        expect(page.locator("#message")).to_contain_text("enter an admin credential (admin.token)")
        expect(page.locator("#message")).to_have_class("error")

    keys = cluster.workdir / "credentials"
    refused("", "missing credential: an admin sends its token")  # nothing typed in
    # what a stranger holding a device would try: its user's credential, as a bearer
    refused(Credential.load(keys / "user-0.json").certificate, "a user credential may not be used here")
    # a former admin's credential, revoked at the cloud
    former = issue(load_private_key(keys / "deployment.key"), "splitllm", "admin", "former-admin", 3600.0).certificate
    r = httpx.post(f"{cluster.cloud.url}/v1/credentials/revoke", json={"subject": "admin:former-admin"},
                   headers=cluster.admin_headers, timeout=30)
    assert r.status_code == 200, r.text
    refused(former, "the credential of admin:former-admin has been revoked")
    assert cluster.get("/v1/rounds").json()["rounds"] == []

    page.fill("#token", cluster.admin_token)
    page.dispatch_event("#token", "change")
    page.fill("#local-steps", "8")
    for round_id in range(1, ROUNDS + 1):
        page.click("#start")
        expect(page.locator("#message")).to_contain_text(f"round {round_id} started")
        if round_id == 1:  # the live view: a row per user with its step count
            expect(page.locator("#progress [data-user='user-0']")).to_contain_text("step", timeout=60_000)
        row = page.locator(f"#rounds tr[data-round-id='{round_id}']")
        expect(row.locator("td.state")).to_have_text("committed", timeout=300_000)
        expect(row.locator("td").nth(6)).not_to_have_text("–", timeout=120_000)  # evaluated: accuracy shown
    view = cluster.get(f"/v1/rounds/{ROUNDS}").json()
    assert view["state"] == "committed" and view["request"]["local_steps"] == 8
    expect(page.locator("#chart-loss canvas")).to_have_count(1)
    expect(page.locator("#live-title")).to_have_text("none")
    if os.environ.get("SPLITLLM_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["SPLITLLM_UI_SCREENSHOT"], full_page=True)

    page.fill("#local-steps", "5000")  # a long round, cancelled from the page
    page.click("#start")
    expect(page.locator("#progress [data-user='user-0']")).to_contain_text("step", timeout=60_000)
    page.click("#cancel")
    expect(page.locator(f"#rounds tr[data-round-id='{ROUNDS + 1}'] td.state")).to_contain_text("cancelled",
                                                                                                timeout=120_000)
    assert cluster.get(f"/v1/rounds/{ROUNDS + 1}").json()["state"] == "cancelled"
    assert errors == []
    page.close()
