//! The memsock broker as a library: [`server::serve`] runs it. The
//! `memsock` binary (`src/main.rs`) wraps it with the command line; the
//! benchmark runner starts it as a child process through here. Beside the
//! daemon, [`metrics`] is the Prometheus exporter (a client of it).

pub mod limits;
pub mod metrics;
mod registry;
pub mod server;
