"""Content-addressed artifact store on the local filesystem (S3 fills the same role in k8s)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from codemind_dagster.domain.code import bundle_hash, write_bundle


class LocalArtifactStore:
    """Bundles stored once per content hash, written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def bundle_dir(self, digest: str) -> Path:
        return self.root / "bundles" / digest

    def has(self, digest: str) -> bool:
        return (self.bundle_dir(digest) / ".manifest.json").is_file()

    def put_bundle(self, files: dict[str, str]) -> str:
        digest = bundle_hash(files)
        if self.has(digest):
            return digest
        target = self.bundle_dir(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}-", dir=target.parent))
        try:
            write_bundle(tmp, files)
            (tmp / ".manifest.json").write_text(json.dumps({"sha256": digest, "files": sorted(files)}))
            try:
                os.rename(tmp, target)
            except OSError:
                if not self.has(digest):  # another writer may have won the race with the same content
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return digest

    def keep_evidence(self, key: str, files: list[Path]) -> Path:
        """Keep test evidence (JUnit, coverage, scan) of one tested artifact; returns its folder."""
        target = self.root / "test-evidence" / key
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.is_file():
                shutil.copyfile(f, target / f.name)
        return target

    def read_bundle(self, digest: str) -> dict[str, str]:
        root = self.bundle_dir(digest)
        manifest = json.loads((root / ".manifest.json").read_text())
        files = {rel: (root / rel).read_text() for rel in manifest["files"]}
        if bundle_hash(files) != digest:
            raise ValueError(f"artifact {digest[:12]} is corrupt: its content no longer matches its hash")
        return files
