"""deploy/: the Dockerfile, the Dagster Helm values and the Kubernetes manifests, checked statically and on a real apiserver.

- The Dockerfile is not built here (no container engine): what can be read from it is checked.
- deploy/helm/values.yaml is validated as-is against the official chart's values.schema.json (and its user-deployments
  part against the subchart's schema); the schema's $refs to kubernetesjsonschema.dev, which cannot be fetched here,
  resolve to the `definitions` of the Kubernetes OpenAPI document of the release devcluster builds.
- Every manifest under deploy/k8s validates with kubernetes-validate (strict) at the newest version it knows, and the
  k8s-marked test applies them to the session's real kube-apiserver and checks least privilege with
  SubjectAccessReviews and impersonated requests.
"""

from __future__ import annotations

import copy
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.version import Version
from referencing import Registry
from referencing.jsonschema import DRAFT7

from devcluster.cluster import SHARED_K8S

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S_DIR = DEPLOY / "k8s"
VALUES = DEPLOY / "helm" / "values.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
CHART = SHARED_K8S / "dagster-helm"
SUBCHART = CHART / "charts" / "dagster-user-deployments"
# Where the chart's schema points for Kubernetes types (kubernetesjsonschema.dev is not reachable here).
K8S_DEFS_URL = "https://kubernetesjsonschema.dev/v1.18.0/_definitions.json"

IMAGE = "codemind/control-plane"
CODE_MODULE = "codemind_dagster.definitions"
SYSTEM_NS = "codemind-system"
SERVICE_NAMESPACES = ("codemind-dev", "codemind-staging", "codemind-production", "codemind-ai-services")
NAMESPACES = {SYSTEM_NS, *SERVICE_NAMESPACES, "codemind-monitoring", "codemind-sandbox", "velero"}
# Namespaces the manifests may point at without owning them (cluster add-ons).
EXTERNAL_NAMESPACES = {"kube-system", "istio-system", "argo-rollouts"}
CONTROL_PLANE = (SYSTEM_NS, "codemind-control-plane")
SANDBOX = ("codemind-sandbox", "codemind-sandbox")
LLM_SECRET, DB_SECRET = "codemind-llm-keys", "codemind-platform-db"

# One least-privilege matrix, checked twice: statically against the manifests' RBAC and live with
# SubjectAccessReviews on the apiserver. (identity, verb, API group, resource[/subresource], namespace, allowed)
RBAC_MATRIX = [
    # dagster-k8s in codemind-system: K8sRunLauncher / k8s_job_executor Jobs, PipesK8sClient pods
    (CONTROL_PLANE, "create", "batch", "jobs", SYSTEM_NS, True),
    (CONTROL_PLANE, "delete", "batch", "jobs", SYSTEM_NS, True),
    (CONTROL_PLANE, "get", "batch", "jobs/status", SYSTEM_NS, True),
    (CONTROL_PLANE, "create", "", "pods", SYSTEM_NS, True),
    (CONTROL_PLANE, "watch", "", "pods", SYSTEM_NS, True),
    (CONTROL_PLANE, "get", "", "pods/log", SYSTEM_NS, True),
    (CONTROL_PLANE, "get", "", "pods/status", SYSTEM_NS, True),
    (CONTROL_PLANE, "list", "", "events", SYSTEM_NS, True),
    # deploys into the service namespaces
    (CONTROL_PLANE, "create", "apps", "deployments", "codemind-dev", True),
    (CONTROL_PLANE, "patch", "apps", "deployments", "codemind-production", True),
    (CONTROL_PLANE, "list", "apps", "replicasets", "codemind-staging", True),
    (CONTROL_PLANE, "patch", "argoproj.io", "rollouts/status", "codemind-production", True),
    (CONTROL_PLANE, "create", "networking.istio.io", "virtualservices", "codemind-staging", True),
    (CONTROL_PLANE, "delete", "networking.istio.io", "destinationrules", "codemind-dev", True),
    (CONTROL_PLANE, "list", "discovery.k8s.io", "endpointslices", "codemind-ai-services", True),
    (CONTROL_PLANE, "get", "", "pods/log", "codemind-dev", True),
    (CONTROL_PLANE, "patch", "", "configmaps", "codemind-dev", True),
    # observation, backups, sandbox runs
    (CONTROL_PLANE, "list", "", "nodes", "", True),
    (CONTROL_PLANE, "watch", "", "namespaces", "", True),
    (CONTROL_PLANE, "create", "velero.io", "backups", "velero", True),
    (CONTROL_PLANE, "get", "velero.io", "restores", "velero", True),
    (CONTROL_PLANE, "create", "batch", "jobs", "codemind-sandbox", True),
    (CONTROL_PLANE, "create", "", "configmaps", "codemind-sandbox", True),
    (CONTROL_PLANE, "get", "", "pods/log", "codemind-sandbox", True),
    # what the control plane must not do
    (CONTROL_PLANE, "get", "", "secrets", "codemind-sandbox", False),
    (CONTROL_PLANE, "list", "", "secrets", "codemind-sandbox", False),
    (CONTROL_PLANE, "get", "", "secrets", SYSTEM_NS, False),
    (CONTROL_PLANE, "list", "", "secrets", "codemind-production", False),
    (CONTROL_PLANE, "delete", "", "nodes", "", False),
    (CONTROL_PLANE, "patch", "", "nodes", "", False),
    (CONTROL_PLANE, "create", "", "namespaces", "", False),
    (CONTROL_PLANE, "delete", "", "namespaces", "", False),
    (CONTROL_PLANE, "create", "", "pods", "codemind-dev", False),
    (CONTROL_PLANE, "delete", "apps", "replicasets", "codemind-dev", False),
    (CONTROL_PLANE, "create", "apps", "deployments", SYSTEM_NS, False),
    (CONTROL_PLANE, "create", "apps", "deployments", "codemind-sandbox", False),
    (CONTROL_PLANE, "create", "", "pods/exec", SYSTEM_NS, False),
    (CONTROL_PLANE, "create", "", "pods/exec", "codemind-sandbox", False),
    (CONTROL_PLANE, "get", "", "configmaps", SYSTEM_NS, False),
    (CONTROL_PLANE, "create", "rbac.authorization.k8s.io", "rolebindings", "codemind-dev", False),
    (CONTROL_PLANE, "create", "batch", "jobs", "kube-system", False),
    (CONTROL_PLANE, "get", "", "configmaps", "kube-system", False),
    (CONTROL_PLANE, "delete", "velero.io", "backups", "velero", False),
    # the sandbox's account may do nothing at all
    (SANDBOX, "list", "", "pods", "codemind-sandbox", False),
    (SANDBOX, "get", "", "secrets", "codemind-sandbox", False),
    (SANDBOX, "create", "", "configmaps", "codemind-sandbox", False),
    (SANDBOX, "create", "batch", "jobs", "codemind-sandbox", False),
    (SANDBOX, "get", "", "namespaces", "", False),
    (SANDBOX, "list", "", "nodes", "", False),
    (SANDBOX, "create", "", "pods", "codemind-dev", False),
]


