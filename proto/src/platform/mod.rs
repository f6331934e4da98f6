//! The operating-system calls memsock needs, behind one small interface:
//! anonymous shared-memory files, read-only re-opening, sealing, futex
//! wait/wake and the monotonic clock.
//!
//! Only Linux is implemented. Another OS gets its own file here with the
//! same functions (a Windows port would use file mappings and
//! `WaitOnAddress`); nothing outside this module calls the OS directly.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub use linux::*;

#[cfg(not(target_os = "linux"))]
compile_error!("memsock supports Linux only for now: add a platform module for this OS");
