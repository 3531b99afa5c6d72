//! isthmus-testkit: what Isthmus's tests share, so each test says only what it is about.
//! A dev-dependency only: nothing that ships depends on it.
//!
//! - [`store`]: a one-member federation store on loopback, started in milliseconds.
//! - [`mesh`]: `MeshService` and `MeshConfig` fixtures built in one line.
//! - [`discovery`]: the control plane's discovery file (`services.yaml`), written from a
//!   builder instead of hand-spelled YAML.
//! - [`kube_api`]: a Kubernetes-API-compatible server for tests (list/watch, apply, patch,
//!   status, discovery, TokenReview), so kube-rs code runs unchanged against it.
//!
//! Fixtures panic on failure: they are for tests, where a panic is the report.

pub mod discovery;
pub mod kube_api;
pub mod mesh;
pub mod store;
