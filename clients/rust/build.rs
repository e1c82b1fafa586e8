// Generates the fse.v1 client stubs from the repository's proto into OUT_DIR at build
// time (never committed). protoc comes from the PROTOC environment variable, which the
// Makefile points at clients/protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../../proto";
    let proto = "../../proto/fse/v1/fse.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_protos(&[proto], &[proto_root])?;
    Ok(())
}
