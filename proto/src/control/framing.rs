//! The one frame reader and the one frame writer, used by the broker and
//! the client alike: a frame is a little-endian `u32` length and that many
//! bytes of a postcard message; descriptors travel attached to a frame's
//! first byte and belong to the message [`Framed::fd_count`] says.
//!
//! Both are free of I/O: the caller passes the system call (`recvmsg` or
//! `sendmsg` through [`platform`](crate::platform), on a blocking socket or
//! inside an async runtime's readiness loop), so the same code runs in the
//! tokio broker, the blocking client and the fuzzer.

use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ClientMessage, FrameError, MAX_FRAME_LEN, ServerMessage, encode};

/// A message that may carry descriptors.
pub trait Framed: DeserializeOwned {
    /// Most descriptors a reader holds for frames still coming: past it,
    /// what came is closed at once and the stream is refused
    /// ([`FrameError::StrayDescriptors`]).
    const MAX_PENDING_FDS: usize;
    /// How many descriptors travel with this message.
    fn fd_count(&self) -> usize;
}

impl Framed for ClientMessage {
    /// Clients send none: a descriptor from one is closed as it comes, so
    /// a client cannot fill the broker's table by sending descriptors with
    /// a frame it never finishes.
    const MAX_PENDING_FDS: usize = 0;

    fn fd_count(&self) -> usize {
        0
    }
}

impl Framed for ServerMessage {
    /// The broker is trusted; a read brings a few frames' at most.
    const MAX_PENDING_FDS: usize = usize::MAX;

    fn fd_count(&self) -> usize {
        ServerMessage::fd_count(self)
    }
}

/// Bytes read per call of the system call.
const CHUNK: usize = 16 * 1024;

/// Takes frames of `T` off a byte stream, with their descriptors.
#[derive(Debug)]
pub struct FrameReader<T> {
    buf: Vec<u8>,
    /// Where the undecoded bytes start in `buf`.
    start: usize,
    fds: VecDeque<OwnedFd>,
    /// Descriptors closed for passing [`Framed::MAX_PENDING_FDS`]: the
    /// stream is refused.
    refused: Option<usize>,
    _message: PhantomData<fn() -> T>,
}

impl<T: Framed> Default for FrameReader<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Framed> FrameReader<T> {
    /// An empty reader.
    pub fn new() -> Self {
        Self { buf: Vec::with_capacity(CHUNK), start: 0, fds: VecDeque::new(), refused: None, _message: PhantomData }
    }

    /// Reads once with `read`, which fills the buffer it is given and
    /// appends any descriptors that came with the bytes. Returns the byte
    /// count (0: the peer closed the connection).
    ///
    /// # Errors
    /// Whatever `read` returns (`WouldBlock` included); nothing is lost.
    pub fn fill(&mut self, read: impl FnOnce(&mut [u8], &mut Vec<OwnedFd>) -> io::Result<usize>) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + CHUNK, 0);
        let mut fds = Vec::new();
        let result = read(&mut self.buf[old..], &mut fds);
        self.fds.extend(fds);
        if self.fds.len() > T::MAX_PENDING_FDS {
            *self.refused.get_or_insert(0) += self.fds.len();
            self.fds.clear(); // closed now, not when a frame completes
        }
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n.min(CHUNK));
        result
    }

    /// Reads once from a Unix stream socket (`recvmsg`).
    ///
    /// # Errors
    /// As [`fill`](Self::fill).
    pub fn fill_from(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        self.fill(|buf, fds| crate::platform::recv_with_fds(socket, buf, fds))
    }

    /// Feeds bytes that came without descriptors (tests, the fuzzer).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message with its descriptors; `Ok(None)` until
    /// more bytes come.
    ///
    /// # Errors
    /// [`FrameError`]: a frame over the limit or not a message, a message
    /// whose descriptors did not come, descriptors no message claims. The
    /// connection cannot be trusted after that.
    pub fn next_message(&mut self) -> Result<Option<(T, Vec<OwnedFd>)>, FrameError> {
        if let Some(n) = self.refused {
            return Err(FrameError::StrayDescriptors(n));
        }
        let pending = &self.buf[self.start..];
        let Some(prefix) = pending.first_chunk::<4>() else { return self.none_complete(pending.len()) };
        let len = u32::from_le_bytes(*prefix);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(len.into()));
        }
        let end = 4 + len as usize;
        if pending.len() < end {
            return Ok(None);
        }
        let message: T = postcard::from_bytes(&pending[4..end])?;
        self.start += end;
        let want = message.fd_count();
        if self.fds.len() < want {
            return Err(FrameError::MissingDescriptors { expected: want, got: self.fds.len() });
        }
        let fds = self.fds.drain(..want).collect();
        Ok(Some((message, fds)))
    }

    /// No complete frame is buffered: descriptors may still belong to a
    /// frame that has begun, but with no byte of one pending they belong
    /// to nothing.
    fn none_complete(&self, pending: usize) -> Result<Option<(T, Vec<OwnedFd>)>, FrameError> {
        if pending == 0 && !self.fds.is_empty() {
            return Err(FrameError::StrayDescriptors(self.fds.len()));
        }
        Ok(None)
    }
}

