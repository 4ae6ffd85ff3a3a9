#!/usr/bin/env python3
"""Validate a SPIFFE bundle document (JWKS) with parsers Lanyard did not write, and optionally
compare it with what a SPIFFE Workload API socket delivers for that trust domain.

Usage: check_bundle.py TRUST_DOMAIN (--file BUNDLE_JSON | --url URL --ca PEM --endpoint-id ID)
                       [--socket SOCKET_PATH]

- PyJWT (`jwt.PyJWKSet`, what py-spiffe's JwtBundle parses JWKS with) parses every key and
  rebuilds its public key from the JWK parameters (kty/crv/x/y), which validates the point;
- `cryptography` decodes each x5c certificate, which must be a CA whose public key is the JWK's;
- py-spiffe's `X509Bundle.parse_raw` loads the authorities as an X.509 bundle;
- with --url, the document is fetched over HTTPS by Python's `ssl` (OpenSSL) the way the
  https_spiffe profile requires: the chain must verify against the PEM bundle --ca, and the
  server certificate's only URI SAN must be --endpoint-id (host names are not checked);
- with --socket, py-spiffe's `WorkloadApiClient.fetch_x509_bundles()` must deliver exactly
  these authorities for TRUST_DOMAIN (a federated bundle, as workloads see it).

Prints one JSON object on stdout; exits non-zero with a message on the first violation. Used by
tests/federation.rs, which makes the assertions.
"""

import argparse
import base64
import http.client
import json
import ssl
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt import PyJWKSet
from spiffe import TrustDomain, WorkloadApiClient, X509Bundle


def fail(msg: str) -> None:
    print(json.dumps({"error": msg}))
    sys.exit(1)


def spki(key) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def fetch_https_spiffe(url: str, ca: str, endpoint_id: str) -> bytes:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # SPIFFE authenticates the SPIFFE ID, not a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=15)
    conn.request("GET", u.path or "/")
    # Before the response: the server closes the connection once it has answered.
    leaf = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
    resp = conn.getresponse()
    body = resp.read()
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [endpoint_id]:
        fail(f"the endpoint presented {uris}, not {endpoint_id}")
    if resp.status != 200:
        fail(f"HTTP {resp.status}")
    ctype = resp.getheader("Content-Type", "")
    if not ctype.startswith("application/json"):
        fail(f"Content-Type {ctype!r}")
    conn.close()
    return body


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("trust_domain")
    p.add_argument("--file")
    p.add_argument("--url")
    p.add_argument("--ca")
    p.add_argument("--endpoint-id")
    p.add_argument("--socket")
    args = p.parse_args()
    td_name, socket = args.trust_domain, args.socket
    if args.url:
        raw = fetch_https_spiffe(args.url, args.ca, args.endpoint_id)
    else:
        with open(args.file, "rb") as f:
            raw = f.read()
    doc = json.loads(raw)
    if not isinstance(doc.get("keys"), list):
        fail("keys is not a list")
    for field in ("spiffe_sequence", "spiffe_refresh_hint"):
        if field in doc and (not isinstance(doc[field], int) or doc[field] < 0):
            fail(f"{field} is not a non-negative integer")

    jwks = PyJWKSet.from_json(raw.decode("utf-8"))
    if len(jwks.keys) != len(doc["keys"]):
        fail(f"PyJWT accepted {len(jwks.keys)} of {len(doc['keys'])} keys")

    ders = []
    for i, (jwk, key) in enumerate(zip(jwks.keys, doc["keys"])):
        if key.get("use") != "x509-svid":
            fail(f"key {i}: use is {key.get('use')!r}, not x509-svid")
        x5c = key.get("x5c")
        if not isinstance(x5c, list) or len(x5c) != 1:
            fail(f"key {i}: x5c must hold exactly one certificate")
        der = base64.b64decode(x5c[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not bc.ca:
            fail(f"key {i}: the x5c certificate is not a CA")
        if spki(cert.public_key()) != spki(jwk.key):
            fail(f"key {i}: the JWK's public key is not the certificate's")
        ders.append(der)

    td = TrustDomain(td_name)
    bundle = X509Bundle.parse_raw(td, b"".join(ders))
    if len(bundle.x509_authorities) != len(ders):
        fail("py-spiffe's X509Bundle does not hold every authority")

    out = {
        "keys": len(ders),
        "sequence": doc.get("spiffe_sequence"),
        "refresh_hint": doc.get("spiffe_refresh_hint"),
    }
    if socket:
        client = WorkloadApiClient(socket_path=f"unix://{socket}", default_timeout=15)
        delivered = client.fetch_x509_bundles().get_bundle_for_trust_domain(td)
        got = sorted(
            a.public_bytes(Encoding.DER) for a in (delivered.x509_authorities if delivered else [])
        )
        out["workload_api_matches"] = got == sorted(ders)
        out["workload_api_authorities"] = len(got)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
