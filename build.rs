//! Compiles `proto/` with a vendored protoc, so a fresh machine needs no system protobuf.
//!
//! The CA's protos and the SPIFFE Workload API are compiled separately, each with its own
//! descriptor set: gRPC reflection on the CA lists only what the CA serves (the Workload API is
//! the agent's).

use std::{
    env,
    path::{Path, PathBuf},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let ca = [
        "proto/lanyard/v1/ca.proto",
        "proto/lanyard/v1/admin.proto",
        "proto/lanyard/v1/audit.proto",
        "proto/lanyard/v1/revocation.proto",
        "proto/lanyard/v1/access.proto",
    ];
    compile(&out, &ca, "lanyard_descriptor.bin")?;
    compile(
        &out,
        &["proto/spiffe/workload.proto"],
        "workload_descriptor.bin",
    )?;
    // The etcd store's client: our own trimmed copy of etcd's v3 API, client side only. This
    // keeps one tonic/prost and the vendored protoc (no `etcd-client` crate and its own protoc
    // lookup at build time).
    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/etcd/kv.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(
            cfg,
            &[PathBuf::from("proto/etcd/kv.proto")],
            &[PathBuf::from("proto")],
        )?;
    Ok(())
}

fn compile(
    out: &Path,
    protos: &[&str],
    descriptor: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // A CRL as `Bytes`: decoded, it is a slice of the buffer the answer arrived in, not a copy
    // (36 MB at a million revocations, held twice for a moment as a `Vec`).
    cfg.bytes([".lanyard.v1.Crl"]);
    let protos: Vec<PathBuf> = protos.iter().map(PathBuf::from).collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join(descriptor))
        // Small per-call buffers: a CA holds two mostly idle streams per connected agent.
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_with_config(
            cfg,
            &protos,
            &[PathBuf::from("proto"), protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
