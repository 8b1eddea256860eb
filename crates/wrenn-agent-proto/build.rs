//! Generates prost messages and proto3-JSON (pbjson) serde impls for `proto/agent/v1`.
//!
//! protoc comes from the `protoc-bin-vendored` crate so a fresh machine needs no system package.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = [root.join("agent/v1/agent.proto")];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = out.join("agent_descriptor.bin");
    let mut config = prost_build::Config::new();
    config
        .protoc_executable(protoc)
        .file_descriptor_set_path(&descriptor)
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_protos(&protos, &[root.clone(), include])?;

    let set = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .ignore_unknown_fields()
        .build(&[".wrenn.agent.v1"])?;
    Ok(())
}
