#!/usr/bin/env python3
"""Follow FetchX509SVID on a SPIFFE Workload API socket with the `spiffe` package's own
generated gRPC stubs, and print one JSON object on stdout:

- what a call *without* the `workload.spiffe.io: true` metadata gets (its status code);
- every SVID response of the stream (serial, SPIFFE ID, seconds since the start) until it has
  seen WANT distinct serials or DEADLINE seconds have passed, and when the stream was opened;
- the first FetchX509Bundles response's trust domain keys.

Usage: watch_svid.py SOCKET_PATH WANT DEADLINE

Used by tests/agent_interop.rs; the Rust test makes the assertions.
"""

import json
import sys
import time

import grpc
from spiffe import X509Svid
from spiffe._proto import workload_pb2, workload_pb2_grpc

HEADER = [("workload.spiffe.io", "true")]


def main() -> int:
    socket, want, deadline = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    start = time.monotonic()
    out = {}
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)

        try:
            next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), timeout=10)))
            out["no_header"] = "OK"
        except grpc.RpcError as e:
            out["no_header"] = e.code().name
            out["no_header_detail"] = e.details()

        bundles = next(
            iter(
                stub.FetchX509Bundles(
                    workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=10
                )
            )
        )
        out["bundle_keys"] = sorted(bundles.bundles.keys())

        responses = []
        serials = set()
        out["stream_opened_at"] = round(time.monotonic() - start, 3)
        stream = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=deadline
        )
        try:
            for resp in stream:
                svid = X509Svid.parse_raw(resp.svids[0].x509_svid, resp.svids[0].x509_svid_key)
                serial = format(svid.leaf.serial_number, "x")
                serials.add(serial)
                responses.append(
                    {
                        "serial": serial,
                        "spiffe_id": str(svid.spiffe_id),
                        "at": round(time.monotonic() - start, 3),
                        "crls": len(resp.crl),
                    }
                )
                if len(serials) >= want:
                    stream.cancel()
                    break
        except grpc.RpcError as e:
            out["stream_error"] = e.code().name
        out["responses"] = responses
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
