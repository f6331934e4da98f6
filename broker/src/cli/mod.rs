//! The `memsock` command line's subcommands, one module each (the daemon's
//! own modules, `server` and `registry`, are in the library).

pub mod demo;
pub mod publish;
pub mod record;
pub mod replay;
pub mod stats;
