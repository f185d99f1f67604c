"""The local control planes themselves: two clusters side by side, their contexts, and a clean stop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from devcluster import build, cluster

pytestmark = pytest.mark.k8s


def test_two_clusters_answer_on_their_own_contexts(kube):
    """dev-staging and production reach cluster main, dr reaches the other one, each running v1.36."""
    from kubernetes import client

    servers = {}
    for ctx in ("dev-staging", "production", "dr"):
        api = kube.api(ctx)
        servers[ctx] = api.configuration.host
        assert client.VersionApi(api).get_code().git_version == build.KUBERNETES_VERSION
    assert servers["dev-staging"] == servers["production"] != servers["dr"]
    crds = {c.metadata.name for c in client.ApiextensionsV1Api(kube.api("dr")).list_custom_resource_definition().items}
    assert {"rollouts.argoproj.io", "virtualservices.networking.istio.io", "backups.velero.io"} <= crds


def test_rbac_is_enforced_for_a_user_without_bindings(kube, tmp_path):
    """The apiserver runs with RBAC on: a client certificate of an unbound user is refused."""
    from devcluster import certs
    from kubernetes import client, config

    main = kube.clusters["main"]
    crt, key = certs.issue(main.pki, f"nobody-{os.getpid()}", "nobody")
    kc = tmp_path / "nobody.kubeconfig"
    main._write_kubeconfig(kc, f"nobody-{os.getpid()}", "nobody")
    api = client.CoreV1Api(config.new_client_from_config(str(kc)))
    with pytest.raises(client.ApiException) as e:
        api.list_namespaced_secret("kube-system")
    assert e.value.status == 403


def test_up_down_leaves_nothing_running(tmp_path):
    """A cluster started from the cached binaries stops with every one of its processes."""
    started = cluster.up(tmp_path, ("dr",), node_agent=False, crds=False)
    pids = list(started[0].pids.values())
    assert pids and all(cluster._alive(p) for p in pids)
    assert (tmp_path / "kube" / "config").is_file()
    assert cluster.down(tmp_path) == 1
    assert not any(cluster._alive(p) for p in pids)
    assert cluster.down(tmp_path) == 0


def test_unknown_cluster_name_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "devcluster", "up", "--home", str(tmp_path), "--clusters", "prod"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert "unknown cluster(s) prod; known: main, dr" in p.stderr
    assert not (tmp_path / "kube").exists()
