//! Spin-then-park waiting on a condition another process makes true, and
//! the waker's half.
//!
//! The protocol is the classic "announce, fence, re-check" pair (Dekker):
//!
//! ```text
//! waiter                              waker
//!   word = 1                            make condition true
//!   fence(SeqCst)  ─── pairs with ───   fence(SeqCst)
//!   if condition: done                  if word != 0: word = 0; futex_wake(word)
//!   futex_wait(word, 1)
//! ```
//!
//! With both fences sequentially consistent, either the waker sees the
//! announcement or the waiter sees the condition, so a wake-up is never
//! lost; and `futex_wait` returns at once if the waker cleared the word in
//! between. The waker pays the fence and one load per event, and the system
//! call only while somebody sleeps.

use std::time::{Duration, Instant};

use crate::primitive::{self, AtomicU32, Ordering, fence};

/// How to wait: spin for a while, then (optionally) sleep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    /// How long to poll before parking (or forever, if `park` is false).
    pub spin: Duration,
    /// Whether to sleep in the kernel after spinning.
    pub park: bool,
}

/// Waits until `ready()` returns true or `deadline` passes; returns whether
/// it became ready. `word` is the futex word the waker checks.
pub(crate) fn wait_until(
    word: &AtomicU32,
    backoff: Backoff,
    deadline: Option<Instant>,
    mut ready: impl FnMut() -> bool,
) -> bool {
    if ready() {
        return true;
    }
    if !backoff.spin.is_zero() || !backoff.park {
        let spin_end = if backoff.park { Some(Instant::now() + backoff.spin) } else { deadline };
        let spin_end = match (spin_end, deadline) {
            (Some(s), Some(d)) => Some(s.min(d)),
            (s, _) => s,
        };
        loop {
            // Poll in bursts so reading the clock stays off the common path.
            for _ in 0..64 {
                primitive::spin_hint();
                if ready() {
                    return true;
                }
            }
            if spin_end.is_some_and(|end| Instant::now() >= end) {
                break;
            }
        }
        if !backoff.park {
            return false;
        }
    }
    loop {
        word.store(1, Ordering::Relaxed);
        // SeqCst fence pairs with the one in `wake_if_waiting`'s caller
        // (`fence_before_wake`): see the module documentation.
        fence(Ordering::SeqCst);
        if ready() {
            word.store(0, Ordering::Relaxed);
            return true;
        }
        let timeout = match deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => {
                    word.store(0, Ordering::Relaxed);
                    return false;
                }
            },
        };
        primitive::park(word, 1, timeout);
    }
}

/// The fence a waker executes after making conditions true and before
/// checking any waiter's word with [`wake_if_waiting`]; pairs with the fence
/// in [`wait_until`].
#[inline]
pub(crate) fn fence_before_wake() {
    fence(Ordering::SeqCst);
}

/// Wakes the waiter announced on `word`, if any. Call after
/// [`fence_before_wake`].
#[inline]
pub(crate) fn wake_if_waiting(word: &AtomicU32) {
    if word.load(Ordering::Relaxed) != 0 {
        wake(word);
    }
}

/// Wakes the waiter on `word` unconditionally (for rare events such as a
/// detach or close, where the cost does not matter).
#[cold]
pub(crate) fn wake(word: &AtomicU32) {
    fence_before_wake();
    word.store(0, Ordering::Relaxed);
    primitive::unpark(word);
}
