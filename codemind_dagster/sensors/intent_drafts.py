"""Requests in plain words dropped into the inbox (*.md, *.txt) become draft intent files next to them."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from codemind_dagster.domain.intent import NAME_RE

if TYPE_CHECKING:
    from codemind_dagster.resources.intent_store import IntentStore
    from codemind_dagster.resources.llm.router import ModelRouter

TEXT_SUFFIXES = (".md", ".txt")
MAX_TEXT_BYTES = 64 * 1024
DRAFTED_DIR = "drafted"  # where a request goes once its draft is in the inbox


@dataclass(frozen=True)
class Drop:
    file: str
    status: str  # drafted | rejected
    name: str | None = None
    draft: str | None = None  # the YAML file written into the inbox
    error: str | None = None
    cost_usd: float = 0.0


def text_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith(".") and p.is_file())


def draft_drop(path: Path, store: IntentStore, router: ModelRouter) -> Drop:
    """Draft one dropped request into `<name>.yaml` in the inbox; a refusal is recorded like a rejected file."""
    from codemind_dagster.agents.intent_engine import DraftRefused, NoModelAvailable, draft_intent
    from codemind_dagster.domain.intent_draft import DraftInputError
    from codemind_dagster.resources.llm.router import BudgetExceeded

    raw, err = _read(path)
    digest = hashlib.sha256(raw or b"").hexdigest()
    # A file named like an intent (loyalty-points.md) names its draft; otherwise the model does.
    name = path.stem if NAME_RE.fullmatch(path.stem) else None
    if err is None and name is not None:
        err = _taken(store, name, path)  # known before any model is asked: nothing is paid for
    result = None
    if err is None:
        try:
            result = draft_intent(router, raw.decode("utf-8"), name=name, source=path.name)
        except (DraftInputError, NoModelAvailable, BudgetExceeded, DraftRefused) as e:
            err = f"{path.name}: {e}"
    if result is not None and err is None:
        err = _taken(store, result.intent.name, path)
    target = store.dir / f"{result.intent.name}.yaml" if result is not None else None
    if err is not None or result is None or target is None:
        store.db.reject_file(str(path), digest, err or "unreadable")
        return Drop(file=str(path), status="rejected", error=err)
    _write(target, result.yaml)
    store.db.clear_rejection(str(path))
    _file_away(path)
    return Drop(file=str(path), status="drafted", name=result.intent.name, draft=str(target),
                cost_usd=result.cost_usd)


def _taken(store: IntentStore, name: str, path: Path) -> str | None:
    """Why a draft named `name` may not land in the inbox, or None."""
    target = store.dir / f"{name}.yaml"
    owner = store.db.intent_row(name)
    if not target.exists() and (owner is None or not Path(owner.source).exists()):
        return None
    where = target.name if target.exists() else Path(owner.source).name
    return (f"{path.name}: a draft of intent {name!r} would replace {where}, which already defines it; nothing "
            "was written (name the request file after the intent you want, e.g. my-service.md)")


def _read(path: Path) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TEXT_BYTES + 1)
    except OSError as e:
        return None, f"{path.name}: cannot read file: {e.strerror}"
    if len(raw) > MAX_TEXT_BYTES:
        return None, f"{path.name}: file is over the limit of {MAX_TEXT_BYTES} bytes (64 KiB); not read"
    if b"\x00" in raw:
        return None, f"{path.name}: binary content (NUL bytes): a request is UTF-8 text"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{path.name}: not UTF-8 text (invalid byte at offset {e.start})"
    return raw, None


def _write(target: Path, text: str) -> None:
    # Written under a dot-name first: the intent sensor never reads half a draft.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".draft-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, target)


def _file_away(path: Path) -> None:
    """Move the request under drafted/ so it is not drafted (and paid for) again."""
    done = path.parent / DRAFTED_DIR
    done.mkdir(exist_ok=True)
    target, n = done / path.name, 1
    while target.exists():
        n += 1
        target = done / f"{path.stem}-{n}{path.suffix}"
    os.replace(path, target)
