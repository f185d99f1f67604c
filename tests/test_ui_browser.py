"""The Dagster UI in Debian's headless Chromium: what a user sees after `codemind demo` with `codemind ui` running."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLES, missing_component

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
SETUP = "apt-get install -y chromium chromium-driver (and make setup for the playwright package)"
INTENT = "incident-tracker"  # deploys to dev and production only, so staging stays never materialized
GROUPS = {
    "intake": ["business_intents", "business_model"],
    "delivery": ["implementation_plan", "generated_code", "test_results", "release_candidate"],
    "deployment": ["dev_deployment", "staging_deployment", "production_deployment"],
    "platform": ["infrastructure_state", "backups", "dr_validation"],
    "finops": ["llm_usage", "cost_report", "budget_status"],
}
UPSTREAM_OF_PRODUCTION = [*GROUPS["intake"], *GROUPS["delivery"], *GROUPS["deployment"]]
BLOCKING_CHECKS = ["contract_tests_pass", "coverage_threshold", "no_high_severity_findings"]
SENSORS = ["intent_sensor", "promotion_sensor", "dr_sensor", "budget_sensor"]
LOADING = re.compile(r"^Loading")
WAIT_MS = 60_000  # the UI renders after its GraphQL queries; a loaded 2-core machine makes that slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def codemind(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codemind_dagster.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class UI:
    url: str
    location: str
    shots: Path
    env: dict

    def graphql(self, query: str) -> dict:
        r = httpx.post(f"{self.url}/graphql", json={"query": query}, timeout=30)
        r.raise_for_status()
        body = r.json()
        assert "errors" not in body, body
        return body["data"]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGINT lets `dagster dev` stop its webserver, daemon and code server; SIGKILL whatever is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children may outlive the leader
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium and the playwright package, or a skip (a failure in CI) naming the setup command."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing_component("the Python package playwright", "make setup")
    if not CHROMIUM.exists():
        missing_component(f"Debian's Chromium ({CHROMIUM})", SETUP)
    return CHROMIUM


@pytest.fixture(scope="module")
def ui(chromium, tmp_path_factory) -> UI:
    """One demo intent taken to production and yesterday's cost report, then `codemind ui` on a free port."""
    root = tmp_path_factory.mktemp("ui")
    home, inbox, shots = root / "codemind-home", root / "inbox", root / "screenshots"
    inbox.mkdir()
    shots.mkdir()
    shutil.copy(EXAMPLES / f"{INTENT}.yaml", inbox)
    env = {**os.environ, "CODEMIND_HOME": str(home), "CODEMIND_HEALTH_TIMEOUT_S": "20"}
    env.pop("DAGSTER_HOME", None)  # `codemind ui` and `codemind demo` find the instance under CODEMIND_HOME
    proc = None
    try:
        # The demo runs before the UI starts: with the daemon up, its intent sensor would race the demo's own.
        demo = codemind(env, "demo", "--intents", str(inbox))
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        backfill = codemind(env, "backfill", "cost-report", "--from", yesterday, "--to", yesterday)
        assert backfill.returncode == 0, backfill.stdout[-2000:] + backfill.stderr[-2000:]
        port = free_port()
        log = root / "ui.log"
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([sys.executable, "-m", "codemind_dagster.cli", "ui", "--port", str(port)],
                                    env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the Dagster UI did not come up: " + log.read_text()[-3000:])
        probe = UI(url, "", shots, env)
        # The code location loads after the webserver answers; the workspace file `codemind ui` writes names it.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            data = probe.graphql("{ repositoriesOrError { ... on RepositoryConnection { nodes { location { name } } } } }")
            nodes = data["repositoriesOrError"].get("nodes") or []
            if nodes:
                probe.location = nodes[0]["location"]["name"]
                assert probe.location == "codemind_dagster", "the UI shows the code location under another name"
                break
            time.sleep(1)
        else:
            pytest.fail("the code location did not load: " + log.read_text()[-3000:])
        yield probe
    finally:
        if proc is not None:
            stop_group(proc)
        codemind(env, "down", timeout=120)
        from codemind_dagster.resources.runtime import LocalRuntime
        from codemind_dagster.settings import Settings

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CODEMIND_HOME", str(home))
            LocalRuntime(Settings.from_env().runtime_dir).stop_all()  # whatever `down` left, had it failed


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, ui: UI):
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, base_url=ui.url)
    context.set_default_timeout(WAIT_MS)
    pg = context.new_page()
    try:
        yield pg
    finally:
        context.close()


