//! The owner's handle on a stream's files: [`StreamSegment`] creates and
//! maps them and runs the lock-free owner core (`core::owner`) on them.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::core::mem::StreamMem;
use super::core::owner::{
    AddSubscriberError, EndProgress, OwnerCore, StreamConfig, StreamStats, SubscriberOpError, SubscriberOptions,
    SubscriberTicket,
};
use super::map::{ChannelMap, MapError, StreamMap};
use crate::platform;
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

/// A stream's shared-memory files, held by their owner (the broker, or
/// a parent process): the data file and one channel file per subscriber
/// index, all anonymous (`memfd`), handed to other processes as file
/// descriptors. The memory is gone once the owner and every process
/// that mapped it have dropped it: nothing is left in `/dev/shm`.
#[derive(Debug)]
pub struct StreamSegment {
    name: String,
    data: OwnedFd,
    channels: Vec<OwnedFd>,
    core: OwnerCore<StreamMap, ChannelMap>,
    huge_pages: bool,
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
        let len = channel_len(geometry.queue_capacity) as u64;
        let mut channels = Vec::with_capacity(geometry.max_subscribers as usize);
        let mut maps = Vec::with_capacity(geometry.max_subscribers as usize);
        for index in 0..geometry.max_subscribers {
            let fd = platform::create_shared_file(&format!("memsock:{name}#{index}"), len, false).map_err(io_err)?;
            maps.push(ChannelMap::create(fd.as_fd(), index, geometry.queue_capacity, flags & !FLAG_HUGE_PAGES)?);
            channels.push(fd);
        }
        tracing::debug!(name, ?geometry, huge_pages, "stream created");
        Ok(Self { name: name.to_owned(), data, channels, core: OwnerCore::new(map, maps), huge_pages })
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

    /// Every channel file, in index order: for the publisher.
    pub fn channel_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.channels.iter().map(AsFd::as_fd).collect()
    }

    /// Subscriber `index`'s channel file: for that subscriber only.
    ///
    /// # Panics
    /// If `index` is not below the subscriber capacity.
    pub fn channel_fd(&self, index: u32) -> BorrowedFd<'_> {
        self.channels[index as usize].as_fd()
    }

    /// Admits a subscriber of process `pid` if the pool can honour its
    /// credits.
    ///
    /// # Errors
    /// [`AddSubscriberError`]: credits refused or out of range, no free
    /// index, stream closed.
    pub fn add_subscriber(
        &mut self,
        opts: &SubscriberOptions,
        pid: u32,
    ) -> Result<SubscriberTicket, AddSubscriberError> {
        self.core.add(opts, pid)
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
        self.core.remove(index)
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
        self.core.release(index)
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
    }

    /// The publisher let go of the stream itself (dropped its
    /// [`Publisher`]; its process may live on): wakes whoever waits on it,
    /// reclaims, and ends a close it left open. Takes the writer role from
    /// nobody.
    pub fn publisher_released(&mut self) {
        self.core.publisher_released();
    }

    /// Finishes reclaiming detached subscribers if no publisher is
    /// attached to do it. Returns whether it could.
    pub fn reclaim(&self) -> bool {
        self.core.reclaim_detached()
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
    pub fn open_publisher(&self) -> Result<Publisher, OpenPublisherError> {
        Publisher::open(self.data_fd(), &self.channel_fds())
    }

    /// Admits a subscriber and opens it in this process.
    ///
    /// # Errors
    /// As [`add_subscriber`](Self::add_subscriber) and [`Subscriber::open`].
    pub fn open_subscriber(&mut self, opts: &SubscriberOptions) -> Result<Subscriber, OpenLocalError> {
        let ticket = self.add_subscriber(opts, platform::current_pid())?;
        let data = self.read_only_data_fd().map_err(|e| OpenSubscriberError::Map(MapError::Io(e)))?;
        Ok(Subscriber::open(data.as_fd(), self.channel_fd(ticket.index), ticket)?)
    }
}

/// Why [`StreamSegment::open_subscriber`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenLocalError {
    /// Admission failed.
    #[error(transparent)]
    Add(#[from] AddSubscriberError),
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
