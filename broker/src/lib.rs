//! The memsock broker as a library: [`server::serve`] runs it. The
//! `memsock` binary (`src/main.rs`) wraps it with the command line; the
//! benchmark runner starts it as a child process through here.

pub mod limits;
mod registry;
pub mod server;