def _matrix_id(row: tuple) -> str:
    (_, sa), verb, group, resource, ns, allowed = row
    return f"{sa}:{verb}:{group or 'core'}/{resource}@{ns or 'cluster'}:{'allow' if allowed else 'deny'}"


# ---- loading ------------------------------------------------------------------------------------------------


def load_manifests() -> list[tuple[str, dict]]:
    """Every YAML document under deploy/k8s, with the file it came from."""
    out = []
    for f in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                out.append((f.name, doc))
    return out


MANIFESTS = load_manifests()


def docs(kind: str | None = None, namespace: str | None = None) -> list[dict]:
    return [d for _, d in MANIFESTS if (kind is None or d["kind"] == kind)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]


def _doc_id(item: tuple[str, dict]) -> str:
    f, d = item
    ns = d["metadata"].get("namespace")
    return f"{f}:{d['kind']}/{ns + '/' if ns else ''}{d['metadata']['name']}"


def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        buf += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _instrs(name: str) -> list[str]:
    return [a for i, a in dockerfile() if i == name]


def dockerfile_cmd() -> list[str]:
    cmds = _instrs("CMD")
    assert len(cmds) == 1, f"expected one CMD, found {cmds}"
    return json.loads(cmds[0])  # exec form: no shell between the signal and dagster


# ---- the Dockerfile -----------------------------------------------------------------------------------------


def test_dockerfile_base_image_is_pinned_by_tag():
    """Every image the Dockerfile pulls has an explicit, non-floating tag; the base is a patch-level python:3.11 slim."""
    froms = _instrs("FROM")
    assert len(froms) == 1
    base = froms[0].split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?", base), base
    pulled = [base] + [m for a in _instrs("COPY") for m in re.findall(r"--from=(\S+)", a)]
    for image in pulled:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image} is not pinned by tag"


def test_dockerfile_uv_matches_the_makefile():
    """The image's uv is the version `make setup` bootstraps, so the lock is read by the same resolver."""
    uv = [m for a in _instrs("COPY") for m in re.findall(r"--from=ghcr\.io/astral-sh/uv:(\S+)", a)]
    make = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert uv and make and uv == [make.group(1)]


def test_dockerfile_installs_from_the_lock_before_the_source():
    """uv.lock is copied and synced (--frozen, no dev deps) before any source, so source edits reuse the dependency layer."""
    steps = dockerfile()
    copies = [(n, a) for n, (i, a) in enumerate(steps) if i == "COPY" and "--from=" not in a]
    syncs = [(n, a) for n, (i, a) in enumerate(steps) if i == "RUN" and "uv sync" in a]
    lock_at = next(n for n, a in copies if "uv.lock" in a.split())
    source_at = next(n for n, a in copies if "codemind_dagster" in a.split())
    assert len(syncs) == 2, syncs
    for _, a in syncs:
        assert "--frozen" in a.split() and "--no-dev" in a.split(), a
    assert lock_at < syncs[0][0] < source_at < syncs[1][0]
    assert "--no-install-project" in syncs[0][1].split()
    # Every local path the image copies exists, so the build context has what the Dockerfile asks for.
    for _, a in copies:
        for src in [w for w in a.split() if not w.startswith("--")][:-1]:
            assert (REPO / src).exists(), f"COPY source {src} is not in the repository"


