//! The synchronisation primitives the shared-memory algorithms are written
//! against: atomics, fences, a spin hint and park/unpark on a 32-bit word.
//!
//! Normally these are std's atomics and the futex of [`crate::platform`].
//! Under `--cfg loom` they are loom's model-checked atomics, and park/unpark
//! is modelled with a mutex and condition variable: waiting re-checks the word
//! under the lock exactly as the kernel re-checks a futex word under its hash
//! bucket lock, so a lost wake-up shows up as a deadlock in the model.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use std::time::Duration;

/// Tells the CPU (or the model checker) that we are busy-waiting.
#[inline(always)]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Lets another thread run.
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Sleeps while `word` holds `expected`, for at most `timeout`.
///
/// May return early or spuriously: callers re-check their condition.
#[cfg(not(any(loom, miri)))]
#[inline]
pub(crate) fn park(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    crate::platform::futex_wait(word, expected, timeout);
}

/// Wakes every thread parked on `word` (there is at most one by protocol).
#[cfg(not(any(loom, miri)))]
#[inline]
pub(crate) fn unpark(word: &AtomicU32) {
    crate::platform::futex_wake(word);
}

/// Under miri (which runs the heap-backed tests for undefined behaviour,
/// not for lost wake-ups: loom does that) a park is a spurious wake-up,
/// which every caller handles, and there is no futex to wake.
#[cfg(all(miri, not(loom)))]
pub(crate) fn park(_word: &AtomicU32, _expected: u32, _timeout: Option<Duration>) {
    std::thread::yield_now();
}

/// See [`park`] under miri.
#[cfg(all(miri, not(loom)))]
pub(crate) fn unpark(_word: &AtomicU32) {}

#[cfg(loom)]
mod model {
    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        /// One lock and condition variable stand for the kernel's futex table.
        pub(super) static ref FUTEX: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
    }
}

/// Model of `futex_wait`: the timeout is ignored so that a lost wake-up is a
/// deadlock the model checker reports instead of a delay it cannot see.
#[cfg(loom)]
pub(crate) fn park(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) {
    let (lock, cond) = &*model::FUTEX;
    let guard = lock.lock().unwrap();
    if word.load(Ordering::SeqCst) == expected {
        drop(cond.wait(guard).unwrap());
    }
}

/// Model of `futex_wake`.
#[cfg(loom)]
pub(crate) fn unpark(_word: &AtomicU32) {
    let (lock, cond) = &*model::FUTEX;
    let _guard = lock.lock().unwrap();
    cond.notify_all();
}

/// The light side of an asymmetric fence: orders this thread's earlier
/// stores before its later loads against a [`system_barrier`] elsewhere.
/// Free at run time (a compiler fence); a full fence in the model checker,
/// which cannot see the heavy side's effect on other threads.
#[inline(always)]
pub(crate) fn light_barrier() {
    #[cfg(any(loom, miri))]
    fence(Ordering::SeqCst);
    #[cfg(not(any(loom, miri)))]
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// The heavy side of an asymmetric fence within this process: after it,
/// every other thread of the process that passes a [`light_barrier`] after
/// its stores either had them visible to us by now, or sees our stores
/// made before this call. Microseconds (`membarrier` private expedited,
/// registered on first use); a system-wide barrier where that is refused.
pub(crate) fn process_barrier() {
    #[cfg(any(loom, miri))]
    fence(Ordering::SeqCst);
    #[cfg(not(any(loom, miri)))]
    crate::platform::process_wide_barrier();
}

/// Barriers begun so far in this process (for [`BarrierPassed`]).
static BARRIERS_BEGUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Proof that a [`system_barrier`] ran: every thread that was running
/// anywhere has since passed a full memory barrier.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BarrierPassed(u64);

impl BarrierPassed {
    /// Whether this barrier began after [`barrier_mark`] returned `mark`.
    pub(crate) fn follows(self, mark: u64) -> bool {
        self.0 > mark
    }
}

/// Taken right after the stores a later [`system_barrier`] must publish.
pub(crate) fn barrier_mark() -> u64 {
    BARRIERS_BEGUN.load(std::sync::atomic::Ordering::SeqCst)
}

/// The heavy side of an asymmetric fence, paired with a light one (a compiler fence):
/// after it, a thread anywhere that passes a light barrier after its
/// stores either had them visible to us by now, or sees our stores made
/// before this call. Takes milliseconds (a system call): call it outside
/// any lock, and only off the hot path.
pub fn system_barrier() -> BarrierPassed {
    let n = BARRIERS_BEGUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    // (Neither loom nor miri can run `membarrier`: a full fence stands in,
    // as the light side is a full fence under loom too.)
    #[cfg(any(loom, miri))]
    fence(Ordering::SeqCst);
    #[cfg(not(any(loom, miri)))]
    crate::platform::system_wide_barrier();
    BarrierPassed(n)
}
