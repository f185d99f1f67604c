"""A generated code bundle, addressed by the hash of its content."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, Field


def bundle_hash(files: dict[str, str]) -> str:
    """Content hash over sorted paths and texts; the artifact identity everywhere."""
    h = hashlib.sha256()
    for path in sorted(files):
        data = files[path].encode()
        h.update(f"{path}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def write_bundle(root: Path, files: dict[str, str]) -> None:
    """Write a bundle's files under root; a path that would land outside root is refused."""
    base = root.resolve()
    for rel, text in files.items():
        target = (base / rel).resolve()
        if not target.is_relative_to(base):
            raise ValueError(f"bundle path {rel!r} escapes {root}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


class CodeBundle(BaseModel):
    """Files of a service (service/ and its own tests/) and what they leave out."""

    files: dict[str, str]
    rules_not_implemented: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)

    @property
    def content_hash(self) -> str:
        return bundle_hash(self.files)


class ContractSuite(BaseModel):
    """Contract tests derived from the intent alone."""

    files: dict[str, str]
