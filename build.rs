//! Compiles `proto/` with a vendored protoc, so a fresh machine needs no system protobuf.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let protos = [
        "proto/lanyard/v1/ca.proto",
        "proto/lanyard/v1/admin.proto",
        "proto/lanyard/v1/audit.proto",
        "proto/lanyard/v1/revocation.proto",
        "proto/lanyard/v1/access.proto",
        "proto/spiffe/workload.proto",
    ];
    let protos: Vec<PathBuf> = protos.iter().map(PathBuf::from).collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("lanyard_descriptor.bin"))
        .compile_with_config(
            cfg,
            &protos,
            &[PathBuf::from("proto"), protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
