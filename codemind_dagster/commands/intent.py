"""`codemind intent draft`: a plain-language request in, a draft intent file out (through the model router)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_NO_MODEL = 2, 1, 3


@click.command("draft")
@click.argument("text")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the draft ('-' for stdout). Default: NAME.yaml in the current directory.")
@click.option("--name", default=None, help="The intent's metadata.name (a DNS-1123 label); default: the model's.")
@click.option("--force", is_flag=True, help="Overwrite the --output file if it exists.")
def draft(text: str, output: Path | None, name: str | None, force: bool) -> None:
    """Draft an intent from TEXT, a request in plain words ('-' reads it from stdin).

    The model router answers an intent_analysis task (costed and budgeted like every task); the draft
    passes the same validation as a hand-written file and waits for `codemind approve` before production.
    Review it, then `codemind intent submit FILE`. Exits 3 when no model is available, 1 when the model's
    answer never validates (after one re-ask with the errors) or a budget stops the call, 2 on bad input.
    """
    from codemind_dagster.agents.intent_engine import DraftRefused, NoModelAvailable, draft_intent
    from codemind_dagster.domain.intent_draft import DraftInputError
    from codemind_dagster.resources.llm.router import BudgetExceeded

    if text == "-":
        text = sys.stdin.read()
    to_stdout = output is not None and str(output) == "-"
    if output is not None and not to_stdout:
        # Checked before any model is asked: a paid answer must not fail to land.
        problem = _unwritable(output, force)
        if problem:
            _fail(problem, EXIT_BAD_INPUT)
    router = _router()
    try:
        result = draft_intent(router, text, name=name)
    except DraftInputError as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except NoModelAvailable as e:
        _fail(str(e), EXIT_NO_MODEL)
    except (BudgetExceeded, DraftRefused) as e:
        _fail(str(e), EXIT_REFUSED)
    finally:
        router.close()
    spent = (f"{result.provider}/{result.model}, {result.calls} call(s), "
             + ("from the response cache" if result.cache_hit else f"${result.cost_usd:.6f}"))
    if to_stdout:
        click.echo(result.yaml, nl=False)
        click.echo(f"drafted {result.intent.name} ({spent})", err=True)
        return
    target = output if output is not None else _free_path(Path.cwd(), result.intent.name)
    _write(target, result.yaml)
    click.echo(str(target))
    click.echo(f"drafted {result.intent.name} -> {target} ({spent})\n"
               f"review it, then: codemind intent submit {target}  "
               f"(production waits for: codemind approve {result.intent.name} production)", err=True)


def _router():
    from codemind_dagster.resources.profiles import resources_for
    from codemind_dagster.settings import Settings

    try:
        return resources_for(Settings.from_env())["llm"].router()
    except (RuntimeError, ValueError) as e:  # a profile that cannot start, a bad CODEMIND_LLM_ROUTES
        _fail(str(e), EXIT_BAD_INPUT)


def _unwritable(path: Path, force: bool) -> str | None:
    if path.exists() and not force:
        return f"{path} exists; pass --force to overwrite it or choose another --output"
    if path.exists() and not path.is_file():
        return f"{path} is not a regular file"
    if not path.parent.is_dir():
        return f"{path.parent} is not a directory"
    if not os.access(path.parent, os.W_OK):
        return f"{path.parent} is not writable"
    return None


def _free_path(directory: Path, name: str) -> Path:
    """NAME.yaml, or NAME-2.yaml ... when taken: a draft never overwrites a file it did not ask for."""
    target, n = directory / f"{name}.yaml", 1
    while target.exists():
        n += 1
        target = directory / f"{name}-{n}.yaml"
    return target


def _write(target: Path, text: str) -> None:
    """Atomically: a reader (or the inbox sensor) never sees half a draft."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".draft-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, target)


def _fail(message: str, code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)
