"""The `codemind` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from codemind_dagster.settings import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "intents"


def _settings() -> Settings:
    return Settings.from_env()


def _db(settings: Settings):
    from codemind_dagster.resources.platform import DatabaseResource

    return DatabaseResource(url=settings.db_url).client()


def _runtime(settings: Settings):
    """The active profile's deploy target: local processes, or the clusters of the kubeconfig."""
    from codemind_dagster.resources.profiles import resources_for

    try:
        return resources_for(settings)["runtime"].runtime()
    except RuntimeError as e:  # a profile that cannot start, e.g. k8s without PostgreSQL
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def _store(settings: Settings):
    from codemind_dagster.resources.intent_store import IntentStore

    return IntentStore(_db(settings), settings.intents_dir)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """CodeMind control plane: business intents in, tested services in production out.

    Everything the local profile writes lives under $CODEMIND_HOME (default ./.codemind).
    """


@main.group()
def intent() -> None:
    """Draft, submit and inspect business intents (spec: codemind.dev/v1)."""


@intent.command("submit")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def intent_submit(file: Path) -> None:
    """Validate FILE and queue it; prints the partition key, or the validation error."""
    from codemind_dagster.domain.intent import IntentError

    try:
        result = _store(_settings()).submit(file)
    except IntentError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if result.status == "rejected":
        click.echo(f"error: {result.error}", err=True)
        sys.exit(2)
    click.echo(result.name)
    click.echo(f"{result.status}: {result.name} ({result.spec_hash[:12]}); the intent sensor starts its pipeline"
               if result.status != "unchanged" else f"unchanged: {result.name}; nothing to do", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
def status(as_json: bool) -> None:
    """Show every intent: state, tests, checks, environments, LLM cost; and rejected files."""
    from codemind_dagster.commands.output import print_status
    from codemind_dagster.status import platform_status

    s = _settings()
    doc = platform_status(s, _db(s), _runtime(s))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    print_status(doc)


@main.command()
@click.argument("intent_name", metavar="INTENT")
@click.argument("environment", type=click.Choice(["dev", "staging", "production"]))
@click.option("--by", default=lambda: os.environ.get("USER", "cli"), show_default="$USER",
              help="Who approves.")
def approve(intent_name: str, environment: str, by: str) -> None:
    """Approve the latest release of INTENT for ENVIRONMENT."""
    from codemind_dagster.resources.approvals import approve_release

    s = _settings()
    try:
        msg = approve_release(_db(s), intent_name, environment, by)
    except ValueError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    click.echo(msg)


@main.command()
def down() -> None:
    """Stop every local deployment; they stay stopped until `codemind demo` resumes them."""
    from codemind_dagster.resources.runtime import DeployError

    s = _settings()
    try:
        stopped = _runtime(s).stop_all()
    except DeployError as e:  # e.g. a cluster of the kubeconfig that does not answer; records stay as they are
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    _db(s).stop_deployments()
    click.echo(f"stopped {stopped} deployment(s)")


@main.command()
@click.option("--port", default=3000, show_default=True, help="Port of the Dagster UI.")
def ui(port: int) -> None:
    """Run the Dagster UI and daemon on the local profile's instance (sensors run by default)."""
    from codemind_dagster.instance import ensure_dagster_home

    s = _settings()
    home = ensure_dagster_home(s)
    s.intents_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"Dagster UI on http://127.0.0.1:{port}  (DAGSTER_HOME={home})")
    click.echo(f"Drop intent files into {s.intents_dir}; they reach production by themselves.")
    # A workspace file names the code location `codemind_dagster`; `-m` alone would show the module path.
    workspace = Path(home) / "workspace.yaml"
    workspace.write_text("load_from:\n  - python_module:\n      module_name: codemind_dagster.definitions\n"
                         "      location_name: codemind_dagster\n")
    dagster = str(Path(sys.executable).with_name("dagster"))
    os.execvpe(dagster, [dagster, "dev", "-w", str(workspace), "-h", "127.0.0.1",
                         "-p", str(port)], {**os.environ, "CODEMIND_HOME": str(s.home)})


@main.command()
@click.option("--intents", "intents_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=EXAMPLES, show_default="examples/intents", help="Directory of intent files to submit.")
@click.option("--approve/--no-approve", "auto_approve", default=True, show_default=True,
              help="Approve gated environments as they come up (the demo says when it does).")
def demo(intents_dir: Path, auto_approve: bool) -> None:
    """Submit every intent in a directory and take each through production, with progress."""
    from codemind_dagster.demo import run_demo

    sys.exit(run_demo(_settings(), intents_dir, auto_approve=auto_approve))


def _register_platform_commands() -> None:
    from codemind_dagster.commands.dr import backup, dr
    from codemind_dagster.commands.finops import backfill
    from codemind_dagster.commands.intent import draft
    from codemind_dagster.commands.llm import llm
    from codemind_dagster.commands.state import state

    for command in (state, backup, dr, backfill, llm):
        main.add_command(command)
    intent.add_command(draft)


_register_platform_commands()

if __name__ == "__main__":
    main()
