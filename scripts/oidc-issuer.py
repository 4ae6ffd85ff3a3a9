#!/usr/bin/env python3
"""A simulated OIDC issuer for trying and testing Lanyard's JWT attestation on one machine.

Needs python3 with PyJWT and cryptography (`pip install pyjwt cryptography`, or Debian's
python3-jwt and python3-cryptography).

  oidc-issuer.py key   --dir D --issuer k8s --kid k1 [--alg ES256|RS256] [--unpublished]
  oidc-issuer.py serve --dir D [--port 0]          # HTTPS on 127.0.0.1; writes D/port, D/tls.pem (its CA)
  oidc-issuer.py mint  --dir D --issuer k8s --kid k1 [--k8s NS/SA] [--github OWNER/REPO@REF]
                       [--aud lanyard] [--ttl 600] [--age 0] [--claims JSON] [--attack none|hs256]
  oidc-issuer.py jwks  --dir D --issuer k8s        # prints the JWKS (for a jwks_file)
  oidc-issuer.py batch                             # stdin: one JSON list of mint args per line;
                                                   # stdout: one token per line

Each issuer NAME is served at https://127.0.0.1:PORT/NAME: its discovery document at
/NAME/.well-known/openid-configuration, its JWKS at /NAME/jwks.json (built from D/NAME/keys/ at
every request, so `key` while serving is a key rotation), and /NAME/hits counts JWKS fetches.
Keys made with --unpublished live in D/NAME/unpublished/ and never appear in the JWKS until
`key --publish` moves them.
"""

import argparse
import base64
import datetime
import http.server
import json
import os
import shutil
import ssl
import sys
import threading
import time

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def b64(n: int, length: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(length, "big")).rstrip(b"=").decode()


def key_path(d, issuer, kid):
    for sub in ("keys", "unpublished"):
        p = os.path.join(d, issuer, sub, kid + ".pem")
        if os.path.exists(p):
            return p
    sys.exit(f"no key {kid} for issuer {issuer} in {d}")


def load_key(path):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


def jwk_of(kid, key):
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        n_len = (nums.n.bit_length() + 7) // 8
        return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                "n": b64(nums.n, n_len), "e": b64(nums.e, 3)}
    nums = pub.public_numbers()
    return {"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": b64(nums.x, 32), "y": b64(nums.y, 32)}


def jwks(d, issuer):
    keys = []
    kdir = os.path.join(d, issuer, "keys")
    for name in sorted(os.listdir(kdir)) if os.path.isdir(kdir) else []:
        keys.append(jwk_of(name[:-4], load_key(os.path.join(kdir, name))))
    return {"keys": keys}


def issuer_url(d, issuer):
    with open(os.path.join(d, "port")) as f:
        return f"https://127.0.0.1:{f.read().strip()}/{issuer}"


def cmd_key(a):
    if a.publish:
        src = os.path.join(a.dir, a.issuer, "unpublished", a.kid + ".pem")
        dst = os.path.join(a.dir, a.issuer, "keys", a.kid + ".pem")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        return
    sub = "unpublished" if a.unpublished else "keys"
    os.makedirs(os.path.join(a.dir, a.issuer, sub), exist_ok=True)
    if a.alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with open(os.path.join(a.dir, a.issuer, sub, a.kid + ".pem"), "wb") as f:
        f.write(pem)


