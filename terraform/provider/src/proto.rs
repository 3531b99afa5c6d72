//! Generated gRPC code (see build.rs): Terraform's plugin protocol 6 and go-plugin's
//! controller, from our own definitions in proto/.

#[allow(clippy::all, missing_docs)]
pub mod tfplugin6 {
    tonic::include_proto!("tfplugin6");
}

#[allow(clippy::all, missing_docs)]
pub mod plugin {
    tonic::include_proto!("plugin");
}
