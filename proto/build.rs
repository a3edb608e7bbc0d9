//! Compiles `strata/v1/*.proto` with protox (a pure-Rust protobuf compiler), so building strata needs no
//! system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "strata/v1/common.proto",
        "strata/v1/worker.proto",
        "strata/v1/coordinator.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        // Weight chunks stay in the buffer they arrive in instead of a copy of their own.
        .bytes(".strata.v1.BlobChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