def test_dockerfile_runs_as_a_numeric_non_root_user():
    """The last USER is a numeric non-zero UID (runAsNonRoot can only verify numbers), the same the Helm values run as."""
    users = _instrs("USER")
    assert users, "no USER: the image would run as root"
    steps = dockerfile()
    assert [i for i, _ in steps].index("CMD") > max(n for n, (i, _) in enumerate(steps) if i == "USER")
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), users[-1]
    v = values()
    contexts = [v["dagsterWebserver"]["podSecurityContext"], v["dagsterDaemon"]["podSecurityContext"],
                v["dagster-user-deployments"]["deployments"][0]["podSecurityContext"],
                v["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["podSpecConfig"]["securityContext"]]
    for ctx in contexts:
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == int(uid)


def test_dockerfile_serves_the_code_location():
    """CMD is `dagster api grpc -m codemind_dagster.definitions -h 0.0.0.0 -p 4000`, a module the image ships; DAGSTER_HOME is set."""
    cmd = dockerfile_cmd()
    assert cmd == ["dagster", "api", "grpc", "-m", CODE_MODULE, "-h", "0.0.0.0", "-p", "4000"]
    spec = importlib.util.find_spec(cmd[4])
    assert spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(REPO), spec
    # The module's top package is one the wheel (and so the image) installs.
    packages = re.search(r"packages\s*=\s*\[([^\]]*)\]", (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"{cmd[4].split(".")[0]}"' in packages
    assert "4000" in " ".join(_instrs("EXPOSE")).split()
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in " ".join(_instrs("ENV")).split()


# ---- the Helm values ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_registry() -> Registry:
    """A registry serving the Kubernetes OpenAPI definitions at the URL the chart's schema $refs."""
    if shutil.which("go") is None:
        msg = "the Kubernetes OpenAPI document comes from the Go module cache: Go 1.26+ is needed"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    from devcluster import build

    spec = build.openapi_spec()
    assert spec.is_file(), f"{spec} missing after `go mod download`"
    definitions = json.loads(spec.read_text())["definitions"]
    return Registry().with_resource(K8S_DEFS_URL, DRAFT7.create_resource({"definitions": definitions}))


def chart_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def subchart_schema() -> dict:
    return json.loads((SUBCHART / "values.schema.json").read_text())


def schema_errors(schema: dict, instance: dict, registry: Registry) -> list[tuple[str, str]]:
    """(JSON path, message) of every error, with those nested under anyOf/oneOf, sorted."""
    found = []

    def walk(e: jsonschema.ValidationError) -> None:
        found.append((e.json_path, e.message))
        for c in e.context or []:
            walk(c)

    for e in jsonschema.Draft7Validator(schema, registry=registry).iter_errors(instance):
        walk(e)
    return sorted(found)


def helm_merge(defaults, override):
    """Helm's coalescing of values: maps merge key by key, anything else (lists included) is replaced."""
    if isinstance(defaults, dict) and isinstance(override, dict):
        out = dict(defaults)
        for k, v in override.items():
            out[k] = helm_merge(defaults[k], v) if k in defaults else v
        return out
    return copy.deepcopy(override)


def subchart_values(v: dict) -> dict:
    """What the user-deployments subchart sees: its defaults, the parent's section for it, the parent's globals."""
    defaults = yaml.safe_load((SUBCHART / "values.yaml").read_text())
    merged = helm_merge(defaults, v["dagster-user-deployments"])
    merged["global"] = helm_merge(defaults.get("global", {}), v["global"])
    return merged


def _external_refs(node) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) and node["$ref"].startswith("http") else set()
        return found.union(*(_external_refs(x) for x in node.values()))
    if isinstance(node, list):
        return set().union(*(_external_refs(x) for x in node))
    return set()


def test_every_kubernetes_ref_of_the_chart_schemas_resolves(k8s_registry):
    """Each $ref to kubernetesjsonschema.dev in both schemas resolves to a schema in the registered OpenAPI definitions."""
    refs = _external_refs(chart_schema()) | _external_refs(subchart_schema())
    assert len(refs) >= 14, refs  # SOURCES.md counted 14 distinct Kubernetes types
    resolver = k8s_registry.resolver()
    for ref in sorted(refs):
        assert ref.startswith(K8S_DEFS_URL + "#/definitions/io.k8s."), ref
        target = resolver.lookup(ref).contents
        assert isinstance(target, dict) and ({"type", "properties", "$ref"} & target.keys()), ref


def test_helm_values_validate_against_the_chart_schema(k8s_registry):
    """deploy/helm/values.yaml, as-is and without the chart's defaults, satisfies the chart's whole values schema."""
    assert schema_errors(chart_schema(), values(), k8s_registry) == []


def test_user_deployments_validate_against_the_subchart_schema(k8s_registry):
    """The subchart's own defaults validate (the registry agrees with upstream), and so does what our values give it."""
    assert schema_errors(subchart_schema(), yaml.safe_load((SUBCHART / "values.yaml").read_text()), k8s_registry) == []
    assert schema_errors(subchart_schema(), subchart_values(values()), k8s_registry) == []


def _break_resources(v):
    v["dagster-user-deployments"]["deployments"][0]["resources"]["limits"] = ["1", "2Gi"]


def _break_quantity(v):
    v["dagster-user-deployments"]["deployments"][0]["resources"]["requests"]["memory"] = {"Mi": 768}


def _break_probe(v):
    v["dagster-user-deployments"]["deployments"][0]["readinessProbe"]["periodSeconds"] = "20"


def _drop_pg_host(v):
    del v["postgresql"]["postgresqlHost"]


def _drop_telemetry(v):
    del v["telemetry"]


def _drop_deployment_port(v):
    del v["dagster-user-deployments"]["deployments"][0]["port"]


def _typo_in_run_launcher(v):
    v["runLauncher"]["config"]["k8sRunLauncher"]["jobNamespaces"] = "codemind-system"


UD0 = "$['dagster-user-deployments'].deployments[0]"


@pytest.mark.parametrize("breaker, path, message", [
    (_break_resources, f"{UD0}.resources.limits", "['1', '2Gi'] is not of type 'object'"),
    (_break_quantity, f"{UD0}.resources.requests.memory", "{'Mi': 768} is not of type 'string'"),
    (_break_probe, f"{UD0}.readinessProbe.periodSeconds", "'20' is not of type 'integer'"),
    (_drop_pg_host, "$.postgresql", "'postgresqlHost' is a required property"),
    (_drop_telemetry, "$", "'telemetry' is a required property"),
    (_drop_deployment_port, UD0, "'port' is a required property"),
    (_typo_in_run_launcher, "$.runLauncher.config.k8sRunLauncher",
     "Additional properties are not allowed ('jobNamespaces' was unexpected)"),
], ids=lambda x: x.__name__.strip("_") if callable(x) else None)
def test_broken_helm_values_are_refused_naming_the_path(k8s_registry, breaker, path, message):
    """A copy of the values with one deliberate fault is refused, and the error names the faulty path."""
    broken = copy.deepcopy(values())
    breaker(broken)
    errors = schema_errors(chart_schema(), broken, k8s_registry)
    assert (path, message) in errors, errors
    # The fault is the only thing wrong: every error is on its path (anyOf wrappers included).
    assert all(p == path for p, _ in errors), errors
    if breaker in (_break_resources, _break_quantity, _break_probe, _drop_deployment_port):
        sub_path = path.replace("$['dagster-user-deployments']", "$")
        assert (sub_path, message) in schema_errors(subchart_schema(), subchart_values(broken), k8s_registry)


def test_helm_values_wire_the_platform_together():
    """The values name our image, module, port, secrets, namespace and ServiceAccount, and turn off what we do not use."""
    v = values()
    [dep] = v["dagster-user-deployments"]["deployments"]
    assert v["dagster-user-deployments"]["enabled"] and v["dagster-user-deployments"]["enableSubchart"]
    assert dep["name"] == "codemind-dagster" and dep["image"]["repository"] == IMAGE
    cmd = dockerfile_cmd()
    assert dep["dagsterApiGrpcArgs"] == ["-m", CODE_MODULE] == cmd[3:5]
    assert dep["port"] == 4000 == int(cmd[cmd.index("-p") + 1])
    assert {"name": "CODEMIND_PROFILE", "value": "k8s"} in dep["env"]
    assert {s["name"] for s in dep["envSecrets"]} == {LLM_SECRET, DB_SECRET}
    assert dep["resources"]["requests"] and dep["resources"]["limits"]
    assert dep["readinessProbe"]["enabled"] and dep["readinessProbe"]["exec"]["command"][:3] == [
        "dagster", "api", "grpc-health-check"]
    # One image and one tag for webserver, daemon and code server: the versions uv.lock pins, everywhere.
    images = [v["dagsterWebserver"]["image"], v["dagsterDaemon"]["image"], dep["image"]]
    assert {(i["repository"], i["tag"]) for i in images} == {(IMAGE, dep["image"]["tag"])}

    launcher = v["runLauncher"]
    k8s = launcher["config"]["k8sRunLauncher"]
    assert launcher["type"] == "K8sRunLauncher" and k8s["jobNamespace"] == SYSTEM_NS
    assert {s["name"] for s in k8s["envSecrets"]} == {LLM_SECRET, DB_SECRET}
    assert k8s["resources"]["requests"] and k8s["resources"]["limits"]

    pg = v["postgresql"]
    assert pg["enabled"] is False and v["generatePostgresqlPasswordSecret"] is False
    assert pg["postgresqlHost"] and pg["postgresqlDatabase"] and pg["postgresqlUsername"]
    assert pg["postgresqlPassword"] == "", "a password must not be committed in values.yaml"
    assert v["global"]["postgresqlSecretName"]

    daemon = v["dagsterDaemon"]
    assert daemon["enabled"] and daemon["runCoordinator"]["enabled"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert v["telemetry"]["enabled"] is False

    # The chart uses our ServiceAccount and creates no RBAC of its own (ours is in deploy/k8s).
    sa = v["global"]["serviceAccountName"]
    assert v["serviceAccount"] == {"create": False, "name": sa, "annotations": {}}
    assert v["rbacEnabled"] is False and v["dagster-user-deployments"]["rbacEnabled"] is False
    assert (SYSTEM_NS, sa) == CONTROL_PLANE
    assert any(d["metadata"]["name"] == sa for d in docs("ServiceAccount", SYSTEM_NS))


# ---- the Kubernetes manifests -------------------------------------------------------------------------------

K8S_VERSION = kubernetes_validate.latest_version()


def test_kubernetes_validate_knows_the_cluster_version():
    """The newest schema kubernetes-validate ships is at least the release the test cluster runs."""
    from devcluster.build import KUBERNETES_VERSION

    minor = ".".join(KUBERNETES_VERSION.lstrip("v").split(".")[:2])
    assert Version(K8S_VERSION) >= Version(minor), (K8S_VERSION, KUBERNETES_VERSION)


@pytest.mark.parametrize("item", MANIFESTS, ids=_doc_id)
def test_manifest_validates_with_kubernetes_validate(item):
    """Each manifest validates strictly (no unknown fields) against the newest Kubernetes schema the package ships."""
    _, doc = item
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == ".".join(K8S_VERSION.split(".")[:2])


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["spec"].update(policyType=d["spec"].pop("policyTypes")), ["spec"]),
    (lambda d: d["spec"].update(podSelector="all"), ["spec", "podSelector"]),
], ids=["unknown-field", "wrong-type"])
def test_kubernetes_validate_refuses_a_broken_manifest(mutate, where):
    """A deliberately broken copy of the sandbox's deny-all egress policy is refused at the faulty path."""
    [policy] = [d for d in docs("NetworkPolicy", "codemind-sandbox") if d["metadata"]["name"] == "deny-all-egress"]
    broken = copy.deepcopy(policy)
    mutate(broken)
    with pytest.raises(kubernetes_validate.ValidationError) as e:
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    assert list(e.value.path) == where


def test_namespaces_and_their_labels():
    """The eight namespaces exist, all part-of codemind; exactly the service namespaces get Istio injection."""
    ns = {d["metadata"]["name"]: d["metadata"].get("labels", {}) for d in docs("Namespace")}
    assert set(ns) == NAMESPACES
    for name, labels in ns.items():
        assert labels.get("app.kubernetes.io/part-of") == "codemind", name
        assert (labels.get("istio-injection") == "enabled") == (name in SERVICE_NAMESPACES), name
    assert ns["codemind-sandbox"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Every object carries the label too, and lives in a namespace of ours.
    for _, d in MANIFESTS:
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "codemind", _doc_id((_, d))
        assert d["metadata"].get("namespace", SYSTEM_NS) in NAMESPACES


def test_everything_referenced_exists():
    """Namespaces and ServiceAccounts named by bindings, selectors and the Helm values are defined, or are known add-ons."""
    sas = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs("ServiceAccount")}
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs("Role")}
    cluster_roles = {d["metadata"]["name"] for d in docs("ClusterRole")}
    for b in docs("RoleBinding") + docs("ClusterRoleBinding"):
        ref = b["roleRef"]
        if ref["kind"] == "Role":
            assert (b["metadata"]["namespace"], ref["name"]) in roles, b["metadata"]
        else:
            assert ref["name"] in cluster_roles, b["metadata"]
        for s in b["subjects"]:
            assert s["kind"] == "ServiceAccount" and (s["namespace"], s["name"]) in sas, s
    named = set()
    for p in docs("NetworkPolicy"):
        for rule in p["spec"].get("ingress", []) + p["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                sel = peer.get("namespaceSelector") or {}
                named |= {v for k, v in (sel.get("matchLabels") or {}).items() if k == "kubernetes.io/metadata.name"}
                for e in sel.get("matchExpressions") or []:
                    if e["key"] == "kubernetes.io/metadata.name":
                        named |= set(e["values"])
    assert named and named <= NAMESPACES | EXTERNAL_NAMESPACES, named - NAMESPACES - EXTERNAL_NAMESPACES
    assert values()["runLauncher"]["config"]["k8sRunLauncher"]["jobNamespace"] in NAMESPACES


def _rules() -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}", r)
            for d in docs("Role") + docs("ClusterRole") for r in d["rules"]]