def shot(page, ui: UI, name: str) -> Path:
    path = ui.shots / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")
    return path


def node_labels(page) -> list[str]:
    """The names on the rendered asset nodes of a graph (the UI may middle-truncate long ones with '…')."""
    return [t.strip() for t in page.locator("[class*=AssetNode_assetName]").all_inner_texts()]


def shown(name: str, labels: list[str]) -> bool:
    for label in labels:
        head, sep, tail = label.partition("…")
        if label == name or (sep and name.startswith(head) and name.endswith(tail) and len(label) < len(name)):
            return True
    return False


def wait_for_nodes(page, names: list[str]) -> list[str]:
    deadline = time.monotonic() + WAIT_MS / 1000
    labels: list[str] = []
    while time.monotonic() < deadline:
        labels = node_labels(page)
        # Nodes show their latest event and checks once loaded: the screenshot should have them too.
        if all(shown(n, labels) for n in names) and page.get_by_text(LOADING).count() == 0:
            return labels
        page.wait_for_timeout(500)
    pytest.fail(f"graph nodes {names} not all rendered; the page shows {labels}")


def test_every_asset_has_a_group_description_owner_and_kind(ui: UI):
    """What the catalog and the asset pages show for each asset is there for all of them."""
    data = ui.graphql("{ assetNodes { assetKey { path } groupName description kinds "
                      "owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } } } }")
    nodes = {n["assetKey"]["path"][-1]: n for n in data["assetNodes"]}
    assert {name: n["groupName"] for name, n in nodes.items()} == {
        a: g for g, assets in GROUPS.items() for a in assets}
    for name, n in nodes.items():
        assert n["description"] and n["owners"] and n["kinds"], (name, n)
        # The UI renders descriptions as Markdown: a <placeholder> outside `code` would vanish as an HTML tag.
        assert not re.search(r"<\w", re.sub(r"`[^`]*`", "", n["description"])), (name, n["description"])


def test_the_asset_graph_shows_each_group_with_its_assets(page, ui: UI):
    from playwright.sync_api import expect

    page.goto("/asset-groups")
    for group in GROUPS:
        page.locator("button").get_by_text(group, exact=True).first.wait_for()  # the groups' tree beside the graph
    # The graph's group boxes say "fetching statuses" until their assets' statuses are in.
    expect(page.get_by_text("fetching statuses")).to_have_count(0, timeout=WAIT_MS)
    shot(page, ui, "01-asset-groups")
    for group, assets in GROUPS.items():
        page.goto(f"/locations/{ui.location}/asset-groups/{group}")
        labels = wait_for_nodes(page, assets)
        assert len(labels) == len(assets), (group, labels)
        shot(page, ui, f"02-group-{group}")


def test_lineage_leads_from_production_back_to_the_intent(page, ui: UI):
    page.goto("/assets/production_deployment?view=lineage&lineageScope=upstream&lineageDepth=10")
    wait_for_nodes(page, UPSTREAM_OF_PRODUCTION)
    for group in ("intake", "delivery", "deployment"):
        page.get_by_text(group, exact=True).first.wait_for()
    shot(page, ui, "03-lineage-production-upstream")

    # The facts behind the picture: each step names the one before it, down to the intent.
    data = ui.graphql("{ assetNodes { assetKey { path } dependencyKeys { path } } }")
    deps = {n["assetKey"]["path"][-1]: {d["path"][-1] for d in n["dependencyKeys"]} for n in data["assetNodes"]}
    current = "production_deployment"
    for expected in ("staging_deployment", "dev_deployment", "release_candidate", "test_results",
                     "generated_code", "implementation_plan", "business_model", "business_intents"):
        assert expected in deps[current], (current, deps[current])
        current = expected
    assert deps["business_intents"] == set()

    # The production asset's own page says what runs there, and the run that put it there succeeded.
    page.goto("/assets/production_deployment")
    metadata = page.locator("table", has_text="outcome")
    metadata.get_by_role("link", name="http://127.0.0.1:").wait_for()
    assert "deployed" in metadata.inner_text()
    page.get_by_text("The release serving production").first.wait_for()
    shot(page, ui, "04-production-deployment")
    page.goto("/runs")
    for job in ("deliver_intent", "deploy_dev", "deploy_production"):
        row = page.locator("[class*=RunsFeedRow_rowGrid]", has=page.get_by_role("link", name=job, exact=True))
        row.get_by_text("Success", exact=True).first.wait_for()
        # Runs the sensors requested say which sensor launched them.
        assert "_sensor" in row.first.inner_text() and "Manually launched" not in row.first.inner_text()
    shot(page, ui, "05-runs")


