//! A standalone DNS proxy for benchmarks (`bench/dns`): the real [`isthmus_dns::start`], fed
//! a fixed mesh configuration from a JSON file instead of a control plane.
//!
//! ```text
//! bench_server --table mesh.json [--listen 127.0.0.1:15053] [--upstream 127.0.0.1:53]...
//!              [--threads 2] [--udp-workers 0] [--cache-entries 10000]
//! ```
//!
//! `mesh.json` is a serialized `isthmus_core::mesh::MeshConfig`. The proxy prints
//! `ready udp=<addr> tcp=<addr>` once it answers, and stops on SIGINT or when its standard
//! input closes.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context};
use isthmus_core::mesh::MeshConfig;
use isthmus_dns::DnsOptions;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

struct Args {
    table: String,
    threads: usize,
    options: DnsOptions,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut table = None;
    let mut threads = 2;
    let mut options = DnsOptions {
        upstreams: Vec::new(),
        ..DnsOptions::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--table" => table = Some(value()?),
            "--listen" => options.listen = value()?.parse().context("--listen")?,
            "--upstream" => options
                .upstreams
                .push(value()?.parse::<SocketAddr>().context("--upstream")?),
            "--threads" => threads = value()?.parse().context("--threads")?,
            "--udp-workers" => options.udp_workers = value()?.parse().context("--udp-workers")?,
            "--cache-entries" => {
                options.cache_entries = value()?.parse().context("--cache-entries")?
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let Some(table) = table else {
        bail!("--table FILE is required");
    };
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    Ok(Args {
        table,
        threads,
        options,
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let text =
        std::fs::read_to_string(&args.table).with_context(|| format!("reading {}", args.table))?;
    let config: MeshConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", args.table))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (_tx, rx) = watch::channel(Arc::new(config));
        let dns = isthmus_dns::start(args.options, rx).await?;
        println!("ready udp={} tcp={}", dns.udp_addr(), dns.tcp_addr());
        let stdin_closed = async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = stdin_closed => {}
        }
        dns.shutdown().await;
        Ok(())
    })
}
