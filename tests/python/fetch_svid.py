#!/usr/bin/env python3
"""Fetch the X.509-SVID and bundles from a SPIFFE Workload API socket with the unmodified PyPI
`spiffe` client, check them with `cryptography`, and print one JSON object on stdout.

Usage: fetch_svid.py SOCKET_PATH

Used by tests/agent_interop.rs; the Rust test makes the assertions.
"""

import hashlib
import json
import sys

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spiffe import WorkloadApiClient


def spki(key) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def main() -> int:
    socket = sys.argv[1]
    client = WorkloadApiClient(socket_path=f"unix://{socket}", default_timeout=15)
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    context = client.fetch_x509_context()

    td = svid.spiffe_id.trust_domain
    bundle = bundles.get_bundle_for_trust_domain(td)
    authorities = list(bundle.x509_authorities) if bundle else []
    issued_by_bundle = False
    for ca in authorities:
        try:
            svid.leaf.verify_directly_issued_by(ca)
            issued_by_bundle = True
        except Exception:  # noqa: BLE001 - any failure means "not this CA"
            pass

    print(
        json.dumps(
            {
                "spiffe_id": str(svid.spiffe_id),
                "trust_domain": td.name,
                "serial": format(svid.leaf.serial_number, "x"),
                "chain_len": len(svid.cert_chain),
                "key_matches_leaf": spki(svid.private_key.public_key())
                == spki(svid.leaf.public_key()),
                "bundle_trust_domains": sorted(b.trust_domain.name for b in bundles.bundles),
                "bundle_sha256": sorted(
                    hashlib.sha256(ca.public_bytes(Encoding.DER)).hexdigest()
                    for ca in authorities
                ),
                "issued_by_bundle": issued_by_bundle,
                "context_svids": [str(s.spiffe_id) for s in context.x509_svids],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
