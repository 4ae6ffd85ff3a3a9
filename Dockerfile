# syntax=docker/dockerfile:1
# The one `lanyard` binary (CA, agent and CLI) on a minimal Debian runtime, as a non-root user.
#   docker build -t registry.example.org/lanyard:0.1.0 .
# tests/deploy.rs checks this file against Cargo.toml and the Kubernetes manifests.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# Cargo.toml names these targets, so cargo wants them present even when building only the binary.
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin lanyard

FROM debian:bookworm-slim AS runtime
# ca-certificates: outbound HTTPS (OIDC discovery, access webhooks, bundle endpoints) verifies
# against the platform's roots unless a ca_file is configured.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lanyard \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/lanyard --no-create-home \
      --shell /usr/sbin/nologin lanyard \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/lanyard
COPY --from=builder /src/target/release/lanyard /usr/local/bin/lanyard
USER 10001:10001
WORKDIR /var/lib/lanyard
# The CA's gRPC, bundle endpoint and metrics ports (deploy/kubernetes/ca.yaml).
EXPOSE 8443 8444 9090
ENTRYPOINT ["/usr/local/bin/lanyard"]
CMD ["serve", "--config", "/etc/lanyard/lanyard.toml", "--data-dir", "/var/lib/lanyard"]
