//! A value one thread owns and works on, which another thread of the same
//! process may ask to have a short piece of work (`serve`) done on while
//! the owner is elsewhere — without the owner paying more than two plain
//! stores and two loads per use: an asymmetric Dekker protocol.
//!
//! The publisher's core is such a value: its thread sends frames; a
//! subscriber that joins a stream with history must be handed the history
//! by the writer, and an idle publisher's thread may not call the core for
//! a long while. The client's connection thread then serves it
//! (`PubCore::serve`: a look at the subscriber table) on the owner's behalf.
//!
//! - The owner, around each use: `in_call = 1`, a compiler fence, a load of
//!   `service`; after it, `in_call = 0`, a compiler fence, a load of
//!   `service`.
//! - A requester (one at a time: they take a mutex): `service` IDLE → WANTED, then [`process_barrier`] (every
//!   thread of the process passes a full fence), then a load of `in_call`.
//!
//! The barrier makes the two sides' store-then-load pairs a Dekker pair:
//! either the requester sees the owner in a call (and leaves the work to
//! the owner, who sees WANTED as the call ends), or the owner sees WANTED
//! as it enters (and does the work itself first). Who does it is decided by
//! one compare-and-swap of `service` out of WANTED (to IDLE by the owner,
//! to RUNNING by the requester); an owner that finds it RUNNING waits for
//! the requester to finish (microseconds, and only then).
//!
//! Only memory of this process is involved: a `kill -9` takes both threads.

#[cfg(loom)]
use loom::cell::UnsafeCell;
#[cfg(loom)]
use loom::sync::Mutex;
#[cfg(not(loom))]
use std::cell::UnsafeCell;
#[cfg(not(loom))]
use std::sync::Mutex;

use crate::primitive::AtomicU32;
use crate::primitive::Ordering::{Acquire, Relaxed, Release};
use crate::primitive::{light_barrier, process_barrier, spin_hint, yield_now};

/// No work asked for.
const IDLE: u32 = 0;
/// A requester asked for work to be done.
const WANTED: u32 = 1;
/// A requester is doing it.
const RUNNING: u32 = 2;
/// The owner has let go: no more requests are served.
const CLOSED: u32 = 3;

/// Whether a use begun by [`Served::begin`] is tracked (not in a child
/// forked since), for [`Served::end`].
#[must_use]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entered(bool);

/// See the module docs.
pub(crate) struct Served<T> {
    /// `None` once the owner closed it and took the value back.
    value: UnsafeCell<Option<T>>,
    /// 1 while the owner uses the value.
    in_call: AtomicU32,
    /// `IDLE`, `WANTED`, `RUNNING` or `CLOSED`.
    service: AtomicU32,
    /// One requester at a time: a requester's look at `in_call` holds for
    /// its own WANTED only (another's, set after the owner took the first,
    /// may find the owner in a call).
    requesting: Mutex<()>,
    /// When it was made: in a child forked since, only the forking thread
    /// survived, and a request the fork copied half-way is the parent's.
    #[cfg(not(loom))]
    forks: crate::platform::ForkStamp,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Served<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("service", &self.service.load(Relaxed)).finish_non_exhaustive()
    }
}

// SAFETY: the value is reached by one thread at a time — the owner inside
// `enter`, or a requester holding RUNNING (see the module docs) — so a
// `Send` value may be used from either; nothing hands out `&T` across them.
unsafe impl<T: Send> Sync for Served<T> {}
// SAFETY: as above; the value moves with the cell.
unsafe impl<T: Send> Send for Served<T> {}

impl<T> Served<T> {
    pub(crate) fn new(value: T) -> Self {
        Self {
            value: UnsafeCell::new(Some(value)),
            in_call: AtomicU32::new(0),
            service: AtomicU32::new(IDLE),
            requesting: Mutex::new(()),
            #[cfg(not(loom))]
            forks: crate::platform::ForkStamp::now(),
        }
    }

    /// The owner's use of the value: runs `serve` first if a request is
    /// pending, then `f`, then `serve` again if a request came meanwhile.
    ///
    /// # Safety
    /// Only one thread, the owner, ever calls `enter`, `begin`, `end` or
    /// `close` (not concurrently with itself: `&mut` of the owner's handle
    /// says so).
    #[cfg(any(test, loom))]
    #[inline(always)]
    pub(crate) unsafe fn enter<R>(&self, serve: impl Fn(&mut T), f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: the owner, by the contract; `end` follows with the same token.
        let entered = unsafe { self.begin(&serve) };
        // SAFETY: between `begin` and `end`: the value is ours alone.
        let r = unsafe { self.with_value(f) };
        // SAFETY: as above.
        unsafe { self.end(entered, &serve) };
        r
    }