def test_rbac_has_no_wildcards_no_secrets_no_escalation():
    """No rule uses `*`, grants Secrets, nonResourceURLs, or the escalate/bind/impersonate verbs."""
    assert _rules()
    for where, r in _rules():
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert not any("*" in x for x in r.get(field, [])), (where, r)
        assert "secrets" not in r["resources"], where
        assert not r.get("nonResourceURLs"), where
        assert not {"escalate", "bind", "impersonate"} & set(r["verbs"]), where


def test_service_namespace_roles_are_identical():
    """The deployer Role is the same in every service namespace and bound only to the control plane."""
    roles = {d["metadata"]["namespace"]: d["rules"] for d in docs("Role")
             if d["metadata"]["name"] == "codemind-control-plane-deployer"}
    assert set(roles) == set(SERVICE_NAMESPACES)
    assert all(r == roles["codemind-dev"] for r in roles.values())
    for ns in SERVICE_NAMESPACES:
        subjects = [s for b in docs("RoleBinding", ns) for s in b["subjects"]]
        assert {(s["namespace"], s["name"]) for s in subjects} == {CONTROL_PLANE}, ns


def _statically_allowed(who: tuple[str, str], verb: str, group: str, resource: str, ns: str) -> bool:
    """What the manifests' RBAC alone grants `who` (RBAC is additive, so this is the union of matching rules)."""
    def subject(b):
        return any(s["kind"] == "ServiceAccount" and (s["namespace"], s["name"]) == who for s in b["subjects"])

    rules = []
    for b in docs("ClusterRoleBinding"):
        if subject(b):
            rules += [r for d in docs("ClusterRole") if d["metadata"]["name"] == b["roleRef"]["name"] for r in d["rules"]]
    if ns:
        for b in docs("RoleBinding", ns):
            if subject(b):
                kind = b["roleRef"]["kind"]
                rules += [r for d in docs(kind, ns if kind == "Role" else None)
                          if d["metadata"]["name"] == b["roleRef"]["name"] for r in d["rules"]]
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


