"""The S3 artifact store against moto's server: written once, encrypted, verified on read, cached on disk."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import boto3
import pytest

from codemind_dagster.domain.code import bundle_hash
from codemind_dagster.resources.artifacts_s3 import (
    ArtifactCorrupt,
    ArtifactNotFound,
    S3ArtifactStoreResource,
    bundle_key,
    pack,
)

pytestmark = pytest.mark.aws
BUCKET = "codemind-artifacts-test"
FILES = {"service/app.py": "from fastapi import FastAPI\napp = FastAPI()\n",
         "service/__init__.py": "", "tests/test_app.py": "def test_ok():\n    assert True\n",
         "README.md": "naïve ünïcode ✓\n"}


@pytest.fixture
def s3(aws):
    return boto3.client("s3", endpoint_url=aws, region_name="us-east-1")


@pytest.fixture
def resource(aws, tmp_path) -> S3ArtifactStoreResource:
    return S3ArtifactStoreResource(bucket=BUCKET, endpoint_url=aws, cache_root=str(tmp_path / "cache"))


@pytest.fixture
def store(resource):
    return resource.store()


def count_puts(client) -> list[dict]:
    """Every PutObject the client sends, with its parameters."""
    seen: list[dict] = []
    client.meta.events.register("provide-client-params.s3.PutObject", lambda params, **_: seen.append(params))
    return seen


def test_round_trip_and_the_key_is_the_content_hash(store, s3):
    digest = store.put_bundle(FILES)

    assert digest == bundle_hash(FILES) and store.has(digest)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]] == [f"sha256/{digest}.tar.gz"]
    assert store.read_bundle(digest) == FILES
    assert store.uri(digest) == f"s3://{BUCKET}/sha256/{digest}.tar.gz"


def test_the_archive_is_deterministic():
    assert pack(FILES) == pack(dict(reversed(FILES.items())))
    with tarfile.open(fileobj=io.BytesIO(pack(FILES)), mode="r:gz") as tar:
        assert {(m.mtime, m.uid, m.uname) for m in tar} == {(0, 0, "")}


def test_written_once_a_second_put_rewrites_nothing(store, s3):
    puts = count_puts(store.client)
    digest = store.put_bundle(FILES)
    first = s3.head_object(Bucket=BUCKET, Key=bundle_key(digest))

    assert store.put_bundle(dict(FILES)) == digest
    again = s3.head_object(Bucket=BUCKET, Key=bundle_key(digest))
    assert len(puts) == 1 and puts[0]["IfNoneMatch"] == "*"
    assert (again["ETag"], again["LastModified"], again["VersionId"]) == (
        first["ETag"], first["LastModified"], first["VersionId"])
    assert len(s3.list_object_versions(Bucket=BUCKET)["Versions"]) == 1


def test_the_conditional_put_refuses_an_overwrite_and_the_loser_of_a_race_succeeds(store, s3):
    digest = store.put_bundle(FILES)
    key = bundle_key(digest)

    # The losing writer checked has() before the winner's object landed: its put meets the condition.
    assert store._put_once(key, b"anything") is False
    assert store.read_bundle(digest) == FILES
    results: list[str] = []
    other = dict(FILES, extra="x")
    threads = [threading.Thread(target=lambda: results.append(store.put_bundle(other))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [bundle_hash(other)] * 4
    versions = s3.list_object_versions(Bucket=BUCKET, Prefix=bundle_key(bundle_hash(other)))["Versions"]
    assert len(versions) == 1


def test_every_put_asks_for_server_side_encryption(store, s3, tmp_path):
    digest = store.put_bundle(FILES)
    (tmp_path / "junit.xml").write_text("<testsuite/>")
    store.keep_evidence("k" * 64, [tmp_path / "junit.xml", tmp_path / "absent.json"])

    assert s3.head_object(Bucket=BUCKET, Key=bundle_key(digest))["ServerSideEncryption"] == "AES256"
    evidence = s3.head_object(Bucket=BUCKET, Key=f"test-evidence/{'k' * 64}/junit.xml")
    assert evidence["ServerSideEncryption"] == "AES256"
    assert (store.root / "test-evidence" / ("k" * 64) / "junit.xml").read_text() == "<testsuite/>"


def test_ensure_bucket_creates_it_with_versioning_and_lifecycle_rules(store, s3):
    assert s3.get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]}
    assert rules["expire-test-evidence"]["Filter"]["Prefix"] == "test-evidence/"
    assert rules["expire-test-evidence"]["Expiration"]["Days"] == 90
    assert rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 30
    assert all(r["Status"] == "Enabled" for r in rules.values())
    store.ensure_bucket()  # again on an existing bucket: no error, same rules
    assert len(s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]) == 2


def test_a_corrupt_object_is_refused_and_never_reaches_the_cache(store, s3):
    digest = store.put_bundle(FILES)
    tampered = pack({**FILES, "service/app.py": "import os; os.system('curl evil')\n"})
    s3.put_object(Bucket=BUCKET, Key=bundle_key(digest), Body=tampered)  # behind the store's back

    with pytest.raises(ArtifactCorrupt, match=rf"s3://{BUCKET}/sha256/{digest}\.tar\.gz is corrupt"):
        store.read_bundle(digest)
    with pytest.raises(ArtifactCorrupt, match=digest[:12]):
        store.bundle_dir(digest)
    assert not store.cache.has(digest) and not store.cache.bundle_dir(digest).exists()
    assert not list((store.root / "bundles").glob(f".{digest[:12]}*"))  # no half-written temporary either

    s3.put_object(Bucket=BUCKET, Key=bundle_key(digest), Body=b"\x1f\x8b not gzip at all")
    with pytest.raises(ArtifactCorrupt, match="not a readable tar.gz bundle"):
        store.bundle_dir(digest)
    assert not store.cache.bundle_dir(digest).exists()


def test_a_missing_digest_is_a_clear_error(store):
    digest = bundle_hash({"nothing": "here"})

    assert not store.has(digest)
    with pytest.raises(ArtifactNotFound, match=rf"artifact {digest[:12]} is not stored: s3://{BUCKET}/"):
        store.read_bundle(digest)
    with pytest.raises(ArtifactNotFound):
        store.bundle_dir(digest)
    with pytest.raises(ValueError, match="not an artifact digest"):
        store.read_bundle("../../etc/passwd")


def test_bundle_dir_materializes_files_identical_to_the_bundle(store, s3):
    digest = store.put_bundle(FILES)
    gets = []
    store.client.meta.events.register("provide-client-params.s3.GetObject", lambda params, **_: gets.append(1))

    root = store.bundle_dir(digest)
    on_disk = {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*")
               if p.is_file() and p.name != ".manifest.json"}
    assert on_disk == FILES and root.is_relative_to(Path(store.root))
    assert store.bundle_dir(digest) == root and len(gets) == 1  # the second call is served by the cache


def test_the_resource_reaches_the_bucket_through_dagster_aws(resource, aws):
    import dagster as dg

    @dg.asset
    def bundled(artifacts: S3ArtifactStoreResource) -> str:
        return artifacts.store().put_bundle(FILES)

    result = dg.materialize([bundled], resources={"artifacts": resource})
    assert result.output_for_node("bundled") == bundle_hash(FILES)
    assert resource.store().read_bundle(bundle_hash(FILES)) == FILES
