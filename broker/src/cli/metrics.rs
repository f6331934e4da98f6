//! `memsock metrics`: the exporter (`memsock_broker::metrics`) on an
//! address, in a process of its own.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use memsock_broker::metrics::{Exporter, LabelOptions, serve};

/// `memsock metrics`.
#[derive(Debug, clap::Args)]
pub struct MetricsArgs {
    /// Where to serve `/metrics` (port 0: any free port; the address is
    /// printed).
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Label each series with its process's pid (one series per process
    /// over time: unbounded cardinality).
    #[arg(long)]
    pid_labels: bool,
}

/// Serves `/metrics` until SIGINT or SIGTERM.
pub fn run(socket: &Path, args: &MetricsArgs) -> Result<()> {
    let exporter = Exporter::new(socket, LabelOptions { pids: args.pid_labels });
    // One line on stdout, for whoever started us with port 0.
    serve(exporter, args.listen, |addr| println!("serving http://{addr}/metrics"))?;
    Ok(())
}