/// Writes one frame at a time, its descriptors with its first byte,
/// across as many partial writes as the socket takes.
#[derive(Debug, Default)]
pub struct FrameWriter {
    frame: Vec<u8>,
    sent: usize,
    fds: Vec<OwnedFd>,
}

impl FrameWriter {
    /// An idle writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `message` as the next frame, with `fds` to go along; the
    /// previous one must be done.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] if it does not fit in a frame (the writer
    /// stays idle).
    ///
    /// # Panics
    /// If the previous frame is not fully written.
    pub fn start<T: Serialize>(&mut self, message: &T, fds: Vec<OwnedFd>) -> Result<(), FrameError> {
        assert!(self.is_done(), "a frame is still being written");
        self.frame.clear();
        self.sent = 0;
        self.fds = fds;
        let encoded = encode(message, &mut self.frame);
        if encoded.is_err() {
            self.fds.clear();
        }
        encoded
    }

    /// Whether the current frame is fully written.
    pub fn is_done(&self) -> bool {
        self.sent == self.frame.len()
    }

    /// Writes what is left of the frame with `send` (bytes, and the
    /// descriptors for a first write) until it is done; retries an
    /// interrupted call.
    ///
    /// # Errors
    /// Whatever `send` returns but `Interrupted` (`WouldBlock` included:
    /// call again when the socket is writable, nothing is lost), or
    /// `WriteZero` if it took nothing.
    pub fn write_with(
        &mut self,
        mut send: impl FnMut(&[u8], &[BorrowedFd<'_>]) -> io::Result<usize>,
    ) -> io::Result<()> {
        while !self.is_done() {
            let fds: Vec<BorrowedFd<'_>> =
                if self.sent == 0 { self.fds.iter().map(AsFd::as_fd).collect() } else { Vec::new() };
            match send(&self.frame[self.sent..], &fds) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sent += n;
                    // Gone with the first byte: ours to close now.
                    self.fds.clear();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes what is left on a Unix stream socket (`sendmsg`).
    ///
    /// # Errors
    /// As [`write_with`](Self::write_with).
    pub fn write_to(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        self.write_with(|bytes, fds| crate::platform::send_with_fds(socket, bytes, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ChannelGrant, Reply, Request, SubscriberGrant};

    fn hello(id: u64) -> ClientMessage {
        ClientMessage { id, request: Request::Hello { version: 1, client_name: "x".into() } }
    }

    #[test]
    fn frames_come_whole_however_the_bytes_are_cut() {
        let mut frame = Vec::new();
        for id in 0..3 {
            encode(&hello(id), &mut frame).unwrap();
        }
        for cut in 1..frame.len() {
            let mut reader = FrameReader::<ClientMessage>::new();
            let mut got = Vec::new();
            for piece in frame.chunks(cut) {
                reader
                    .fill(|buf, _| {
                        buf[..piece.len()].copy_from_slice(piece);
                        Ok(piece.len())
                    })
                    .unwrap();
                while let Some((m, fds)) = reader.next_message().unwrap() {
                    assert!(fds.is_empty());
                    got.push(m.id);
                }
            }
            assert_eq!(got, [0, 1, 2], "cut every {cut} bytes");
        }
    }

    #[test]
    fn descriptors_go_with_their_message_and_stray_ones_are_refused() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let published = ServerMessage::Reply {
            id: 4,
            result: Ok(Reply::Published {
                publication: 1,
                stream: "s".into(),
                channels: vec![ChannelGrant { index: 0, generation: 1 }],
                takeover: false,
            }),
        };
        let mut writer = FrameWriter::new();
        let fds = vec![OwnedFd::from(a.try_clone().unwrap()), OwnedFd::from(a.try_clone().unwrap())];
        writer.start(&published, fds).unwrap();
        // Written a byte at a time: the descriptors go with the first.
        let mut calls = Vec::new();
        writer
            .write_with(|bytes, fds| {
                calls.push(fds.len());
                crate::platform::send_with_fds(a.as_fd(), &bytes[..1], fds)
            })
            .unwrap();
        assert_eq!(calls[0], 2);
        assert!(calls[1..].iter().all(|&n| n == 0));
        let mut reader = FrameReader::<ServerMessage>::new();
        let (message, fds) = loop {
            reader.fill_from(b.as_fd()).unwrap();
            if let Some(got) = reader.next_message().unwrap() {
                break got;
            }
        };
        assert_eq!((message, fds.len()), (published, 2));

        // A message announcing descriptors that did not come.
        let mut reader = FrameReader::<ServerMessage>::new();
        let mut frame = Vec::new();
        encode(&reader_bait(), &mut frame).unwrap();
        reader.push(&frame);
        assert!(matches!(reader.next_message(), Err(FrameError::MissingDescriptors { expected: 2, got: 0 })));
        // Descriptors with no frame to claim them.
        let mut reader = FrameReader::<ClientMessage>::new();
        reader
            .fill(|_, fds| {
                fds.push(OwnedFd::from(a.try_clone().unwrap()));
                Ok(0)
            })
            .unwrap();
        assert!(matches!(reader.next_message(), Err(FrameError::StrayDescriptors(1))));
    }

    /// Review finding: a client that sends descriptors with the first
    /// bytes of a frame it never finishes had them held until the frame
    /// came: a way to fill the broker's descriptor table. They are closed
    /// as they come, and the stream refused.
    #[test]
    fn a_client_s_descriptors_are_closed_as_they_come() {
        use std::io::Read;
        // The descriptor passed is one end of a pair, its only handle: the
        // other end reads the end of the stream once it is closed.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut reader = FrameReader::<ClientMessage>::new();
        let mut a = Some(a);
        reader
            .fill(|buf, fds| {
                fds.push(OwnedFd::from(a.take().unwrap()));
                buf[..2].copy_from_slice(&[9, 0]); // half a length prefix
                Ok(2)
            })
            .unwrap();
        assert_eq!(b.read(&mut [0; 1]).unwrap(), 0, "closed at once, though its frame has only begun");
        assert!(matches!(reader.next_message(), Err(FrameError::StrayDescriptors(1))));
    }

    fn reader_bait() -> ServerMessage {
        ServerMessage::Reply {
            id: 1,
            result: Ok(Reply::Subscribed(SubscriberGrant {
                subscription: 1,
                stream: "s".into(),
                index: 0,
                generation: 0,
                publisher_attached: false,
                credits: 4,
                first_seq: 0,
            })),
        }
    }

    #[test]
    fn a_writer_would_block_and_carry_on() {
        let mut writer = FrameWriter::new();
        writer.start(&hello(9), Vec::new()).unwrap();
        let mut out = Vec::new();
        let mut budget = 3;
        loop {
            let result = writer.write_with(|bytes, _| {
                if budget == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                budget -= 1;
                out.push(bytes[0]);
                Ok(1)
            });
            match result {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => budget = 3,
                Err(e) => panic!("{e}"),
            }
        }
        let mut reader = FrameReader::<ClientMessage>::new();
        reader.push(&out);
        assert_eq!(reader.next_message().unwrap().unwrap().0, hello(9));
    }
}
