"""Certificates for one cluster, made with openssl: a CA, serving certs and client certs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {p.stderr.strip()[-2000:]}")


def ca(d: Path) -> None:
    """ca.crt/ca.key, made once per directory."""
    d.mkdir(parents=True, exist_ok=True)
    if (d / "ca.crt").exists():
        return
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=codemind-devcluster-ca", cwd=d)


def issue(d: Path, name: str, cn: str, org: str | None = None, *, ips: tuple[str, ...] = (),
          dns: tuple[str, ...] = (), server: bool = False) -> tuple[Path, Path]:
    """`name`.crt/.key signed by the CA in d; server certs carry the given SANs."""
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    if crt.exists() and key.exists():
        return crt, key
    subj = f"/CN={cn}" + (f"/O={org}" if org else "")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", f"{name}.csr", "-subj", subj, cwd=d)
    ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}"]
    sans = [f"IP:{i}" for i in ips] + [f"DNS:{n}" for n in dns]
    if sans:
        ext.append("subjectAltName=" + ",".join(sans))
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", crt.name, "-days", "3650", "-extfile", f"{name}.ext", cwd=d)
    return crt, key


def service_account_keys(d: Path) -> tuple[Path, Path]:
    key, pub = d / "sa.key", d / "sa.pub"
    if not key.exists():
        _openssl("genrsa", "-out", key.name, "2048", cwd=d)
        _openssl("rsa", "-in", key.name, "-pubout", "-out", pub.name, cwd=d)
    return key, pub
