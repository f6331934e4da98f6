//! The lock-free core: the publisher, subscriber and owner algorithms over
//! any memory that implements the layout ([`mem`]'s traits) — shared
//! mappings in production, heap allocations under unit tests, proptest and
//! the loom model checker, which therefore run the very code that runs in
//! production. No handle, mapping or system call lives here (but the
//! futex behind [`wait`] and the barrier behind `primitive`).
//!
//! - `publisher`: loans, delivery, overflow policies, taking slots back,
//!   crash recovery (`PubCore`).
//! - `subscriber`: taking frames, returning slots, waiting (`SubCore`).
//! - `owner`: admission by credits, detach and reclamation, close,
//!   statistics (`OwnerCore`).
//! - `wait`: spin-then-park and its wake-up protocol.
//! - `crash`: the points where a killed writer may stop, and the test hook
//!   that stops one there (`crash_tests`, `recovery_tests`).
//! - `writer`: the writer role as a value (`Writer`), and the holder-mask
//!   bits only a writer changes.
//! - `mem`: the memory traits, and the heap memory of the tests.

//! # One vocabulary for a slot's way back
//! - The writer *pushes* a frame onto a subscriber's delivery ring (its
//!   count is `pushed`); the subscriber *takes* it, moving the ring's
//!   `queue_head`.
//! - The subscriber *returns* the slot: writes it to its return ring and
//!   moves `returned` (`SubCore::return_slot`; slots released on other
//!   threads wait on a board until the next *flush*).
//! - The writer *collects* returns (reads the return ring up to
//!   `returned`, recording `collected`; `collect_returns`, or
//!   `replay_returns` when taking over) and *takes back* each slot:
//!   clears that subscriber's holder bit (`take_back`). It takes slots back
//!   the same way when it *evicts* a queued frame (`KeepLatest`) and when it
//!   *reclaims* a detached subscriber's slots (`take_back_all`).
//! - A slot no subscriber holds is *free*; the publisher *loans* free
//!   slots and *abandons* a loan it does not send.

pub(crate) mod crash;
pub(crate) mod mem;
pub(crate) mod owner;
pub(crate) mod publisher;
pub(crate) mod served;
pub(crate) mod subscriber;
pub(crate) mod wait;
pub(crate) mod writer;

#[cfg(all(test, not(loom)))]
mod crash_tests;
#[cfg(all(test, not(loom)))]
mod history_crash_tests;
#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod recovery_tests;
#[cfg(all(test, not(loom)))]
mod serve_tests;