    /// [`enter`](Self::enter) in two halves, for an owner that reaches the
    /// value itself in between (see [`get_mut`](Self::get_mut)): a use
    /// begins here, serving a pending request first.
    ///
    /// # Safety
    /// As [`enter`](Self::enter), and [`end`](Self::end) follows with the
    /// token before any other `begin`. Between the two the owner has the
    /// value alone. (Should it unwind in between and never `end`, requests
    /// are left to the owner's next use: later, not lost.)
    #[inline(always)]
    pub(crate) unsafe fn begin(&self, serve: impl Fn(&mut T)) -> Entered {
        #[cfg(not(loom))]
        if self.forks.forked() {
            // No requester survived the fork; a WANTED or RUNNING copied
            // from the parent is not ours to serve or wait for.
            return Entered(false);
        }
        self.in_call.store(1, Relaxed);
        // Pairs with the requester's `process_barrier`: either it sees
        // `in_call` set, or we see its WANTED below.
        light_barrier();
        if self.claim() {
            // SAFETY: the owner, in a call, with no requester RUNNING
            // (`claim` waited one out).
            unsafe { self.serve_cold(serve) };
        }
        Entered(true)
    }

    /// The end of a use begun by [`begin`](Self::begin): serves a request
    /// that came meanwhile.
    ///
    /// # Safety
    /// As [`begin`](Self::begin), with its token.
    #[inline(always)]
    pub(crate) unsafe fn end(&self, entered: Entered, serve: impl Fn(&mut T)) {
        if !entered.0 {
            return;
        }
        // Release pairs with the requester's Acquire load of `in_call`:
        // what we did to the value is visible to one that serves next.
        self.in_call.store(0, Release);
        // Pairs with the requester's `process_barrier`, as in `begin`.
        light_barrier();
        if self.service.load(Relaxed) == WANTED {
            // SAFETY: the owner, by the contract.
            unsafe { self.serve_late(serve) };
        }
    }

    /// A request found as a use begins, served by the owner.
    ///
    /// # Safety
    /// The owner, in a call, with no requester RUNNING.
    #[cold]
    #[inline(never)]
    unsafe fn serve_cold(&self, serve: impl Fn(&mut T)) {
        // SAFETY: by the contract.
        unsafe { self.with_value(serve) };
    }

    /// A request found as a use ends: the owner serves it unless a
    /// requester took it (the CAS decides).
    ///
    /// # Safety
    /// The owner, between uses.
    #[cold]
    #[inline(never)]
    unsafe fn serve_late(&self, serve: impl Fn(&mut T)) {
        // Acquire pairs with nothing new (we hold the value); the CAS
        // decides between us and the requester.
        if self.service.compare_exchange(WANTED, RUNNING, Acquire, Relaxed).is_ok() {
            // SAFETY: RUNNING is ours: no requester touches the value.
            unsafe { self.with_value(serve) };
            // Release pairs with the owner's Acquire load in `claim` (its
            // next use), and with the next requester's CAS from IDLE
            // followed by the SeqCst fence that begins `process_barrier`
            // (an acquire fence): whoever serves next sees this serve.
            self.service.store(IDLE, Release);
        }
    }

    /// On entry: takes a pending request for the owner (true), or waits
    /// out a requester that is running one.
    #[inline(always)]
    fn claim(&self) -> bool {
        let mut spins = 0;
        loop {
            // Acquire pairs with the requester's Release store of IDLE after
            // serving: what it did to the value is visible to us.
            match self.service.load(Acquire) {
                WANTED => {
                    if self.service.compare_exchange(WANTED, IDLE, Acquire, Acquire).is_ok() {
                        return true;
                    }
                }
                RUNNING => wait_out(&mut spins),
                _ => return false,
            }
        }
    }

    /// The owner lets go for good: waits out a requester that is serving,
    /// refuses every later request, and takes the value back (to drop it
    /// on its own thread, whoever still holds the cell).
    ///
    /// # Safety
    /// As [`enter`](Self::enter); once.
    pub(crate) unsafe fn close(&self) -> Option<T> {
        #[cfg(not(loom))]
        if self.forks.forked() {
            return None;
        }
        self.in_call.store(1, Relaxed);
        light_barrier();
        let mut spins = 0;
        loop {
            // Acquire as in `claim`.
            match self.service.load(Acquire) {
                RUNNING => wait_out(&mut spins),
                now => {
                    if self.service.compare_exchange(now, CLOSED, Acquire, Relaxed).is_ok() {
                        // SAFETY: CLOSED: no requester touches the value again.
                        return unsafe { self.with_slot(Option::take) };
                    }
                }
            }
        }
    }

    /// The value, for its owner while no requester can serve it: between
    /// [`begin`](Self::begin) and [`end`](Self::end), or in a child forked
    /// since (no requester survived).
    ///
    /// # Safety
    /// As [`enter`](Self::enter), and one of those two; the reference is
    /// gone by `end`.
    #[cfg(not(loom))]
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get_mut(&self) -> &mut T {
        // SAFETY: by the contract.
        unsafe { &mut *self.value.get() }.as_mut().expect("the owner uses it before it closes")
    }

