"""`python -m devcluster up|down|status|build`: the local control planes behind `make k8s-up`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from devcluster import build, cluster


def _home(arg: str | None) -> Path:
    return Path(arg or os.environ.get("CODEMIND_HOME") or ".codemind").expanduser().resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    p.add_argument("command", choices=["up", "down", "status", "build"])
    p.add_argument("--home", help="CODEMIND_HOME (default: $CODEMIND_HOME or ./.codemind)")
    p.add_argument("--clusters", default=",".join(cluster.CLUSTERS),
                   help=f"which clusters (default: {','.join(cluster.CLUSTERS)})")
    a = p.parse_args(argv)
    home = _home(a.home)
    if a.command == "build":
        print(build.build())
        return 0
    if a.command == "down":
        n = cluster.down(home)
        print(f"stopped {n} cluster(s) under {cluster.kube_dir(home)}")
        return 0
    if a.command == "status":
        running = [c for c in (cluster.Cluster.load(d) for d in sorted(cluster.kube_dir(home).glob("*")))
                   if c is not None]
        for c in running:
            state = "running" if c.alive() else "stopped (stale state: run `make k8s-up`)"
            print(f"{c.name}: {state} at {c.server}  contexts: {', '.join(c.contexts)}")
        if not running:
            print(f"no cluster under {cluster.kube_dir(home)}: run `make k8s-up`")
        return 0 if running and all(c.alive() for c in running) else 1
    names = tuple(n.strip() for n in a.clusters.split(",") if n.strip())
    unknown = [n for n in names if n not in cluster.CLUSTERS]
    if unknown:
        p.error(f"unknown cluster(s) {', '.join(unknown)}; known: {', '.join(cluster.CLUSTERS)}")
    try:
        started = cluster.up(home, names)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kc = cluster.kubeconfig_path(home)
    for c in started:
        print(f"{c.name}: {c.server}  contexts: {', '.join(c.contexts)}  logs: {c.root / 'logs'}")
    print(f"\nexport KUBECONFIG={kc}\nexport PATH={build.bin_dir()}:$PATH   # kubectl {build.KUBERNETES_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
