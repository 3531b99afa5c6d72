//! Generates the peer transport, client API and on-disk encodings from
//! proto/federation.proto with protox (a pure-Rust protobuf compiler), so building needs no
//! system `protoc`. Also generates the client of the few etcd v3 RPCs the benchmark example
//! (`examples/fedbench.rs`) drives, from the vendored bench-proto/etcd_rpc.proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/federation.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;

    let etcd = ["bench-proto/etcd_rpc.proto"];
    println!("cargo:rerun-if-changed={}", etcd[0]);
    let fds = protox::compile(etcd, ["bench-proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
