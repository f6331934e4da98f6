//! Spin-then-park waiting on a condition another process makes true, and
//! the waker's half.
//!
//! The protocol is the classic "announce, fence, re-check" pair (Dekker),
//! on a futex word that holds a wake count above a "somebody may sleep"
//! flag (bit 0):
//!
//! ```text
//! waiter                                 waker
//!   seen = word.fetch_or(1) | 1            make condition true
//!   fence(SeqCst)  ─── pairs with ───      fence(SeqCst)
//!   if condition: done                     if word & 1: word.fetch_add(1); futex_wake(word)
//!   futex_wait(word, seen)
//! ```
//!
//! With both fences sequentially consistent, either the waker sees the
//! flag or the waiter sees the condition, so a wake-up is never lost. A
//! waker's `fetch_add(1)` clears the flag and counts a wake in one step, so
//! the word never returns to a value a waiter announced: `futex_wait`
//! returns at once if any waker came after the announcement. That holds
//! for several waiters on one word (a subscriber's receive and its watcher,
//! two async receives): no waiter ever clears or rewrites it, so none can
//! erase the wake another is owed, and every waker wakes them all. A waiter
//! that leaves without sleeping leaves the flag set; the next waker then
//! pays one system call that finds nobody.
//!
//! The waker pays the fence and one load per event, and the system call
//! only while the flag is set.

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

/// What a waiter's condition says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poll {
    /// The condition holds.
    Ready,
    /// Not yet: a waker will tell.
    NotYet,
    /// Not yet, but it will hold shortly without a waker telling (a writer
    /// is part-way through a step that ends it): sleep briefly, not until
    /// woken.
    Soon,
}

/// How long a waiter told [`Poll::Soon`] sleeps before looking again, at
/// first and at most.
const SOON_FIRST: Duration = Duration::from_micros(20);
const SOON_MAX: Duration = Duration::from_millis(1);

/// Waits until `ready()` returns true or `deadline` passes; returns whether
/// it became ready. `word` is the futex word the waker checks.
pub(crate) fn wait_until(
    word: &AtomicU32,
    backoff: Backoff,
    deadline: Option<Instant>,
    mut ready: impl FnMut() -> bool,
) -> bool {
    wait_for(word, backoff, deadline, || if ready() { Poll::Ready } else { Poll::NotYet })
}

/// [`wait_until`] for a condition that can also say [`Poll::Soon`].
pub(crate) fn wait_for(
    word: &AtomicU32,
    backoff: Backoff,
    deadline: Option<Instant>,
    mut poll: impl FnMut() -> Poll,
) -> bool {
    let mut ready = || poll() == Poll::Ready;
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
    let mut soon = SOON_FIRST;
    loop {
        // Announce: the flag, and the count as of now (what a waker changes).
        let seen = word.fetch_or(1, Ordering::Relaxed) | 1;
        // SeqCst fence pairs with the one in `wake_if_waiting`'s caller
        // (`fence_before_wake`): see the module documentation.
        fence(Ordering::SeqCst);
        let now = poll();
        if now == Poll::Ready {
            return true; // the flag stays set: see the module documentation
        }
        let mut timeout = match deadline {
            None => None,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return false,
            },
        };
        if now == Poll::Soon {
            if cfg!(loom) {
                // The model checker ignores timeouts: there it yields instead.
                primitive::yield_now();
                continue;
            }
            timeout = Some(timeout.map_or(soon, |t| t.min(soon)));
            soon = (soon * 2).min(SOON_MAX);
        }
        primitive::park(word, seen, timeout);
    }
}

/// The fence a waker executes after making conditions true and before
/// checking any waiter's word with [`wake_if_waiting`]; pairs with the fence
/// in [`wait_until`].
#[inline]
pub(crate) fn fence_before_wake() {
    fence(Ordering::SeqCst);
}

/// Wakes the waiters announced on `word`, if any. Call after
/// [`fence_before_wake`].
#[inline]
pub(crate) fn wake_if_waiting(word: &AtomicU32) {
    if is_waiting(word) {
        wake_announced(word);
    }
}

/// Whether a waiter has announced itself on `word` since the last wake.
/// Call after [`fence_before_wake`].
#[inline]
pub(crate) fn is_waiting(word: &AtomicU32) -> bool {
    word.load(Ordering::Relaxed) & 1 != 0
}

/// Wakes the waiters on `word`, whose flag was seen set: clears it and
/// counts the wake in one step (should another waker have cleared it
/// meanwhile, the flag is set again, which costs one spare wake later).
#[cold]
pub(crate) fn wake_announced(word: &AtomicU32) {
    word.fetch_add(1, Ordering::Relaxed);
    primitive::unpark(word);
}

/// Wakes any waiter on `word` unconditionally (for rare events such as a
/// detach or close, where the cost does not matter): counts a wake without
/// touching the flag, so whoever sleeps wakes and re-checks.
#[cold]
pub(crate) fn wake(word: &AtomicU32) {
    fence_before_wake();
    word.fetch_add(2, Ordering::Relaxed);
    primitive::unpark(word);
}
