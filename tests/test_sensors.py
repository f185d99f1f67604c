"""The intent sensor, ticked through build_sensor_context against a real (ephemeral) instance."""

from __future__ import annotations

import shutil

import dagster as dg
import pytest

from codemind_dagster.definitions import build_definitions


@pytest.fixture
def env(settings):
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    settings.intents_dir.mkdir(parents=True)
    yield defs, instance, settings.intents_dir
    instance.dispose()


def tick(defs, instance, cursor=None):
    sensor = defs.resolve_sensor_def("intent_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as ctx:
        result = sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def test_new_intent_gets_a_partition_and_one_run(env, examples):
    defs, instance, inbox = env
    shutil.copy(examples / "loyalty-points.yaml", inbox)
    result = tick(defs, instance)
    assert [r.partition_key for r in result.run_requests] == ["loyalty-points"]
    assert result.run_requests[0].run_key.startswith("loyalty-points@")
    assert instance.get_dynamic_partitions("intents") == ["loyalty-points"]
    assert tick(defs, instance, result.cursor).run_requests == []
    # Without the cursor the file is read again, but the unchanged spec still starts nothing.
    assert tick(defs, instance).run_requests == []


def test_changed_intent_runs_again_with_a_new_run_key(env, examples):
    defs, instance, inbox = env
    target = inbox / "loyalty-points.yaml"
    shutil.copy(examples / "loyalty-points.yaml", target)
    first = tick(defs, instance)
    target.write_text(target.read_text().replace("owner: growth-team", "owner: another-team"))
    second = tick(defs, instance, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["loyalty-points"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert instance.get_dynamic_partitions("intents") == ["loyalty-points"]


def test_invalid_file_is_rejected_visibly_and_changes_nothing(env, examples):
    defs, instance, inbox = env
    shutil.copy(examples / "loyalty-points.yaml", inbox)
    first = tick(defs, instance)
    (inbox / "broken.yaml").write_text("apiVersion: codemind.dev/v1\nkind: BusinessIntent\nmetadata: {name: Bad}\n")
    result = tick(defs, instance, first.cursor)
    assert result.run_requests == []
    assert instance.get_dynamic_partitions("intents") == ["loyalty-points"]
    [obs] = result.asset_events
    assert "broken.yaml" in obs.metadata["rejected_file"].value
    assert "metadata.name" in obs.metadata["error"].value
    db = defs.resources["database"].client()
    assert [r.file.endswith("broken.yaml") for r in db.rejections()] == [True]


def test_a_second_file_claiming_the_same_name_is_rejected(env, examples):
    defs, instance, inbox = env
    shutil.copy(examples / "loyalty-points.yaml", inbox / "a.yaml")
    tick(defs, instance)
    shutil.copy(examples / "loyalty-points.yaml", inbox / "b.yaml")
    result = tick(defs, instance)
    assert result.run_requests == []
    errors = [r.error for r in defs.resources["database"].client().rejections()]
    assert len(errors) == 1 and "already defined by a.yaml" in errors[0]
