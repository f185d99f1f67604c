"""Content-addressed artifact store in S3: written once, encrypted at rest, verified on every read."""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import time
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from codemind_dagster.domain.code import bundle_hash
from codemind_dagster.resources.artifacts import LocalArtifactStore

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
SSE = "AES256"  # SSE-S3: every put asks for it, whatever the bucket's default encryption says
EVIDENCE_PREFIX = "test-evidence/"
# Test evidence (JUnit, coverage, scan) explains recent verdicts; the verdict itself stays in the platform
# database (test_runs) for good, so the raw files can go after a quarter.
EVIDENCE_DAYS = 90
# Versioning exists so an overwrite or delete behind the store's back can be undone; a month is the window.
NONCURRENT_DAYS = 30
LIFECYCLE_RULES = [
    {"ID": "expire-test-evidence", "Status": "Enabled", "Filter": {"Prefix": EVIDENCE_PREFIX},
     "Expiration": {"Days": EVIDENCE_DAYS}},
    # Current bundles never expire: releases and DR drills redeploy them by hash, long after they were built.
    {"ID": "expire-noncurrent-versions", "Status": "Enabled", "Filter": {"Prefix": ""},
     "NoncurrentVersionExpiration": {"NoncurrentDays": NONCURRENT_DAYS},
     "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}},
]


class ArtifactNotFound(FileNotFoundError):
    """No bundle is stored under this digest."""


class ArtifactCorrupt(ValueError):
    """A stored bundle's content does not match its key."""


def bundle_key(digest: str) -> str:
    """The object key of a bundle; a digest that is not a sha256 hex string is refused."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ValueError(f"not an artifact digest (64 lower-case hex characters): {digest!r}")
    return f"sha256/{digest}.tar.gz"


def pack(files: dict[str, str]) -> bytes:
    """A deterministic tar.gz of a bundle: sorted entries, no timestamps, owners or file names in headers."""
    buf = io.BytesIO()
    with (gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz,
          tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar):
        for rel in sorted(files):
            data = files[rel].encode()
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack(body: bytes, where: str) -> dict[str, str]:
    """The files of a packed bundle; anything but plain, relative, unique UTF-8 files is ArtifactCorrupt."""
    files: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
            for m in tar:
                p = PurePosixPath(m.name)
                if not m.isfile() or p.is_absolute() or ".." in p.parts or m.name in files:
                    raise ArtifactCorrupt(f"{where} is corrupt: unexpected entry {m.name!r}")
                files[m.name] = tar.extractfile(m).read().decode()
    except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ArtifactCorrupt(f"{where} is corrupt: not a readable tar.gz bundle ({type(e).__name__})") from None
    return files


def _code(e: Exception) -> tuple[str, int]:
    err = getattr(e, "response", {}) or {}
    return str(err.get("Error", {}).get("Code", "")), int(err.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class S3ArtifactStore:
    """Bundles as `sha256/<hash>.tar.gz` in one bucket; files on disk come from a verified local cache."""

    def __init__(self, client: Any, bucket: str, cache_root: Path, *, region_name: str | None = None):
        self.client, self.bucket, self.region_name = client, bucket, region_name
        self.cache = LocalArtifactStore(Path(cache_root))
        self.root = self.cache.root  # delivery looks for kept test evidence under root, as with the local store

    def uri(self, digest: str) -> str:
        return f"s3://{self.bucket}/{bundle_key(digest)}"

    def has(self, digest: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=bundle_key(digest))
        except ClientError as e:
            if _code(e)[1] == 404:
                return False
            raise
        return True

    def put_bundle(self, files: dict[str, str]) -> str:
        digest = bundle_hash(files)
        if not self.has(digest):  # the common repeat skips the upload; the conditional put settles races
            self._put_once(bundle_key(digest), pack(files))
        return digest

    def _put_once(self, key: str, body: bytes) -> bool:
        """Create `key` unless it exists; False when another writer created it first (same key, same content)."""
        from botocore.exceptions import ClientError

        condition: dict[str, str] = {"IfNoneMatch": "*"}
        for attempt in range(5):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ServerSideEncryption=SSE,
                                       ContentType="application/gzip", **condition)
                return True
            except ClientError as e:
                code, status = _code(e)
                if status == 412:
                    return False
                if status == 409 and attempt < 4:  # ConditionalRequestConflict: a concurrent put is in flight
                    time.sleep(0.05 * 2**attempt)
                    continue
                if code == "NotImplemented" and condition:  # an S3-compatible store without conditional writes
                    condition = {}
                    continue
                raise
        return False

    def read_bundle(self, digest: str) -> dict[str, str]:
        from botocore.exceptions import ClientError

        key, where = bundle_key(digest), self.uri(digest)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if _code(e)[1] == 404:
                raise ArtifactNotFound(f"artifact {digest[:12]} is not stored: {where} does not exist") from None
            raise
        files = unpack(body, where)
        actual = bundle_hash(files)
        if actual != digest:
            raise ArtifactCorrupt(f"{where} is corrupt: its content hashes to {actual[:12]}, not {digest[:12]}; "
                                  "refused (an earlier version may be restorable from the bucket's versions)")
        return files

    def bundle_dir(self, digest: str) -> Path:
        bundle_key(digest)  # a malformed digest must not name a path in the cache
        if not self.cache.has(digest):
            # read_bundle verifies before anything is written, so a corrupt object never reaches the cache.
            self.cache.put_bundle(self.read_bundle(digest))
        return self.cache.bundle_dir(digest)

    def keep_evidence(self, key: str, files: list[Path]) -> Path:
        """Keep test evidence in the bucket under test-evidence/<key>/ and locally; returns the local folder."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"evidence key {key!r} must be one path segment")
        local = self.cache.keep_evidence(key, files)
        for f in files:
            if f.is_file():
                # A retest after a sandbox cut-off replaces evidence; the old version expires with the rule above.
                self.client.put_object(Bucket=self.bucket, Key=f"{EVIDENCE_PREFIX}{key}/{f.name}",
                                       Body=f.read_bytes(), ServerSideEncryption=SSE)
        return local

    def ensure_bucket(self) -> None:
        """Create the bucket if missing, with versioning on and the lifecycle rules above."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e)[1] != 404:
                raise
            args: dict[str, Any] = {"Bucket": self.bucket}
            if self.region_name and self.region_name != "us-east-1":  # us-east-1 refuses a LocationConstraint
                args["CreateBucketConfiguration"] = {"LocationConstraint": self.region_name}
            try:
                self.client.create_bucket(**args)
            except ClientError as e2:
                if _code(e2)[0] != "BucketAlreadyOwnedByYou":
                    raise
        self.client.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        self.client.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                       LifecycleConfiguration={"Rules": LIFECYCLE_RULES})


class S3ArtifactStoreResource(dg.ConfigurableResource):
    """Content-addressed code bundles in S3 (dagster-aws's S3Resource), cached on local disk for deploys."""

    bucket: str
    cache_root: str
    endpoint_url: str | None = None
    region_name: str = "us-east-1"
    # Off where the run's role may not administer buckets: then `ensure_bucket()` runs once by hand.
    ensure_bucket: bool = True
    _store: S3ArtifactStore | None = PrivateAttr(default=None)

    def store(self) -> S3ArtifactStore:
        if self._store is None:
            from dagster_aws.s3 import S3Resource

            client = S3Resource(region_name=self.region_name, endpoint_url=self.endpoint_url).get_client()
            store = S3ArtifactStore(client, self.bucket, Path(self.cache_root), region_name=self.region_name)
            if self.ensure_bucket:
                store.ensure_bucket()
            self._store = store
        return self._store