@pytest.mark.parametrize("row", RBAC_MATRIX, ids=_matrix_id)
def test_rbac_matrix_statically(row):
    """The manifests' Roles and bindings grant exactly the allowed half of the least-privilege matrix."""
    who, verb, group, resource, ns, allowed = row
    assert _statically_allowed(who, verb, group, resource, ns) is allowed


def test_sandbox_account_has_no_token_and_no_binding():
    """codemind-sandbox's ServiceAccount mounts no token and no binding names it, its namespace or all accounts."""
    [sa] = [d for d in docs("ServiceAccount", "codemind-sandbox")]
    assert sa["metadata"]["name"] == SANDBOX[1] and sa["automountServiceAccountToken"] is False
    broad = {"system:serviceaccounts", "system:serviceaccounts:codemind-sandbox", "system:authenticated"}
    for b in docs("RoleBinding") + docs("ClusterRoleBinding"):
        for s in b["subjects"]:
            assert (s.get("namespace"), s["name"]) != SANDBOX and s["name"] not in broad, b["metadata"]


def test_sandbox_network_is_closed_both_ways():
    """codemind-sandbox has a deny-all egress (policyTypes [Egress], no rules), a deny-all ingress, and no policy that allows anything."""
    policies = {p["metadata"]["name"]: p["spec"] for p in docs("NetworkPolicy", "codemind-sandbox")}
    egress = [s for s in policies.values() if s["policyTypes"] == ["Egress"] and "egress" not in s]
    ingress = [s for s in policies.values() if s["policyTypes"] == ["Ingress"] and "ingress" not in s]
    assert egress and ingress
    assert all(s["podSelector"] == {} for s in egress + ingress)
    # NetworkPolicies add up: one allow rule anywhere in the namespace would open the sandbox.
    assert not any(s.get("egress") or s.get("ingress") for s in policies.values()), policies


