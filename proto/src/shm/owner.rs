//! The owner's handle on a stream's files: [`StreamSegment`] creates and
//! maps them and runs the lock-free owner core (`core::owner`) on them.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Weak};

use super::core::mem::{ChannelMem, StreamMem};
use super::core::owner::{
    AddSubscriberError, EndProgress, OwnerCore, Reservation, StreamConfig, StreamStats, SubscriberOpError,
    SubscriberOptions, SubscriberTicket,
};
use super::core::publisher::{Chan, Inbox};
use super::layout::ChannelHeader;
use super::map::{ChannelMap, MapError, StreamMap};
use crate::platform;
use crate::primitive::AtomicU32;
use crate::shm::layout::{
    FLAG_HUGE_PAGES, FLAG_MLOCK, FLAG_PREFAULT, FLAG_TIMESTAMPS, Geometry, Layout, LayoutError, PAGE, channel_len,
};
use crate::shm::{OpenPublisherError, OpenSubscriberError, Publisher, Subscriber};

/// Why a stream could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The configuration is out of range.
    #[error("invalid stream configuration: {0}")]
    Config(#[from] LayoutError),
    /// Creating a shared-memory file failed.
    #[error("cannot create shared memory for stream {name:?}: {source}")]
    Io {
        /// Stream name.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// Mapping or locking failed.
    #[error(transparent)]
    Map(#[from] MapError),
}

/// Why a subscriber could not be admitted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdmitError {
    /// The stream refused it (credits, places, closed).
    #[error(transparent)]
    Refused(#[from] AddSubscriberError),
    /// Its channel file could not be created or mapped.
    #[error(transparent)]
    Channel(#[from] CreateError),
}

/// A channel file as its owner holds it: the descriptor to hand out and
/// the owner's mapping.
#[derive(Debug)]
struct OwnedChannel {
    fd: OwnedFd,
    map: ChannelMap,
}

impl ChannelMem for OwnedChannel {
    #[inline]
    fn header(&self) -> &ChannelHeader {
        self.map.header()
    }

    #[inline]
    fn returns(&self) -> &[AtomicU32] {
        self.map.returns()
    }
}

/// A stream's shared-memory files, held by their owner (the broker, or
/// a parent process): the data file, and a channel file per subscriber
/// from its admission until its index is free again, all anonymous
/// (`memfd`), handed to other processes as file descriptors. The memory
/// is gone once the owner and every process that mapped it have dropped
/// it: nothing is left in `/dev/shm`.
///
/// # Admitting a subscriber
/// A subscriber's channel is created when it is admitted, so the
/// publisher must get it before the subscriber is activated, or the
/// publisher would not deliver to it. [`add_subscriber`](Self::add_subscriber)
/// does it all at once for publishers of this process (opened with
/// [`open_publisher`](Self::open_publisher)); a publisher in another
/// process is handed the channel between
/// [`reserve_subscriber`](Self::reserve_subscriber) and
/// [`activate_subscriber`](Self::activate_subscriber) (through
/// [`ChannelInbox::deliver`](crate::shm::ChannelInbox::deliver) on its side).
#[derive(Debug)]
pub struct StreamSegment {
    name: String,
    data: OwnedFd,
    core: OwnerCore<StreamMap, OwnedChannel>,
    huge_pages: bool,
    /// Inboxes of publishers opened in this process.
    local: Vec<Weak<Inbox<ChannelMap>>>,
}

impl StreamSegment {
    /// Creates a stream's files and maps them.
    ///
    /// # Errors
    /// [`CreateError`] for a bad configuration or a failed system call
    /// (including `mlock` when asked for).
    pub fn create(name: &str, config: &StreamConfig) -> Result<Self, CreateError> {
        let geometry = config.geometry()?;
        let io_err = |source| CreateError::Io { name: name.to_owned(), source };
        let mut flags = 0;
        if config.mlock {
            flags |= FLAG_MLOCK;
        }
        if config.prefault {
            flags |= FLAG_PREFAULT;
        }
        if config.timestamps {
            flags |= FLAG_TIMESTAMPS;
        }
        let loans = config.loans();
        let huge = if config.huge_pages { try_huge(name, geometry, flags, loans) } else { None };
        let huge_pages = huge.is_some();
        let (data, map) = match huge {
            Some(pair) => pair,
            None => {
                let layout = Layout::new(geometry, PAGE)?;
                let fd = platform::create_shared_file(&format!("memsock:{name}"), layout.total_len as u64, false)
                    .map_err(io_err)?;
                let map = StreamMap::create(fd.as_fd(), layout, flags, loans)?;
                (fd, map)
            }
        };
        tracing::debug!(name, ?geometry, huge_pages, "stream created");
        Ok(Self { name: name.to_owned(), data, core: OwnerCore::sparse(map), huge_pages, local: Vec::new() })
    }

    /// Creates a stream's files with every channel file up front, one per
    /// subscriber index serving each subscriber that index gets: for an
    /// owner that hands the descriptors to processes it starts and has no
    /// way to hand a publisher a channel later. (The broker creates
    /// channels as subscribers come: [`create`](Self::create).)
    ///
    /// # Errors
    /// As [`create`](Self::create).
    pub fn create_with_all_channels(name: &str, config: &StreamConfig) -> Result<Self, CreateError> {
        let mut this = Self::create(name, config)?;
        for index in 0..this.geometry().max_subscribers {
            let chan = this.create_channel(index)?;
            this.core.install_any(index, chan);
        }
        Ok(this)
    }

    /// The stream's name (for diagnostics; the files are anonymous).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream's geometry.
    pub fn geometry(&self) -> Geometry {
        self.core.stream().layout().geometry
    }

    /// Whether the pool got huge pages.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The data file, read-write: for the publisher only.
    pub fn data_fd(&self) -> BorrowedFd<'_> {
        self.data.as_fd()
    }

    /// A new read-only descriptor of the data file: what a subscriber
    /// gets, so that it cannot map the pool writable.
    ///
    /// # Errors
    /// If `/proc/self/fd` cannot be opened.
    pub fn read_only_data_fd(&self) -> io::Result<OwnedFd> {
        platform::reopen_read_only(self.data.as_fd())
    }

    /// Every channel file there is — of subscribers attached, being
    /// admitted or not yet reclaimed — with its index and generation (0
    /// for one serving every generation): what a publisher gets when it
    /// attaches.
    pub fn channel_fds(&self) -> Vec<(u32, u64, BorrowedFd<'_>)> {
        let chans = self.core.channels().iter().enumerate();
        chans.filter_map(|(s, c)| c.as_ref().map(|c| (s as u32, c.generation.unwrap_or(0), c.map.fd.as_fd()))).collect()
    }

    /// Subscriber `index`'s channel file, if it has one: for that
    /// subscriber only.
    pub fn channel_fd(&self, index: u32) -> Option<BorrowedFd<'_>> {
        let chan = self.core.channels().get(index as usize)?.as_ref()?;
        Some(chan.map.fd.as_fd())
    }

    /// Channel files open (one per subscriber admitted, until its index is
    /// reclaimed).
    pub fn channel_count(&self) -> usize {
        self.core.channels().iter().flatten().count()
    }

    /// Admits a subscriber of process `pid` if the pool can honour its
    /// credits, creating its channel, and hands the channel to the
    /// publishers of this process: for a stream whose publisher (if any)
    /// is in this process.
    ///
    /// # Errors
    /// [`AdmitError`]: credits refused or out of range, no free index,
    /// stream closed, or the channel file could not be created.
    pub fn add_subscriber(&mut self, opts: &SubscriberOptions, pid: u32) -> Result<SubscriberTicket, AdmitError> {
        let r = self.reserve_subscriber(opts, pid)?;
        Ok(self.activate_subscriber(r.index)?)
    }

    /// First step of admitting a subscriber of process `pid` (see the
    /// type's documentation): holds an index, creates its channel file
    /// ([`channel_fd`](Self::channel_fd)) and hands it to the publishers
    /// of this process. Then hand it to the publisher attached elsewhere,
    /// and [`activate_subscriber`](Self::activate_subscriber) or
    /// [`give_up_subscriber`](Self::give_up_subscriber).
    ///
    /// # Errors
    /// As [`add_subscriber`](Self::add_subscriber).
    pub fn reserve_subscriber(&mut self, opts: &SubscriberOptions, pid: u32) -> Result<Reservation, AdmitError> {
        let r = self.core.reserve(opts, pid)?;
        if self.core.has_any(r.index) {
            return Ok(r); // created up front
        }
        match self.create_channel(r.index) {
            Ok(chan) => {
                self.hand_to_local(r, &chan);
                self.core.install(r.index, chan);
                Ok(r)
            }
            Err(e) => {
                self.core.give_up(r.index);
                Err(e.into())
            }
        }
    }

    fn create_channel(&self, index: u32) -> Result<OwnedChannel, CreateError> {
        let g = self.geometry();
        let name = format!("memsock:{}#{}", self.name, index);
        let fd = platform::create_shared_file(&name, channel_len(g.queue_capacity) as u64, false)
            .map_err(|source| CreateError::Io { name: self.name.clone(), source })?;
        let flags = self.core.stream().flags() & !FLAG_HUGE_PAGES;
        let map = ChannelMap::create(fd.as_fd(), index, g.queue_capacity, flags)?;
        Ok(OwnedChannel { fd, map })
    }

    /// Hands a new channel to the publishers opened in this process.
    fn hand_to_local(&mut self, r: Reservation, chan: &OwnedChannel) {
        self.local.retain(|inbox| inbox.strong_count() > 0);
        let g = self.geometry();
        let flags = self.core.stream().flags();
        for inbox in self.local.iter().filter_map(Weak::upgrade) {
            match ChannelMap::open_for_publisher(chan.fd.as_fd(), g.queue_capacity, flags) {
                Ok(map) => inbox.push(r.index, Chan { generation: Some(r.generation), map }),
                Err(e) => tracing::warn!(stream = self.name, error = %e, "cannot map a channel for a local publisher"),
            }
        }
    }

    /// Last step of admitting a subscriber: it is attached, and the
    /// publisher delivers to it from its next send.
    ///
    /// # Errors
    /// [`AddSubscriberError::Closed`] if the stream closed since the
    /// reservation (which is given up).
    ///
    /// # Panics
    /// If `index` is not reserved.
    pub fn activate_subscriber(&mut self, index: u32) -> Result<SubscriberTicket, AddSubscriberError> {
        self.core.activate(index)
    }

    /// Gives up a reservation and its channel file.
    pub fn give_up_subscriber(&mut self, index: u32) {
        self.core.give_up(index);
    }

    /// Closes the channel files of indices free again. Returns how many.
    pub fn sweep_channels(&mut self) -> usize {
        self.core.sweep()
    }

    /// Changes a live subscriber's credits.
    ///
    /// # Errors
    /// [`SubscriberOpError`] if it is not attached or the pool cannot
    /// honour the new credits.
    pub fn set_credits(&mut self, index: u32, credits: u32) -> Result<(), SubscriberOpError> {
        self.core.set_credits(index, credits)
    }

    /// Detaches subscriber `index`, whether it left or died: its queued
    /// and borrowed slots go back to the pool (at once if no publisher
    /// is attached, else at the publisher's next loan or send).
    ///
    /// Call it once the subscriber has gone — its process ended or it
    /// dropped its [`Subscriber`] — as the broker does when a lease ends:
    /// samples a live subscriber still holds would be reused under it.
    /// The index is not handed to a new subscriber while the process
    /// given at [`add_subscriber`](Self::add_subscriber) still runs.
    ///
    /// # Errors
    /// [`SubscriberOpError::NotAttached`].
    pub fn remove_subscriber(&mut self, index: u32) -> Result<(), SubscriberOpError> {
        self.core.remove(index)?;
        self.core.sweep();
        Ok(())
    }

    /// Detaches subscriber `index` whose own process gave it up (it
    /// dropped its [`Subscriber`] and every sample, and said so): as
    /// [`remove_subscriber`](Self::remove_subscriber), but the index
    /// may serve another process at once, since this one no longer
    /// maps its channel.
    ///
    /// # Errors
    /// [`SubscriberOpError::NotAttached`].
    pub fn release_subscriber(&mut self, index: u32) -> Result<(), SubscriberOpError> {
        self.core.release(index)?;
        self.core.sweep();
        Ok(())
    }

    /// Tells the stream its publisher is gone: takes the writer role
    /// back, finishes what the publisher left half done, and lets
    /// another publisher attach and continue. Call it once the
    /// publisher's process has exited (or let go): one still alive
    /// gets `Replaced` at its next loan or send, but a sample it is
    /// writing at that moment may still reach subscribers. Where only
    /// the connection tells whether it lives, that is the weaker
    /// guarantee you get.
    pub fn publisher_gone(&mut self) {
        self.core.publisher_gone();
        self.core.sweep();
    }

    /// The publisher let go of the stream itself (dropped its
    /// [`Publisher`]; its process may live on): wakes whoever waits on it,
    /// reclaims, and ends a close it left open. Takes the writer role from
    /// nobody.
    pub fn publisher_released(&mut self) {
        self.core.publisher_released();
        self.core.sweep();
    }

    /// Finishes reclaiming detached subscribers if no publisher is
    /// attached to do it, and closes the channel files of indices free
    /// again. Returns whether it could reclaim.
    pub fn reclaim(&mut self) -> bool {
        let ran = self.core.reclaim_detached();
        self.core.sweep();
        ran
    }

    /// Ends a close its publisher has not acknowledged while its process
    /// still lives — the close grace is over — without taking the
    /// writer role from it: subscribers get `Closed` after every frame
    /// it sent, its next send fails with `Closed`. A first call marks
    /// the stream and asks for a [`system_barrier`](crate::shm::system_barrier);
    /// run it outside any lock and call again with its proof. A
    /// publisher caught mid-delivery makes it answer
    /// [`EndProgress::Delivering`]: try again a little later.
    pub fn end_for_subscribers(&mut self, barrier: Option<crate::shm::BarrierPassed>) -> EndProgress {
        self.core.end_for_subscribers(barrier)
    }

    /// The pid of the publisher holding the stream's writer role, as it
    /// gave it when it attached (in its own pid namespace), alive or dead;
    /// `None` if none holds it.
    pub fn publisher_attached(&self) -> Option<u32> {
        self.core.publisher_attached()
    }

    /// Closes the stream for good. The publisher's next loan or send
    /// fails with `Closed`; subscribers get `Closed` once they have
    /// received every frame it sent. An attached publisher acknowledges
    /// the close on its next loan, send or detach (or when the owner
    /// declares it gone); until then its subscribers just see no frames.
    pub fn close(&mut self) {
        self.core.close();
    }

    /// Counters and queue states, read from shared memory.
    pub fn stats(&self) -> StreamStats {
        self.core.stats(platform::now_ns())
    }

    /// Attaches a publisher in this process.
    ///
    /// # Errors
    /// As [`Publisher::open`].
    pub fn open_publisher(&mut self) -> Result<Publisher, OpenPublisherError> {
        let publisher = Publisher::open(self.data_fd(), &self.channel_fds())?;
        self.local.retain(|inbox| inbox.strong_count() > 0);
        self.local.push(Arc::downgrade(&publisher.channel_inbox().inner));
        Ok(publisher)
    }

    /// Admits a subscriber and opens it in this process.
    ///
    /// # Errors
    /// As [`add_subscriber`](Self::add_subscriber) and [`Subscriber::open`].
    pub fn open_subscriber(&mut self, opts: &SubscriberOptions) -> Result<Subscriber, OpenLocalError> {
        let ticket = self.add_subscriber(opts, platform::current_pid())?;
        let data = self.read_only_data_fd().map_err(|e| OpenSubscriberError::Map(MapError::Io(e)))?;
        let channel = self.channel_fd(ticket.index).expect("an attached subscriber has its channel");
        Ok(Subscriber::open(data.as_fd(), channel, ticket)?)
    }
}

/// Why [`StreamSegment::open_subscriber`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenLocalError {
    /// Admission failed.
    #[error(transparent)]
    Add(#[from] AdmitError),
    /// Opening failed.
    #[error(transparent)]
    Open(#[from] OpenSubscriberError),
}

/// Creates and maps a huge-page data file, or says why not in the log.
fn try_huge(name: &str, geometry: Geometry, flags: u32, loans: u32) -> Option<(OwnedFd, StreamMap)> {
    let attempt = || -> Result<(OwnedFd, StreamMap), Box<dyn std::error::Error>> {
        let layout = Layout::new(geometry, platform::HUGE_PAGE_SIZE)?;
        let fd = platform::create_shared_file(&format!("memsock:{name}"), layout.total_len as u64, true)?;
        let map = StreamMap::create(fd.as_fd(), layout, flags | FLAG_HUGE_PAGES, loans)?;
        Ok((fd, map))
    };
    match attempt() {
        Ok(pair) => Some(pair),
        Err(e) => {
            tracing::info!(name, error = %e, "huge pages unavailable, using ordinary pages");
            None
        }
    }
}