def tls_cert(d):
    """A throwaway CA (tls.pem: what Lanyard's ca_file and curl --cacert take) and a server
    certificate for 127.0.0.1 and localhost signed by it (server.pem, server.key)."""
    import ipaddress
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lanyard test issuer CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    for name, data in [
        ("tls.pem", ca.public_bytes(serialization.Encoding.PEM)),
        ("server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        ("server.key", key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())),
    ]:
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def cmd_serve(a):
    os.makedirs(a.dir, exist_ok=True)
    tls_cert(a.dir)
    hits = {}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_json(self, doc, code=200):
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            parts = self.path.strip("/").split("/", 1)
            if len(parts) != 2 or not os.path.isdir(os.path.join(a.dir, parts[0])):
                return self.send_json({"error": "not found"}, 404)
            issuer, rest = parts
            base = f"https://127.0.0.1:{self.server.server_address[1]}/{issuer}"
            if rest == ".well-known/openid-configuration":
                return self.send_json({"issuer": base, "jwks_uri": base + "/jwks.json",
                                       "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
            if rest == "jwks.json":
                with lock:
                    hits[issuer] = hits.get(issuer, 0) + 1
                return self.send_json(jwks(a.dir, issuer))
            if rest == "hits":
                with lock:
                    return self.send_json({"jwks": hits.get(issuer, 0)})
            return self.send_json({"error": "not found"}, 404)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(a.dir, "server.pem"), os.path.join(a.dir, "server.key"))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    tmp = os.path.join(a.dir, "port.tmp")
    with open(tmp, "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(tmp, os.path.join(a.dir, "port"))
    print(f"issuers served at https://127.0.0.1:{srv.server_address[1]}/<name>", flush=True)
    srv.serve_forever()


def cmd_mint(a):
    now = int(time.time()) - a.age
    claims = {"iss": issuer_url(a.dir, a.issuer), "aud": [a.aud], "iat": now, "nbf": now,
              "exp": now + a.ttl, "jti": os.urandom(8).hex()}
    if a.k8s:
        ns, sa = a.k8s.split("/", 1)
        claims["sub"] = f"system:serviceaccount:{ns}:{sa}"
        claims["kubernetes.io"] = {"namespace": ns,
                                   "pod": {"name": f"{sa}-7d9f8", "uid": os.urandom(8).hex()},
                                   "serviceaccount": {"name": sa, "uid": os.urandom(8).hex()}}
    if a.github:
        repo, ref = a.github.split("@", 1)
        claims.update({"sub": f"repo:{repo}:ref:{ref}", "repository": repo, "ref": ref,
                       "workflow": "ci", "sha": os.urandom(20).hex(), "run_id": "42",
                       "actor": "octocat", "repository_owner": repo.split("/")[0]})
    claims.update(json.loads(a.claims))
    kid = a.kid
    key = load_key(key_path(a.dir, a.issuer, kid))
    if a.attack == "none":
        token = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    elif a.attack == "hs256":
        # The classic confusion: HMAC keyed with the issuer's *public* key bytes. PyJWT refuses
        # PEM-looking HMAC secrets, so sign by hand.
        import hashlib
        import hmac
        secret = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        head = enc(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        body = enc(json.dumps(claims).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        token = f"{head}.{body}.{enc(sig)}"
    else:
        alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        token = jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})
    print(token, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("key")
    k.add_argument("--dir", required=True)
    k.add_argument("--issuer", required=True)
    k.add_argument("--kid", required=True)
    k.add_argument("--alg", default="ES256", choices=["ES256", "RS256"])
    k.add_argument("--unpublished", action="store_true")
    k.add_argument("--publish", action="store_true")
    s = sub.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=0)
    m = sub.add_parser("mint")
    m.add_argument("--dir", required=True)
    m.add_argument("--issuer", required=True)
    m.add_argument("--kid", required=True)
    m.add_argument("--aud", default="lanyard")
    m.add_argument("--ttl", type=int, default=600)
    m.add_argument("--age", type=int, default=0, help="backdate iat/nbf/exp by this many seconds")
    m.add_argument("--k8s", help="NS/SA: Kubernetes service-account claims")
    m.add_argument("--github", help="OWNER/REPO@REF: GitHub Actions claims")
    m.add_argument("--claims", default="{}", help="JSON merged over the claims")
    m.add_argument("--attack", choices=["none", "hs256"])
    j = sub.add_parser("jwks")
    j.add_argument("--dir", required=True)
    j.add_argument("--issuer", required=True)
    sub.add_parser("batch")
    a = p.parse_args()
    if a.cmd == "batch":
        for line in sys.stdin:
            if line.strip():
                cmd_mint(p.parse_args(["mint"] + json.loads(line)))
        return
    if a.cmd == "key":
        cmd_key(a)
    elif a.cmd == "serve":
        cmd_serve(a)
    elif a.cmd == "mint":
        cmd_mint(a)
    else:
        print(json.dumps(jwks(a.dir, a.issuer), indent=2))


if __name__ == "__main__":
    main()
