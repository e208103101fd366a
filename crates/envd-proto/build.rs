//! Compiles the envd protobuf files with protox, a pure-Rust compiler, so that building
//! needs no system `protoc`. prost-build writes the message types and pbjson-build the
//! serde implementations that follow the canonical protobuf JSON mapping, which the
//! Connect JSON codec needs.

use std::path::PathBuf;

const PROTO_FILES: [&str; 2] = ["process/process.proto", "filesystem/filesystem.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let include_dir = manifest_dir.join("proto");
    for file in PROTO_FILES {
        println!("cargo:rerun-if-changed={}", include_dir.join(file).display());
    }

    let descriptors = protox::compile(PROTO_FILES, [&include_dir])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.compile_well_known_types();
    config.extern_path(".google.protobuf", "::pbjson_types");
    config.bytes(["."]);
    config.compile_fds(descriptors.clone())?;

    let descriptor_bytes = prost::Message::encode_to_vec(&descriptors);
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .ignore_unknown_fields()
        .out_dir(&out_dir)
        .build(&[".process", ".filesystem"])?;

    Ok(())
}
