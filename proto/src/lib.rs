//! memsock's protocol crate: the one definition of the shared-memory layout
//! of a stream and of its lock-free algorithms ([`shm`]), and the operating
//! system calls they need ([`platform`]), and the control protocol between
//! clients and the broker (`control`).
//!
//! Broker and clients build on this crate; nothing else defines offsets or
//! memory orderings. Users normally depend on the `memsock` client crate,
//! which re-exports what they need.

#![deny(missing_docs)]
// A loom build compiles the algorithms without the mapped-file front end.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

#[cfg(not(loom))]
pub mod control;
#[cfg(not(loom))]
pub mod pattern;
pub mod platform;
mod primitive;
pub mod shm;
