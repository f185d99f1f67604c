"""Where intents come in: the watched directory and `codemind intent submit`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from codemind_dagster.domain.intent import MAX_FILE_BYTES, Intent, IntentError, parse_intent_bytes
from codemind_dagster.resources.database import PlatformDB

INTENT_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Ingested:
    file: str
    status: str  # new | changed | unchanged | rejected
    name: str | None = None
    spec_hash: str | None = None
    error: str | None = None


class IntentStore:
    """Validates intent files and records the valid ones; a rejected file changes nothing else."""

    def __init__(self, db: PlatformDB, intents_dir: Path):
        self.db = db
        self.dir = Path(intents_dir)

    def files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.suffix in INTENT_SUFFIXES and not p.name.startswith("."))

    def ingest(self, path: Path) -> Ingested:
        """Validate one file of the watched directory and record the outcome."""
        raw, err = _read_capped(path)
        file = str(path)
        digest = hashlib.sha256(raw or b"").hexdigest()
        intent = None
        if err is None:
            try:
                intent = parse_intent_bytes(raw, path.name)
            except IntentError as e:
                err = str(e)
        if err is None and intent is not None:
            owner = self.db.intent_row(intent.name)
            if owner is not None and owner.source != file and Path(owner.source).exists():
                err = (f"{path.name}: metadata.name: intent {intent.name!r} is already defined by "
                       f"{Path(owner.source).name}; names must be unique")
        if err is not None or intent is None:
            self.db.reject_file(file, digest, err or "unreadable")
            return Ingested(file=file, status="rejected", error=err)
        self.db.clear_rejection(file)
        status = self.db.upsert_intent(intent.name, intent.content_hash, intent.canonical(), file)
        return Ingested(file=file, status=status, name=intent.name, spec_hash=intent.content_hash)

    def submit(self, source: Path) -> Ingested:
        """Validate a file anywhere; if valid, place it in the watched directory and record it."""
        raw, err = _read_capped(source)
        if err is not None:
            raise IntentError(str(source), "", err)
        intent = parse_intent_bytes(raw, str(source))
        self.dir.mkdir(parents=True, exist_ok=True)
        target = self.dir / f"{intent.name}.yaml"
        owner = self.db.intent_row(intent.name)
        if owner is not None and owner.source != str(target) and Path(owner.source).exists():
            raise IntentError(str(source), "metadata.name",
                              f"intent {intent.name!r} is already defined by {owner.source}")
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".submit-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, target)
        return self.ingest(target)

    def pending(self) -> list[tuple[str, str]]:
        """(name, spec_hash) of intents whose current spec has not been requested yet."""
        return [(r.name, r.spec_hash) for r in self.db.intent_rows()
                if r.requested_hash != r.spec_hash and Path(r.source).exists()]

    def retry_failed(self, names: list[str]) -> list[tuple[str, str]]:
        """Request again the pipeline of each named intent whose current spec failed before a release; (name, error)."""
        retried = []
        for r in self.db.intent_rows():
            release = self.db.latest_release(r.name)
            if (r.name in names and r.error and r.requested_hash == r.spec_hash
                    and (release is None or release.spec_hash != r.spec_hash)):
                self.db.clear_request(r.name)
                retried.append((r.name, r.error))
        return retried

    def load(self, name: str) -> Intent:
        row = self.db.intent_row(name)
        if row is None:
            raise KeyError(f"no intent named {name!r}")
        return Intent.model_validate(row.spec)


def _read_capped(path: Path) -> tuple[bytes | None, str | None]:
    """Read at most the size limit, so an oversized file is refused without being parsed."""
    try:
        if not path.is_file():
            return None, f"{path}: not a regular file"
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return None, f"{path}: cannot read file: {e.strerror}"
    if len(raw) > MAX_FILE_BYTES:
        return None, f"{path.name}: file is over the limit of {MAX_FILE_BYTES} bytes (256 KiB); not parsed"
    return raw, None