def test_service_namespaces_deny_ingress_by_default():
    """Each service namespace denies all ingress, then allows Istio and monitoring; none opens egress to cloud metadata."""
    for ns in SERVICE_NAMESPACES:
        specs = [p["spec"] for p in docs("NetworkPolicy", ns)]
        assert any(s["podSelector"] == {} and s["policyTypes"] == ["Ingress"] and not s.get("ingress") for s in specs), ns
        sources = set()
        for s in specs:
            for rule in s.get("ingress", []):
                for peer in rule.get("from", []):
                    for e in (peer.get("namespaceSelector") or {}).get("matchExpressions") or []:
                        sources |= set(e["values"])
        assert {"istio-system", "codemind-monitoring"} <= sources, (ns, sources)
        # Egress is an allowlist in every service namespace (policyTypes Egress selects all pods).
        assert any(s["podSelector"] == {} and "Egress" in s["policyTypes"] for s in specs), ns
    metadata = ipaddress.ip_address("169.254.169.254")
    for p in docs("NetworkPolicy"):
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block and metadata in ipaddress.ip_network(block["cidr"]):
                    assert any(metadata in ipaddress.ip_network(x) for x in block.get("except", [])), p["metadata"]


def _release_objects(env: str, ns: str) -> list[dict]:
    """What KubeRuntime applies for a release of a sample bundle (production: the canary objects)."""
    from codemind_dagster.resources import kube_manifests as km

    release = km.Release.of("loyalty-points", env, ns, "ab" * 32, {"CODEMIND_FAULT_ERROR_RATE": "0.5"})
    return km.release_objects(release, km.WorkloadOptions(), b"bundle", canary=env == "production")