    /// Runs `f` on the value.
    ///
    /// # Safety
    /// The caller holds the value: the owner in a call with no requester
    /// RUNNING, or RUNNING itself.
    #[inline(always)]
    unsafe fn with_value<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: by the contract.
        unsafe { self.with_slot(|slot| f(slot.as_mut().expect("used before it is closed"))) }
    }

    /// Runs `f` on the value's place (see [`with_value`](Self::with_value)).
    #[inline(always)]
    unsafe fn with_slot<R>(&self, f: impl FnOnce(&mut Option<T>) -> R) -> R {
        #[cfg(loom)]
        // SAFETY: by the contract (loom checks it).
        return self.value.with_mut(|p| f(unsafe { &mut *p }));
        #[cfg(not(loom))]
        // SAFETY: by the contract.
        f(unsafe { &mut *self.value.get() })
    }

    /// From any thread: has `serve` done on the value — here and now if the
    /// owner is not using it, else by the owner as its use ends (or as it
    /// enters, if it is just entering). Returns whether it ran here. A
    /// request while another is being served waits for it, then asks
    /// again (the other may have looked before what this one is about).
    pub(crate) fn request(&self, serve: impl FnOnce(&mut T)) -> bool {
        #[cfg(not(loom))]
        if self.forks.forked() {
            return false;
        }
        // Held to the end: between our `in_call` look and our CAS out of
        // WANTED, no other requester may set a WANTED of its own (the
        // owner may be in a call by then, having taken ours).
        let _one = self.requesting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut spins = 0;
        loop {
            // Release, so that whoever takes WANTED (Acquire)
            // sees what prompted the request; a pending WANTED is re-written
            // (an RMW, Release) for the same reason.
            match self.service.compare_exchange(IDLE, WANTED, Release, Relaxed) {
                Ok(_) => break,
                Err(WANTED) => {
                    if self.service.compare_exchange(WANTED, WANTED, Release, Relaxed).is_ok() {
                        return false;
                    }
                }
                Err(CLOSED) => return false,
                Err(_) => wait_out(&mut spins),
            }
        }
        // Every thread of the process passes a full fence: the owner's
        // `in_call` store is visible to the load below, or the owner sees
        // WANTED after its light barrier.
        process_barrier();
        // Acquire pairs with the owner's Release store of `in_call = 0`.
        if self.in_call.load(Acquire) == 0 && self.service.compare_exchange(WANTED, RUNNING, Acquire, Relaxed).is_ok() {
            // SAFETY: RUNNING is ours, and the owner is not in a call (it
            // waits in `claim` if it enters now).
            unsafe { self.with_value(serve) };
            // Release pairs with the owner's Acquire load in `claim`.
            self.service.store(IDLE, Release);
            return true;
        }
        false
    }
}

/// One pause while a requester serves (RUNNING): a spin, for the
/// microseconds a serve takes; a yield once that is long past (the
/// requester was preempted mid-serve: the CPU is better given to it).
#[inline]
fn wait_out(spins: &mut u32) {
    if *spins < 1000 {
        *spins += 1;
        spin_hint();
    } else {
        yield_now();
    }
}

#[cfg(all(test, not(loom), not(miri)))]
mod fork_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// (Found by the review: it failed before `forks`.) A child forked while another thread of the parent is in the
    /// middle of a request inherits WANTED (the child's owner then runs the
    /// parent's serve) or RUNNING (the child's owner spins forever).
    #[test]
    fn a_child_forked_during_a_request_neither_serves_nor_hangs() {
        let served = Arc::new(Served::new(0u64));
        let stop = Arc::new(AtomicBool::new(false));
        let r = {
            let (served, stop) = (served.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    served.request(|v| *v += 1);
                }
            })
        };
        let (mut ran, mut hung, mut clean) = (0, 0, 0);
        for _ in 0..300 {
            // SAFETY: the child only uses atomics, alarm and _exit.
            match unsafe { libc::fork() } {
                // SAFETY: in the child: the cell's atomics, alarm and _exit only.
                0 => unsafe {
                    libc::alarm(1);
                    let in_child = std::cell::Cell::new(false);
                    served.enter(|_| in_child.set(true), |_| ());
                    libc::_exit(i32::from(in_child.get()));
                },
                pid => {
                    let mut status = 0;
                    // SAFETY: our child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                    if libc::WIFSIGNALED(status) {
                        hung += 1;
                    } else if libc::WEXITSTATUS(status) == 1 {
                        ran += 1;
                    } else {
                        clean += 1;
                    }
                }
            }
        }
        stop.store(true, Relaxed);
        r.join().unwrap();
        assert_eq!((ran, hung), (0, 0), "of 300 children: {ran} ran the parent's serve, {hung} hung, {clean} clean");
    }
}
