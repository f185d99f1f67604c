"""What the commands print through: one console, and the status table `status` and `demo` share."""

from __future__ import annotations

import sys


def console():
    """Rich console; logs and pipes get full-width lines instead of 80-column wrapping."""
    from rich.console import Console

    return Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 200)


def print_status(doc: dict) -> None:
    """The status document as a table, then rejected files and budget alerts."""
    from rich.table import Table

    table = Table(title="CodeMind intents")
    for col in ("intent", "state", "tests", "coverage", "environments", "LLM $"):
        table.add_column(col)
    for i in doc["intents"]:
        envs = "\n".join(f"{'[green]●[/]' if e['healthy'] else '[red]○[/]'} {env}: {e['url'] or '-'}"
                         + (f" [yellow]({e['rollout']})[/]" if e.get("rollout") else "")
                         for env, e in i["environments"].items())
        cov = f"{i['coverage_percent']:.0f}%" if i["coverage_percent"] is not None else "-"
        state = i["state"] + (f"\n[red]{i['error'][:200]}[/]" if i["error"] else "")
        table.add_row(i["name"], state, f"{i['tests']['passed']} passed / {i['tests']['failed']} failed", cov,
                      envs, f"{i['llm_cost_usd']:.4f}")
    out = console()
    out.print(table)
    for r in doc["rejected"]:
        out.print(f"[red]rejected[/] {r['file']}: {r['error']}")
    for a in doc.get("budget_alerts", []):
        out.print(f"[yellow]budget[/] {a['scope']}: {a['threshold_percent']}% "
                  f"(${float(a['spend_usd']):.4f} of ${float(a['budget_usd']):.4f})"
                  + (" [red]calls blocked[/]" if a.get("blocking") else ""))
