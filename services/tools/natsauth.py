"""`infermesh nats-auth`: NATS users for a Kubernetes install (docs/kubernetes.md).

Writes two files for the charts' ``global.nats.auth``:

- ``<secret-name>.yaml``: a Secret holding one random password per NATS user, the key being the
  user (``ingress``, ``scheduler``, ``agent-<pool>``, …): what the charts read the passwords from;
- ``nats-values.yaml``: values for the official NATS chart (nats-io/k8s): JetStream on (the
  autoscaler's lease) and ``config.merge.authorization`` with every user, its bcrypt hash and its
  permissions, exactly as ``infermesh up`` gives them to its own nats-server, but with the agents
  of a pool sharing one user (pod names are not known ahead).

Run it again with the same ``--out`` and the passwords stay (the Secret there is read back).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from infermesh.libs.bus.security import (
    RESPONSE_TTL,
    Identity,
    cluster_identities,
    hash_password,
)
from infermesh.proto.subjects import DEFAULT_PREFIX, check_token


def nats_values(hashed: dict[str, str], idents: list[Identity]) -> dict[str, Any]:
    """Values of the official NATS chart: JetStream and the authorization block."""
    users = []
    for i in idents:
        p = i.permissions
        perms: dict[str, Any] = {
            "publish": {"allow": list(p.publish)} if p.publish else {"deny": [">"]},
            "subscribe": {"allow": list(p.subscribe)} if p.subscribe else {"deny": [">"]},
        }
        if p.responses:
            perms["allow_responses"] = {"max": p.responses, "expires": RESPONSE_TTL}
        users.append({"user": i.user, "password": hashed[i.user], "permissions": perms})
    return {"config": {"jetstream": {"enabled": True},
                       "merge": {"authorization": {"users": users}}}}


def secret_manifest(name: str, namespace: str, passwords: dict[str, str]) -> dict[str, Any]:
    """The Secret the charts' ``global.nats.auth.secretName`` names."""
    meta: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/part-of": "infermesh"}}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque",
            "stringData": dict(passwords)}


def _old_passwords(path: Path) -> dict[str, str]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    data = doc.get("stringData") if isinstance(doc, dict) else None
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def write(out: Path, pools: list[str], *, prefix: str = DEFAULT_PREFIX,
          secret_name: str = "infermesh-nats", namespace: str = "") -> tuple[Path, Path]:
    """Write the Secret and the NATS chart's values into ``out``; their paths."""
    idents = cluster_identities(prefix, pools)
    out.mkdir(parents=True, exist_ok=True)
    secret_path = out / f"{secret_name}.yaml"
    old = _old_passwords(secret_path)
    passwords = {i.user: old.get(i.user) or secrets.token_urlsafe(24) for i in idents}
    hashed = {u: hash_password(pw) for u, pw in passwords.items()}
    secret_path.write_text(yaml.safe_dump(secret_manifest(secret_name, namespace, passwords),
                                          sort_keys=False))
    secret_path.chmod(0o600)
    values_path = out / "nats-values.yaml"
    values_path.write_text(
        "# Values for the official NATS chart (helm repo https://nats-io.github.io/k8s/helm/"
        "charts/),\n# written by `infermesh nats-auth` (bcrypt hashes only).\n"
        + yaml.safe_dump(nats_values(hashed, idents), sort_keys=False))
    return secret_path, values_path


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="infermesh nats-auth", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", default="default",
                   help="engine pools, comma-separated (one agent user each; default: default)")
    p.add_argument("--subject-prefix", default=DEFAULT_PREFIX,
                   help=f"the charts' global.nats.subjectPrefix (default: {DEFAULT_PREFIX})")
    p.add_argument("--secret-name", default="infermesh-nats",
                   help="name of the Secret (the charts' global.nats.auth.secretName)")
    p.add_argument("--namespace", default="", help="namespace of the Secret (default: none set)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder to write into")
    args = p.parse_args(argv)
    try:
        pools = [check_token(x.strip(), "pool") for x in args.pools.split(",") if x.strip()]
        if not pools:
            raise ValueError("--pools: at least one pool")
        check_token(args.subject_prefix, "subject prefix")
        check_token(args.secret_name, "secret name")
    except ValueError as e:
        print(f"infermesh nats-auth: {e}", file=sys.stderr)
        return 2
    for path in write(args.out, pools, prefix=args.subject_prefix,
                      secret_name=args.secret_name, namespace=args.namespace):
        print(path)
    return 0