def test_blocking_checks_on_test_results_show_their_results(page, ui: UI):
    page.goto("/assets/test_results?view=checks")
    for check in BLOCKING_CHECKS:
        page.get_by_text(check, exact=True).first.wait_for()
    shot(page, ui, "06-test-results-checks")
    for check in BLOCKING_CHECKS:
        page.get_by_text(check, exact=True).first.click()
        page.get_by_text("This is a").filter(has_text="blocking").first.wait_for()
        page.get_by_text("Passed", exact=True).first.wait_for()
        page.locator("td", has_text="detail").first.wait_for()
        shot(page, ui, f"07-check-{check}")
    contract = page.get_by_text("contract_tests_pass", exact=True).first
    contract.click()
    detail = page.locator("tr", has=page.locator("td", has_text="detail")).first.inner_text()
    assert " passed, 0 failed" in detail, detail

    data = ui.graphql('{ assetNodeOrError(assetKey: {path: ["test_results"]}) { ... on AssetNode { '
                      "assetChecksOrError { ... on AssetChecks { checks { name blocking "
                      "executionForLatestMaterialization { status } } } } } } }")
    checks = data["assetNodeOrError"]["assetChecksOrError"]["checks"]
    assert {c["name"]: (c["blocking"], c["executionForLatestMaterialization"]["status"]) for c in checks} == {
        c: (True, "SUCCEEDED") for c in BLOCKING_CHECKS}

    # The evidence the checks judged: test counts and coverage in the materialization's metadata.
    page.goto("/assets/test_results")
    table = page.locator("table", has_text="coverage_percent")
    table.wait_for()
    text = table.inner_text()
    for key in ("contract_passed", "contract_failed", "coverage_percent", "security_high", "evidence"):
        assert key in text, text
    shot(page, ui, "08-test-results")


def test_the_cost_report_shows_spend_and_budgets_as_tables(page, ui: UI):
    page.goto("/assets/cost_report")
    table = page.locator("table", has_text="billed_cost_usd").first
    table.wait_for()
    # Markdown metadata must render as a table of its own, not as a line of pipes.
    budgets = table.locator("table", has_text="budget_usd")
    budgets.get_by_role("cell", name=f"intent:{INTENT}", exact=True).wait_for()
    day = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    budgets.get_by_role("cell", name=f"daily:{day}", exact=True).wait_for()
    assert "|" not in budgets.inner_text()
    page.get_by_text("reports/focus/<date>.csv").first.wait_for()  # the description's path survives Markdown
    # The FOCUS CSV itself, not where the IO manager pickled the output.
    assert f"reports/focus/{day}.csv" in table.locator("tr", has_text="report_path").inner_text()
    shot(page, ui, "09-cost-report")
    page.goto("/assets/business_intents")
    page.locator("table", has_text="llm_budget_usd").first.wait_for()
    shot(page, ui, "10-business-intents")


def test_the_sensors_are_running_and_ticking(page, ui: UI):
    page.goto("/overview/automation")
    for sensor in SENSORS:
        page.get_by_text(sensor, exact=True).first.wait_for()
    shot(page, ui, "11-automation")
    for sensor in SENSORS:
        page.goto(f"/locations/{ui.location}/sensors/{sensor}")
        running = page.locator("tr", has_text="Running").locator("input[type=checkbox]")
        running.wait_for(state="attached")
        assert running.is_checked(), sensor
        # The daemon has evaluated it: the latest tick is a time, not "None".
        latest = page.locator("tr", has_text="Latest tick")
        deadline = time.monotonic() + 90
        while "None" in latest.inner_text() or latest.inner_text().strip() == "Latest tick":
            assert time.monotonic() < deadline, f"{sensor} never ticked: {latest.inner_text()}"
            page.wait_for_timeout(2000)
            page.reload()
            latest = page.locator("tr", has_text="Latest tick")
            latest.wait_for()
        shot(page, ui, f"12-sensor-{sensor}")
