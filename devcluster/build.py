"""Builds etcd and the Kubernetes control plane from the Go module proxy, cached outside the repo by version."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
BINARIES = (*KUBE_BINARIES, "etcd")


def cache_root() -> Path:
    """Where built binaries live; CODEMIND_K8S_CACHE overrides ~/.cache/codemind/k8s."""
    return Path(os.environ.get("CODEMIND_K8S_CACHE") or Path.home() / ".cache" / "codemind" / "k8s")


def bin_dir() -> Path:
    return cache_root() / f"kubernetes-{KUBERNETES_VERSION}-etcd-{ETCD_VERSION}" / "bin"


def built() -> bool:
    return all((bin_dir() / b).is_file() for b in BINARIES)


def _say(msg: str) -> None:
    print(f"[k8s-build] {msg}", file=sys.stderr, flush=True)


def _go(args: list[str], cwd: Path) -> str:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("go is not on PATH: the control plane is built from the Go module proxy (Go 1.26+)")
    t0, done = time.monotonic(), threading.Event()

    def heartbeat() -> None:  # a single `go build` of kube-apiserver runs for minutes without a word
        while not done.wait(30):
            _say(f"  still running go {args[0]} ({time.monotonic() - t0:.0f}s)")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        p = subprocess.run([go, *args], cwd=cwd, capture_output=True, text=True, check=False,
                           env={**os.environ, "GOFLAGS": "-buildvcs=false", "CGO_ENABLED": "0"})
    finally:
        done.set()
    if p.returncode != 0:
        raise RuntimeError(f"go {' '.join(args)} failed in {cwd}:\n{p.stderr[-4000:]}")
    return p.stdout


def _staging_replaces(work: Path) -> list[str]:
    """The `replace` lines of k8s.io/kubernetes' go.mod, each pointed at the matching v0.x.y release."""
    out = _go(["mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], work)
    gomod = Path(re.search(r'"GoMod":\s*"([^"]+)"', out).group(1)).read_text()
    staging = KUBERNETES_VERSION.replace("v1.", "v0.", 1)
    mods = re.findall(r"^\s*(?:replace\s+)?(k8s\.io/\S+)\s+=>\s+\./staging/", gomod, flags=re.MULTILINE)
    if not mods:
        raise RuntimeError("no staging replace lines found in k8s.io/kubernetes' go.mod")
    return [f"replace {m} => {m} {staging}" for m in mods]


def _module(work: Path, name: str, require: str, imports: list[str], replaces: list[str]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text(f"module {name}\n\ngo 1.26.0\n\nrequire {require}\n\n" + "\n".join(replaces) + "\n")
    body = "\n".join(f'\t_ "{i}"' for i in imports)
    (work / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{body}\n)\n")


def build() -> Path:
    """Build whatever is missing into bin_dir(); a warm cache returns at once."""
    out = bin_dir()
    if built():
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Test sessions and `make k8s-up` may start at once: one builds, the others wait for it.
    with open(out.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built():
            _build(out)
    return out


def _build(out: Path) -> None:
    work = out.parent / "src"
    t0 = time.monotonic()
    kube = work / "kubernetes"
    kube.mkdir(parents=True, exist_ok=True)
    if not all((out / b).is_file() for b in KUBE_BINARIES):
        first = not any((out / b).is_file() for b in KUBE_BINARIES)
        _say(f"resolving k8s.io/kubernetes {KUBERNETES_VERSION}"
             + (" (first build: about 6 minutes on 2 cores)" if first else ""))
        (kube / "go.mod").write_text("module codemind.local/kubewrap\n\ngo 1.26.0\n")
        replaces = _staging_replaces(kube)
        _module(kube, "codemind.local/kubewrap", f"k8s.io/kubernetes {KUBERNETES_VERSION}",
                [f"k8s.io/kubernetes/cmd/{b}" for b in KUBE_BINARIES], replaces)
        _go(["mod", "tidy"], kube)
        minor = KUBERNETES_VERSION.split(".")[1]
        ldflags = (f"-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION} "
                   f"-X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor={minor}")
        for b in KUBE_BINARIES:
            if (out / b).is_file():
                continue
            _say(f"building {b} ({time.monotonic() - t0:.0f}s so far)")
            _go(["build", "-ldflags", ldflags, "-o", str(out / f".{b}.tmp"), f"k8s.io/kubernetes/cmd/{b}"], kube)
            (out / f".{b}.tmp").rename(out / b)
    if not (out / "etcd").is_file():
        _say(f"building etcd {ETCD_VERSION} ({time.monotonic() - t0:.0f}s so far)")
        etcd = work / "etcd"
        _module(etcd, "codemind.local/etcdwrap", f"go.etcd.io/etcd/server/v3 {ETCD_VERSION}",
                ["go.etcd.io/etcd/server/v3"], [])
        _go(["mod", "tidy"], etcd)
        _go(["build", "-ldflags", "-s -w", "-o", str(out / ".etcd.tmp"), "go.etcd.io/etcd/server/v3"], etcd)
        (out / ".etcd.tmp").rename(out / "etcd")
    _say(f"control plane binaries ready in {out} ({time.monotonic() - t0:.0f}s)")


def openapi_spec() -> Path:
    """The Kubernetes OpenAPI v2 document of the built release, from the Go module cache."""
    p = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True)
    spec = Path(p.stdout.strip()) / f"k8s.io/kubernetes@{KUBERNETES_VERSION}" / "api/openapi-spec/swagger.json"
    if not spec.is_file():
        _go(["mod", "download", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"], cache_root())
    return spec


if __name__ == "__main__":
    print(build())
