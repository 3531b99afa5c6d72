//! Helpers for the tests that run `isthmus` daemons as real processes.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A free port on 127.0.0.1 (bound and released: good enough for a test on loopback).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Starts `isthmus <daemon> --config <file>` and waits for its `ready` line.
pub async fn daemon(
    dir: &Path,
    name: &str,
    daemon: &str,
    config: &str,
) -> (Child, serde_json::Value) {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .args([daemon, "--config", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let prefix = format!("isthmus {daemon} ready ");
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(json) = line.strip_prefix(&prefix) {
                return serde_json::from_str::<serde_json::Value>(json).unwrap();
            }
        }
        panic!("{name} exited before it was ready");
    })
    .await
    .unwrap_or_else(|_| panic!("{name} was not ready in time"));
    (child, ready)
}

pub async fn stop(mut child: Child, name: &str) {
    let pid = child.id().expect("still running") as i32;
    // SIGTERM: the daemon shuts down cleanly and exits 0.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(exit.success(), "{name} exited with {exit}");
}

/// The value of `series` (name and labels, as Prometheus prints them) on the `/metrics` of
/// the admin port at `admin`; 0 when absent.
pub async fn metric(admin: &str, series: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut metrics = String::new();
    tcp.read_to_string(&mut metrics).await.unwrap();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
