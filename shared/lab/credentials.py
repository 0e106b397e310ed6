"""``splitllm credentials``: a deployment's key, each tier's credential, revocation; and the test topologies' provisioning.

    splitllm credentials init --dir keys                      # keys/deployment.key (0600), keys/deployment.pub
    splitllm credentials issue --dir keys --role user --id user-3 --client 3 --out user-3.json
    splitllm credentials issue --dir keys --role admin --id alice          # prints a bearer token
    splitllm credentials provision --dir keys --edges 2 --users 4          # the whole topology at once
    splitllm credentials revoke --cloud URL --admin-token T (--jti ID | --subject user:user-3)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.http.credentials import CredentialError, init_deployment, issue, load_private_key, write_private

DAY = 24 * 3600.0


@dataclass
class Provisioned:
    """The files of a provisioned topology: the trust key, each tier's credential file, the admin's bearer token."""

    directory: Path
    deployment: str
    trust_key: Path
    credentials: dict[str, Path]  # "cloud", "edge-0", "user-3", ... -> credential file
    admin_token: str

    def env(self, name: str) -> dict[str, str]:
        """The environment that gives tier ``name`` its credential and the trust key."""
        return {"SPLITLLM_CREDENTIAL": str(self.credentials[name]), "SPLITLLM_TRUST_KEY": str(self.trust_key),
                "SPLITLLM_DEPLOYMENT": self.deployment}


def provision(directory: str | Path, edges: list[str], users: dict[str, int], deployment: str = "splitllm",
              ttl: float = 30 * DAY) -> Provisioned:
    """A new deployment key and a credential for the cloud, each edge, each user (with its data client) and an admin."""
    directory = Path(directory)
    key_path, pub_path = init_deployment(directory)
    key = load_private_key(key_path)
    files: dict[str, Path] = {}
    for role, ident, client in [("cloud", "cloud", None), *(("edge", e, None) for e in edges),
                                *(("user", u, c) for u, c in users.items())]:
        files[ident] = directory / f"{ident}.json"
        write_private(files[ident], issue(key, deployment, role, ident, ttl, client).to_json())
    admin = issue(key, deployment, "admin", "admin", ttl).certificate
    write_private(directory / "admin.token", admin + "\n")
    return Provisioned(directory, deployment, pub_path, files, admin)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitllm credentials", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="a new deployment key pair")
    init.add_argument("--dir", required=True, help="where deployment.key (private) and deployment.pub go")
    one = sub.add_parser("issue", help="one credential: a tier's file (to --out) or an admin's bearer token (printed)")
    one.add_argument("--dir", required=True, help="the folder holding deployment.key")
    one.add_argument("--role", required=True, choices=("admin", "cloud", "edge", "user"))
    one.add_argument("--id", required=True, help="the tier's id: user-3, edge-0, cloud; an admin's name")
    one.add_argument("--client", type=int, default=None, help="a user's data client (its partition of the data set)")
    one.add_argument("--deployment", default="splitllm", help="the deployment's name (every tier's --deployment)")
    one.add_argument("--ttl-days", type=float, default=30.0, help="days the credential is valid")
    one.add_argument("--out", default=None, help="the credential file to write (0600); tiers only")
    many = sub.add_parser("provision", help="a deployment key and every credential of a topology")
    many.add_argument("--dir", required=True)
    many.add_argument("--edges", type=int, default=2)
    many.add_argument("--users", type=int, default=4, help="user-0 .. user-N-1, user i holding data client i")
    many.add_argument("--deployment", default="splitllm")
    many.add_argument("--ttl-days", type=float, default=30.0)
    rev = sub.add_parser("revoke", help="revoke a credential at a running cloud (edges learn of it with their next round)")
    rev.add_argument("--cloud", required=True, help="the cloud's URL")
    rev.add_argument("--admin-token", required=True, help="an admin's bearer credential (or @FILE)")
    who = rev.add_mutually_exclusive_group(required=True)
    who.add_argument("--jti", help="one credential, by its id")
    who.add_argument("--subject", help="every credential of role:id issued so far, e.g. user:user-3")
    rev.add_argument("--ca-file", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "init":
            key, pub = init_deployment(args.dir)
            print(f"wrote {key} (keep it secret: it issues credentials) and {pub} (every tier's --trust-key)")
        elif args.action == "issue":
            credential = issue(load_private_key(Path(args.dir) / "deployment.key"), args.deployment, args.role, args.id,
                               args.ttl_days * DAY, args.client)
            if args.role == "admin":
                print(credential.certificate)
            else:
                if not args.out:
                    raise CredentialError("a tier's credential holds its private key: give --out FILE")
                write_private(Path(args.out), credential.to_json())
                print(f"wrote {args.out} (the {args.role}'s --credential; jti {credential.principal().jti})")
        elif args.action == "provision":
            done = provision(args.dir, [f"edge-{e}" for e in range(args.edges)],
                             {f"user-{u}": u for u in range(args.users)}, args.deployment, args.ttl_days * DAY)
            print(f"wrote {done.trust_key}, {len(done.credentials)} credentials and {done.directory / 'admin.token'}")
        else:
            import httpx

            token = Path(args.admin_token[1:]).read_text().strip() if args.admin_token.startswith("@") else args.admin_token
            resp = httpx.post(f"{args.cloud.rstrip('/')}/v1/credentials/revoke", timeout=30, verify=args.ca_file or True,
                              json={"jti": args.jti, "subject": args.subject}, headers={"authorization": f"Bearer {token}"})
            if resp.status_code >= 400:
                raise CredentialError(f"the cloud refused: HTTP {resp.status_code}: {resp.text[:300]}")
            print(resp.text)
    except (CredentialError, OSError) as exc:
        print(f"splitllm credentials: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