@pytest.mark.parametrize("env", ["dev", "production"])
def test_release_objects_validate_with_kubernetes_validate(env):
    """A release's built-in objects (ConfigMaps with bundle and service layer, Services, Deployment) validate strictly."""
    objs = _release_objects(env, f"codemind-{env}")
    builtin = [o for o in objs if o["apiVersion"] in ("v1", "apps/v1")]
    assert {o["kind"] for o in builtin} >= {"ConfigMap", "Service"}
    for o in builtin:
        assert kubernetes_validate.validate(o, K8S_VERSION, strict=True), o["metadata"]["name"]
    workload = objs[-1]
    if workload["kind"] == "Rollout":
        # A Rollout's template is a PodTemplateSpec: validated as the one of a Deployment.
        workload = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                    "spec": {"selector": workload["spec"]["selector"], "template": workload["spec"]["template"]}}
    assert kubernetes_validate.validate(workload, K8S_VERSION, strict=True)


def test_prometheus_may_scrape_what_the_service_pods_announce():
    """The pods' prometheus.io/* annotations name the container's port and path, and in every namespace the
    services run in, codemind-monitoring is let in on that port (by a rule without a port list or one naming it)."""
    for env in ("dev", "staging", "production"):
        ns = f"codemind-{env}"
        tpl = _release_objects(env, ns)[-1]["spec"]["template"]
        ann = tpl["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        port = int(ann["prometheus.io/port"])
        [container] = tpl["spec"]["containers"]
        assert port in {p["containerPort"] for p in container["ports"]}
        admitted = False
        for policy in docs("NetworkPolicy", ns):
            if policy["spec"]["podSelector"] != {}:
                continue
            for rule in policy["spec"].get("ingress", []):
                ports = {p.get("port") for p in rule.get("ports") or []}
                for peer in rule.get("from", []):
                    names = set()
                    sel = peer.get("namespaceSelector") or {}
                    names |= {v for k, v in (sel.get("matchLabels") or {}).items() if k == "kubernetes.io/metadata.name"}
                    for e in sel.get("matchExpressions") or []:
                        if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "In":
                            names |= set(e["values"])
                    if "codemind-monitoring" in names and (not ports or port in ports):
                        admitted = True
        assert admitted, f"{ns}: no NetworkPolicy lets codemind-monitoring reach the scrape port {port}"


# ---- on the real apiserver ----------------------------------------------------------------------------------

# Creation order: a namespace before what lives in it, a role before its binding (RBAC would allow either
# order; this keeps the first SubjectAccessReviews from racing a half-applied set).
KIND_ORDER = ["Namespace", "ServiceAccount", "LimitRange", "ResourceQuota", "ClusterRole", "ClusterRoleBinding",
              "Role", "RoleBinding", "NetworkPolicy"]


def _user(who: tuple[str, str]) -> str:
    return f"system:serviceaccount:{who[0]}:{who[1]}"


def _can(authz, who: tuple[str, str], verb: str, group: str, resource: str, ns: str) -> bool:
    res, _, sub = resource.partition("/")
    attrs = {"verb": verb, "group": group, "resource": res}
    if sub:
        attrs["subresource"] = sub
    if ns:
        attrs["namespace"] = ns
    review = authz.create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        # The groups a real token of this ServiceAccount carries: built-in bindings to them count too.
        "spec": {"user": _user(who), "groups": ["system:serviceaccounts", f"system:serviceaccounts:{who[0]}",
                                                "system:authenticated"], "resourceAttributes": attrs}})
    return bool(review.status.allowed)


def _as(kube, who: tuple[str, str]):
    """An ApiClient that impersonates the ServiceAccount (the admin certificate is system:masters)."""
    api = kube.api("dev-staging")
    api.set_default_header("Impersonate-User", _user(who))
    return api


def _status(call) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as e:
        return e.status
    return 200


