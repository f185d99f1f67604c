"""`codemind demo`: submit intents, then let the product's sensors and jobs take them to production."""

from __future__ import annotations

import time
from pathlib import Path

from codemind_dagster.settings import Settings


def run_demo(settings: Settings, intents_dir: Path, *, auto_approve: bool = True) -> int:
    """Returns the exit code: 0 when every intent reached its last environment and is healthy."""
    from codemind_dagster.commands.output import console as make_console
    from codemind_dagster.commands.output import print_status
    from codemind_dagster.domain.intent import IntentError
    from codemind_dagster.driver import Driver
    from codemind_dagster.resources.approvals import approve_release
    from codemind_dagster.resources.intent_store import INTENT_SUFFIXES
    from codemind_dagster.sensors.promotion import release_states
    from codemind_dagster.status import platform_status

    console = make_console()
    started = time.monotonic()
    console.print(f"[bold]CodeMind demo[/] (CODEMIND_HOME={settings.home})")
    driver = Driver(settings, progress=lambda m: console.print(f"  {m}"))
    db = driver.defs.resources["database"].client()
    store = driver.defs.resources["intent_store"].store()
    resumed = db.resume_stopped()
    if resumed:
        console.print(f"resuming {resumed} deployment(s) stopped by `codemind down`")
    files = sorted(p for p in intents_dir.iterdir() if p.suffix in INTENT_SUFFIXES)
    if not files:
        console.print(f"[red]no intent files (*.yaml, *.yml) in {intents_dir}[/]")
        return 2
    submitted, refused = [], 0
    for f in files:
        try:
            result = store.submit(f)
            submitted.append(result.name)
            console.print(f"submitted {f.name} -> {result.name} ({result.status})")
        except IntentError as e:
            refused += 1
            console.print(f"[red]refused[/] {e}")

    for name, error in store.retry_failed(submitted):
        console.print(f"retrying {name}: its last pipeline failed ({error.splitlines()[0][:160]})")

    def approvals() -> bool:
        granted = False
        for state in release_states(db):
            if auto_approve and state.decision.action == "await_approval" and state.intent in submitted:
                msg = approve_release(db, state.intent, state.decision.environment, "codemind-demo")
                console.print(f"  [yellow]{msg} -- the demo approves gated environments; "
                              f"in real use run `codemind approve {state.intent} {state.decision.environment}`[/]")
                granted = True
        return granted

    driver.run_until_idle(on_idle=approvals)
    doc = platform_status(settings, db, driver.defs.resources["runtime"].runtime())
    print_status(doc)
    ok = True
    for i in doc["intents"]:
        if i["name"] not in submitted:
            continue
        last = list(i["environments"])[-1]
        if i.get("gate"):
            ok = False
            console.print(f"[red]{i['name']} stopped before {i['gate']['environment']}: {i['gate']['reason']}[/]")
        elif not i["environments"][last]["healthy"]:
            ok = False
            console.print(f"[red]{i['name']} did not reach {last}: {i['state']}[/]")
    console.print(f"done in {time.monotonic() - started:.1f}s. Deployments keep running; stop them with "
                  "`codemind down`. Open the UI with `codemind ui` (http://127.0.0.1:3000).")
    return 0 if ok and not refused else 1
