"""Key material for the e2e control plane, made with the ``openssl`` CLI.

- a CA (ECDSA P-256, 7 days) and a kube-apiserver serving cert for 127.0.0.1/localhost
  signed by it;
- an RSA service-account signing key (apiserver verifies and signs with it, the
  serviceaccount-token controller signs with it);
- a static token file (``--token-auth-file``): CSV ``token,user,uid,"group1,group2"``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .procs import ControlPlaneError

DAYS = "7"

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {sans}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Certs:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    sa_key: Path
    token_file: Path


def _openssl(pki: Path, *args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise ControlPlaneError("the `openssl` CLI is needed for the e2e certs (apt-get install openssl)")
    res = subprocess.run([exe, *args], cwd=pki, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{res.stderr.strip()}")


def generate_certs(
    pki: Path, tokens: Sequence[tuple[str, str, Sequence[str]]], extra_sans: Sequence[str] = ()
) -> Certs:
    """Write all key material into ``pki``. ``tokens``: (token, user name, groups);
    ``extra_sans``: more subject alternative names of the API server (``IP:...``,
    ``DNS:...``), for clients that reach it by another address than 127.0.0.1 (pods)."""
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    cnf = pki / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF.replace("{sans}", ", ".join(["IP:127.0.0.1", "DNS:localhost", *extra_sans])))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(pki, "req", "-config", str(cnf), "-x509", *ec, "-days", DAYS,
             "-subj", "/CN=kubetune-e2e-ca", "-extensions", "ca_ext",
             "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    _openssl(pki, "req", "-config", str(cnf), "-new", *ec, "-subj", "/CN=kube-apiserver",
             "-keyout", "apiserver.key", "-out", "apiserver.csr")  # fmt: skip
    _openssl(pki, "x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", DAYS, "-extfile", str(cnf), "-extensions", "server_ext",
             "-out", "apiserver.crt")  # fmt: skip
    _openssl(pki, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", "sa.key")  # fmt: skip
    lines = []
    for i, (token, user, groups) in enumerate(tokens):
        if any(c in token + user for c in ',"\n'):
            raise ValueError(f"token and user name must not contain , or quotes: {user!r}")
        groups_col = f',"{",".join(groups)}"' if groups else ""  # no column: no groups
        lines.append(f"{token},{user},uid-{i}{groups_col}")
    token_file = pki / "tokens.csv"
    token_file.write_text("\n".join(lines) + "\n")
    for f in pki.iterdir():
        f.chmod(0o600)
    return Certs(
        ca_cert=pki / "ca.crt",
        server_cert=pki / "apiserver.crt",
        server_key=pki / "apiserver.key",
        sa_key=pki / "sa.key",
        token_file=token_file,
    )