@pytest.mark.k8s
def test_manifests_apply_and_grant_least_privilege(kube):
    """Applied to the real apiserver, the manifests let the control plane do its work and nothing else; the sandbox SA nothing."""
    from kubernetes import client, dynamic
    from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

    admin = kube.api("dev-staging")
    dyn = dynamic.DynamicClient(admin)
    created = []
    ordered = sorted((d for _, d in MANIFESTS), key=lambda d: KIND_ORDER.index(d["kind"]))
    try:
        for d in ordered:
            res = dyn.resources.get(api_version=d["apiVersion"], kind=d["kind"])
            try:
                res.create(body=d, namespace=d["metadata"].get("namespace"))
                created.append((res, d))
            except ConflictError:
                pass  # other tests in this session create codemind-dev & co.: an existing object is fine

        authz = client.AuthorizationV1Api(admin)
        # RBAC reaches the authorizer through an informer: wait until every grant is visible, so the denials
        # below are checked against the applied RBAC, not against a cache that has not seen it yet.
        grants = [r for r in RBAC_MATRIX if r[-1]]
        deadline = time.monotonic() + 30
        while True:
            missing = [_matrix_id(r) for r in grants if not _can(authz, *r[:-1])]
            if not missing:
                break
            assert time.monotonic() < deadline, f"not granted after 30s: {missing}"
            time.sleep(0.5)
        wrong = [_matrix_id(r) for r in RBAC_MATRIX if _can(authz, *r[:-1]) is not r[-1]]
        assert wrong == []

        # The same, as real requests by the impersonated accounts (server-side dry run: authorized, not persisted).
        cp = _as(kube, CONTROL_PLANE)
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "rbac-probe"}, "spec": {
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": f"{IMAGE}:0.1.0"}]}}}}
        deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "rbac-probe"}, "spec": {
            "selector": {"matchLabels": {"app": "rbac-probe"}}, "template": {
                "metadata": {"labels": {"app": "rbac-probe"}},
                "spec": {"containers": [{"name": "c", "image": "codemind/service-runtime:py3.11"}]}}}}
        node = client.CoreV1Api(admin).list_node().items[0].metadata.name
        cp_core, cp_batch, cp_apps = client.CoreV1Api(cp), client.BatchV1Api(cp), client.AppsV1Api(cp)
        assert _status(lambda: cp_batch.create_namespaced_job(SYSTEM_NS, job, dry_run="All")) == 200
        assert _status(lambda: cp_apps.create_namespaced_deployment("codemind-dev", deployment, dry_run="All")) == 200
        assert _status(lambda: cp_core.list_namespaced_secret("codemind-sandbox")) == 403
        assert _status(lambda: cp_core.read_namespaced_secret("any", "codemind-sandbox")) == 403
        assert _status(lambda: cp_core.delete_node(node, dry_run="All")) == 403
        assert _status(lambda: cp_apps.create_namespaced_deployment(SYSTEM_NS, deployment, dry_run="All")) == 403

        sb = _as(kube, SANDBOX)
        sb_core = client.CoreV1Api(sb)
        assert _status(lambda: sb_core.list_namespaced_pod("codemind-sandbox")) == 403
        assert _status(lambda: sb_core.list_namespaced_secret("codemind-sandbox")) == 403
        assert _status(lambda: sb_core.create_namespaced_config_map(
            "codemind-sandbox", {"metadata": {"name": "rbac-probe"}}, dry_run="All")) == 403
        assert _status(lambda: client.BatchV1Api(sb).create_namespaced_job(
            "codemind-sandbox", job, dry_run="All")) == 403

        # Everything the sandbox account may do in its namespace is what any authenticated identity may do:
        # ask the apiserver about itself. Anything more would show up here, whatever grants it.
        rules = client.AuthorizationV1Api(sb).create_self_subject_rules_review(
            {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
             "spec": {"namespace": "codemind-sandbox"}}).status.resource_rules
        self_reviews = {"selfsubjectaccessreviews", "selfsubjectrulesreviews", "selfsubjectreviews"}
        for r in rules:
            assert set(r.api_groups) <= {"authorization.k8s.io", "authentication.k8s.io"}, r
            assert set(r.resources) <= self_reviews and r.verbs == ["create"], r
        cp_rules = client.AuthorizationV1Api(cp).create_self_subject_rules_review(
            {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
             "spec": {"namespace": "codemind-sandbox"}}).status.resource_rules
        assert any("jobs" in r.resources for r in cp_rules)
        assert not any("secrets" in r.resources or "*" in r.resources for r in cp_rules), cp_rules

        sa = client.CoreV1Api(admin).read_namespaced_service_account(SANDBOX[1], SANDBOX[0])
        assert sa.automount_service_account_token is False
    finally:
        # Remove what this test created, newest first. Namespaces stay: other tests of the session use
        # codemind-dev & co., and a deleted namespace lingers as Terminating, which would break whoever
        # creates it next; the session cluster is discarded at the end anyway.
        for res, d in reversed(created):
            if d["kind"] == "Namespace":
                continue
            try:
                res.delete(name=d["metadata"]["name"], namespace=d["metadata"].get("namespace"))
            except NotFoundError:
                pass
