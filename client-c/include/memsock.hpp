/*
 * memsock.hpp: a header-only C++17 (and C++20) wrapper over memsock.h.
 *
 * Nothing to build or link but libmemsock itself (-lmemsock). Written by
 * hand over the generated C header; every type is a thin owner of a C
 * handle and every call an inline call into the C library.
 *
 *     auto client = memsock::Client::connect(path);       // or connect()
 *     memsock::StreamConfig config;                        // the defaults
 *     config.slot_size = 256;
 *     auto pub = client.publisher("ticks", config);
 *
 *     memsock::SubscribeOptions options;
 *     options.policy = memsock::Policy::Lossless;
 *     auto sub = client.subscriber("ticks", options);
 *
 *     memsock::Loan loan = pub.loan();                      // write in place
 *     std::memcpy(loan.data(), "hello", 5);
 *     loan.send(5);
 *
 *     for (memsock::Sample s : sub) {                       // until closed
 *         use(s.bytes());                                   // or interrupted
 *     }                                                     // s released here
 *
 * Errors: every failure throws `memsock::Error` (or a class derived from
 * it, by status), which carries the `memsock_status` and the library's
 * message (memsock_last_error()). What is routine is not an exception:
 * a timeout, a full lossless subscriber, nothing queued, the publisher
 * leaving or coming back, the end of a range-for.
 *
 * Receiving, three ways (pick one per call site, they mix freely):
 *
 *   - Frames only: `recv()`, `recv(timeout)`, `try_recv()`. Publisher
 *     news (MEMSOCK_PUBLISHER_GONE / _BACK) is skipped: the stream stays
 *     and frames of a new publisher follow; `publisher_generation()` shows
 *     that it happened. `recv(timeout)` and `try_recv()` give
 *     std::nullopt when there is no frame in time; the end of the stream
 *     (`StreamClosed`) and an interrupt (`Interrupted`) are thrown,
 *     since a frame-returning call has nothing else to return.
 *
 *   - Everything, in order, never thrown: `next()`, `next(timeout)`,
 *     `try_next()` return an `Event` whose `kind()` is Frame (with its
 *     `sample()`), Timeout, Empty, PublisherGone, PublisherBack, Closed
 *     or Interrupted. Only failures (disconnection, credits exhausted,
 *     a corrupt stream, misuse) throw.
 *
 *   - A range-for: `for (memsock::Sample s : sub)` receives frames,
 *     waiting as long as it takes, skipping publisher news as `recv()`
 *     does, and ends (without an exception) when the stream is closed
 *     (`sub.closed()` is then true) or the subscriber is interrupted.
 *     Failures throw out of the loop. Each receive happens when the loop
 *     tests for its end, so a loop that stops after N frames (`break`, or
 *     `std::views::take(N)` in C++20) never waits for frame N+1. The
 *     sample of an iteration is released when the iteration ends, unless
 *     the body moved it elsewhere (which keeps one credit per sample kept).
 *
 * Lifetimes (not checked: breaking them is undefined behaviour, as in C):
 *   - Publishers and subscribers are destroyed before their Client.
 *   - A Loan is used and destroyed before its Publisher; a Sample before
 *     its Subscriber (a Sample keeps the subscriber's C handle, which
 *     stays the same when the Subscriber object is moved).
 *   - One Loan per Publisher at a time: the C library has one current
 *     loan per publisher, and a second `loan()` while one is live gives
 *     the same slot (destroying either Loan then discards it).
 *
 * Thread-safety (as memsock.h):
 *   - Client: may be shared between threads; every (const) member
 *     function is safe from any thread.
 *   - Publisher, and its Loan: one thread at a time; may move between
 *     threads.
 *   - Subscriber, and its Samples and Events: one thread at a time; may
 *     move to another thread only with no Sample out (release samples on
 *     the thread that received them). The exception: `interrupt()` may be
 *     called from any thread while the Subscriber is live, and
 *     `memsock_subscriber_interrupt(sub.native())` from a signal handler.
 *
 * The per-message path (loan, send, recv, next, iteration, release) is
 * inline, allocates nothing and throws only on failure.
 *
 * Byte views: `memsock::bytes` and `memsock::mutable_bytes` are
 * std::span<const std::byte> and std::span<std::byte> where the standard
 * library has <span> (C++20; MEMSOCK_HPP_STD_SPAN is then defined to 1),
 * else a small view with the same data(), size(), size_bytes(), empty(),
 * begin(), end(), operator[], first(), last() and subspan().
 */

#ifndef MEMSOCK_HPP
#define MEMSOCK_HPP

#include "memsock.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#if defined(__has_include)
#if __has_include(<version>)
#include <version>
#endif
#if __cplusplus >= 202002L && __has_include(<span>)
#include <span>
#endif
#endif

#if defined(__cpp_lib_span) && __cpp_lib_span >= 202002L
#define MEMSOCK_HPP_STD_SPAN 1
#endif

#if defined(__GNUC__)
#define MEMSOCK_HPP_COLD_ [[gnu::cold, gnu::noinline]]
#else
#define MEMSOCK_HPP_COLD_
#endif

namespace memsock {

// ---------------------------------------------------------------------------
// Byte views.

#if defined(MEMSOCK_HPP_STD_SPAN)

/// Read-only bytes: a received frame, or bytes to send.
using bytes = std::span<const std::byte>;
/// Writable bytes: a loaned slot.
using mutable_bytes = std::span<std::byte>;

#else

namespace detail {

/// The part of std::span<T> this library needs, for C++17.
template <class T>
class byte_view {
public:
    using element_type = T;
    using value_type = std::remove_cv_t<T>;
    using size_type = std::size_t;
    using difference_type = std::ptrdiff_t;
    using pointer = T*;
    using reference = T&;
    using iterator = T*;

    constexpr byte_view() noexcept = default;
    constexpr byte_view(T* data, std::size_t count) noexcept : data_(data), size_(count) {}
    /// Writable bytes are readable bytes.
    template <class U, std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>, int> = 0>
    constexpr byte_view(const byte_view<U>& other) noexcept : data_(other.data()), size_(other.size()) {}

    constexpr T* data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr std::size_t size_bytes() const noexcept { return size_; }
    [[nodiscard]] constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T* begin() const noexcept { return data_; }
    constexpr T* end() const noexcept { return data_ + size_; }
    /// Unchecked, as std::span's.
    constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
    constexpr byte_view first(std::size_t count) const noexcept { return {data_, count}; }
    constexpr byte_view last(std::size_t count) const noexcept { return {data_ + (size_ - count), count}; }
    constexpr byte_view subspan(std::size_t offset, std::size_t count = static_cast<std::size_t>(-1)) const noexcept {
        return {data_ + offset, count == static_cast<std::size_t>(-1) ? size_ - offset : count};
    }

private:
    T* data_ = nullptr;
    std::size_t size_ = 0;
};

}  // namespace detail

/// Read-only bytes: a received frame, or bytes to send.
using bytes = detail::byte_view<const std::byte>;
/// Writable bytes: a loaned slot.
using mutable_bytes = detail::byte_view<std::byte>;

#endif

/// `count` bytes at `data`, as a read-only view.
inline bytes as_bytes(const void* data, std::size_t count) noexcept {
    return bytes(static_cast<const std::byte*>(data), count);
}

/// The bytes of a string, as a read-only view.
inline bytes as_bytes(std::string_view s) noexcept { return as_bytes(s.data(), s.size()); }

/// A timeout that never ends (any negative timeout means the same).
inline constexpr std::chrono::nanoseconds forever{-1};

/// The library's version, "MAJOR.MINOR.PATCH".
inline const char* version() noexcept { return memsock_version(); }

/// A short fixed description of a status.
inline const char* status_str(memsock_status status) noexcept { return memsock_status_str(static_cast<int>(status)); }

// ---------------------------------------------------------------------------
// Errors.

/// A failure: its status and the library's message about it.
class Error : public std::runtime_error {
public:
    Error(memsock_status st, const std::string& message) : std::runtime_error(message), status_(st) {}
    Error(memsock_status st, const char* message) : std::runtime_error(message), status_(st) {}

    /// What went wrong, as the C API says it (never MEMSOCK_OK).
    memsock_status status() const noexcept { return status_; }

private:
    memsock_status status_;
};

/// MEMSOCK_BROKER_UNREACHABLE: no broker answers at the socket (or it
/// admits no one of this user).
class BrokerUnreachable : public Error {
public:
    using Error::Error;
};

/// MEMSOCK_DISCONNECTED: the connection to the broker is gone.
class Disconnected : public Error {
public:
    using Error::Error;
};

/// MEMSOCK_NO_SUCH_STREAM: no stream of that name.
class NoSuchStream : public Error {
public:
    using Error::Error;
};

/// MEMSOCK_REFUSED: the broker refused the request (the message says why).
class Refused : public Error {
public:
    using Error::Error;
};

/// MEMSOCK_INVALID_ARGUMENT: a bad argument, or a call on an empty
/// (moved-from, default-constructed, sent or released) object.
class InvalidArgument : public Error {
public:
    using Error::Error;
};

/// MEMSOCK_CLOSED: the stream was closed (thrown by a publisher's send and
/// by the frame-only receives: `recv()`, `recv(timeout)`, `try_recv()`).
class StreamClosed : public Error {
public:
    using Error::Error;
};

/// MEMSOCK_INTERRUPTED: `Subscriber::interrupt()` was called (thrown by the
/// frame-only receives).
class Interrupted : public Error {
public:
    using Error::Error;
};

namespace detail {

/// Throws the exception for `st` (not MEMSOCK_OK), with the message the
/// library left for this thread.
[[noreturn]] MEMSOCK_HPP_COLD_ inline void throw_status(memsock_status st) {
    const char* last = memsock_last_error();
    std::string message = last != nullptr && *last != '\0' ? last : memsock_status_str(static_cast<int>(st));
    switch (st) {
    case MEMSOCK_BROKER_UNREACHABLE:
        throw BrokerUnreachable(st, message);
    case MEMSOCK_DISCONNECTED:
        throw Disconnected(st, message);
    case MEMSOCK_NO_SUCH_STREAM:
        throw NoSuchStream(st, message);
    case MEMSOCK_REFUSED:
        throw Refused(st, message);
    case MEMSOCK_INVALID_ARGUMENT:
        throw InvalidArgument(st, message);
    case MEMSOCK_CLOSED:
        throw StreamClosed(st, message);
    case MEMSOCK_INTERRUPTED:
        throw Interrupted(st, message);
    default:
        throw Error(st, message);
    }
}

/// Throws unless `st` is MEMSOCK_OK.
inline void check(memsock_status st) {
    if (st != MEMSOCK_OK) {
        throw_status(st);
    }
}

/// A misuse caught on this side (the C library was not called, so there
/// is no last error to report).
[[noreturn]] MEMSOCK_HPP_COLD_ inline void throw_invalid(const char* message) {
    throw InvalidArgument(MEMSOCK_INVALID_ARGUMENT, message);
}

/// A timeout for C: nanoseconds, negative for none.
inline std::int64_t timeout_ns(std::chrono::nanoseconds timeout) noexcept {
    return static_cast<std::int64_t>(timeout.count());
}

inline bool is_publisher_news(memsock_status st) noexcept {
    return st == MEMSOCK_PUBLISHER_GONE || st == MEMSOCK_PUBLISHER_BACK;
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Configuration.

/// `SubscribeOptions::policy`: what a full subscriber does.
enum class Policy : std::uint32_t {
    /// Loses the newest frame.
    DropNewest = MEMSOCK_DROP_NEWEST,
    /// Loses its oldest queued frame.
    KeepLatest = MEMSOCK_KEEP_LATEST,
    /// Makes the publisher wait (or `try_send` fail): loses nothing.
    Lossless = MEMSOCK_LOSSLESS,
};

/// `SubscribeOptions::wait`: how a blocking receive waits.
enum class Wait : std::uint32_t {
    /// Sleeps in the kernel (futex) until a frame comes.
    Park = MEMSOCK_WAIT_PARK,
    /// Spins `spin_us` microseconds, then sleeps.
    SpinThenPark = MEMSOCK_WAIT_SPIN_THEN_PARK,
    /// Spins, never sleeps (a core per subscriber, the least latency).
    Spin = MEMSOCK_WAIT_SPIN,
};

/// How to create a stream: constructed with the library's defaults
/// (memsock_stream_config_init: 4,096-byte slots, 16 of them, up to 32
/// subscribers, pre-faulted, time-stamped); change what you need.
struct StreamConfig {
    /// Bytes per slot: the largest frame.
    std::uint32_t slot_size;
    /// Slots in the pool.
    std::uint32_t slot_count;
    /// Most subscribers at once.
    std::uint32_t max_subscribers;
    /// Lock the segment in memory (mlock) in every process that maps it.
    bool mlock;
    /// Back the pool with 2 MiB huge pages if the system has them.
    bool huge_pages;
    /// Fault every page in when mapping.
    bool prefault;
    /// Stamp every frame with its send time.
    bool timestamps;
    /// Frames kept for subscribers that come later (0: none, 1: the last
    /// value); the stream then stays after its publisher, until closed or
    /// history_idle_ms without publisher or subscriber (0: until closed).
    std::uint32_t history;
    std::uint64_t history_idle_ms;

    StreamConfig() noexcept : StreamConfig(defaults()) {}

    /// As the C API takes it.
    memsock_stream_config to_c() const noexcept {
        memsock_stream_config c = defaults();
        c.slot_size = slot_size;
        c.slot_count = slot_count;
        c.max_subscribers = max_subscribers;
        c.mlock = mlock;
        c.huge_pages = huge_pages;
        c.prefault = prefault;
        c.timestamps = timestamps;
        c.history = history;
        c.history_idle_ms = history_idle_ms;
        return c;
    }

private:
    static memsock_stream_config defaults() noexcept {
        memsock_stream_config c{};
        (void)memsock_stream_config_init(&c);
        return c;
    }
    explicit StreamConfig(const memsock_stream_config& c) noexcept
        : slot_size(c.slot_size),
          slot_count(c.slot_count),
          max_subscribers(c.max_subscribers),
          mlock(c.mlock),
          huge_pages(c.huge_pages),
          prefault(c.prefault),
          timestamps(c.timestamps),
          history(c.history),
          history_idle_ms(c.history_idle_ms) {}
};

/// How to subscribe: constructed with the library's defaults
/// (memsock_subscribe_options_init: 4 credits, drop-newest, park, do not
/// wait for the stream); change what you need.
struct SubscribeOptions {
    /// Most frames the subscriber may hold at once, queued plus borrowed
    /// (Samples alive).
    std::uint32_t credits;
    /// What a full subscriber does.
    Policy policy;
    /// How a blocking receive waits.
    Wait wait;
    /// Spin time for Wait::SpinThenPark, in microseconds.
    std::uint32_t spin_us;
    /// If the stream does not exist yet, wait for it (else NoSuchStream).
    bool wait_for_stream;
    /// Of a stream that keeps a history, receive at most this many of its
    /// latest frames first (UINT32_MAX, the default: all; 0: none).
    std::uint32_t history;

    SubscribeOptions() noexcept : SubscribeOptions(defaults()) {}

    /// As the C API takes it.
    memsock_subscribe_options to_c() const noexcept {
        memsock_subscribe_options c = defaults();
        c.credits = credits;
        c.policy = static_cast<std::uint32_t>(policy);
        c.wait = static_cast<std::uint32_t>(wait);
        c.spin_us = spin_us;
        c.wait_for_stream = wait_for_stream;
        c.history = history;
        return c;
    }

private:
    static memsock_subscribe_options defaults() noexcept {
        memsock_subscribe_options c{};
        (void)memsock_subscribe_options_init(&c);
        return c;
    }
    explicit SubscribeOptions(const memsock_subscribe_options& c) noexcept
        : credits(c.credits),
          policy(static_cast<Policy>(c.policy)),
          wait(static_cast<Wait>(c.wait)),
          spin_us(c.spin_us),
          wait_for_stream(c.wait_for_stream),
          history(c.history) {}
};

// ---------------------------------------------------------------------------
// Publishing.

/// A slot loaned to write the next frame in place. Write into `bytes()`
/// (or `data()`, `size()` bytes), then `send(len)` its first `len` bytes.
/// Destroyed unsent, the loan is discarded. Movable, not copyable; empty
/// once sent, discarded or moved from.
///
/// A send that finds no room in time (`try_send`, a timed `send`) returns
/// false and keeps the loan, to send again or discard. A send that throws
/// leaves the Loan empty (the library dropped the loan: StreamClosed,
/// ...), except for a `len` above `size()`: InvalidArgument, loan kept.
///
/// Thread-safety: as its Publisher; must not outlive it.
class Loan {
public:
    /// An empty loan.
    Loan() noexcept = default;
    Loan(Loan&& other) noexcept
        : publisher_(std::exchange(other.publisher_, nullptr)),
          data_(std::exchange(other.data_, nullptr)),
          capacity_(std::exchange(other.capacity_, 0)) {}
    Loan& operator=(Loan&& other) noexcept {
        if (this != &other) {
            discard();
            publisher_ = std::exchange(other.publisher_, nullptr);
            data_ = std::exchange(other.data_, nullptr);
            capacity_ = std::exchange(other.capacity_, 0);
        }
        return *this;
    }
    Loan(const Loan&) = delete;
    Loan& operator=(const Loan&) = delete;
    ~Loan() { discard(); }

    /// Whether it holds a loan (not sent, discarded or moved from).
    bool valid() const noexcept { return data_ != nullptr; }
    explicit operator bool() const noexcept { return valid(); }

    /// The slot's bytes (empty if no loan).
    mutable_bytes bytes() const noexcept { return mutable_bytes(data_, capacity_); }
    std::byte* data() const noexcept { return data_; }
    /// The slot's size: the largest frame (0 if no loan).
    std::size_t size() const noexcept { return capacity_; }
    std::size_t capacity() const noexcept { return capacity_; }
    /// Unchecked.
    std::byte& operator[](std::size_t i) const noexcept { return data_[i]; }

    /// Sends the first `len` bytes, waiting as long as a lossless
    /// subscriber takes to make room.
    void send(std::size_t len) {
        if (!send_status(len, -1)) {
            // Cannot happen without a timeout; reported rather than lost.
            detail::throw_status(MEMSOCK_TIMEOUT);
        }
    }

    /// Sends the first `len` bytes, waiting at most `timeout` for room
    /// (negative: forever; zero: not at all). False if there was none in
    /// time: the loan stays, to send again or discard.
    [[nodiscard]] bool send(std::size_t len, std::chrono::nanoseconds timeout) {
        return send_status(len, detail::timeout_ns(timeout));
    }

    /// Sends the first `len` bytes if every lossless subscriber has room
    /// now; false (the loan stays) if not.
    [[nodiscard]] bool try_send(std::size_t len) { return send_status(len, 0); }

    /// Gives the slot back unsent (nothing if empty).
    void discard() noexcept {
        if (data_ != nullptr) {
            (void)memsock_publisher_discard(publisher_);
            data_ = nullptr;
            capacity_ = 0;
        }
    }

    /// The publisher's C handle (NULL if empty).
    memsock_publisher* native() const noexcept { return data_ != nullptr ? publisher_ : nullptr; }

private:
    friend class Publisher;
    Loan(memsock_publisher* publisher, void* data, std::size_t capacity) noexcept
        : publisher_(publisher), data_(static_cast<std::byte*>(data)), capacity_(capacity) {}

    /// True if sent, false if no room in time; throws on failure.
    bool send_status(std::size_t len, std::int64_t timeout) {
        if (data_ == nullptr) {
            detail::throw_invalid("memsock::Loan: no loan to send (sent, discarded or moved from)");
        }
        if (len > capacity_) {
            // Checked here so that every failure of the C call below means
            // the loan is gone.
            detail::throw_invalid("memsock::Loan::send: len is more than the slot's size");
        }
        const memsock_status st = timeout == 0 ? memsock_publisher_send(publisher_, len)
                                               : memsock_publisher_send_timeout(publisher_, len, timeout);
        if (st == MEMSOCK_OK) {
            data_ = nullptr;
            capacity_ = 0;
            return true;
        }
        if (st == MEMSOCK_WOULD_BLOCK || st == MEMSOCK_TIMEOUT) {
            return false;
        }
        data_ = nullptr;
        capacity_ = 0;
        detail::throw_status(st);
    }

    memsock_publisher* publisher_ = nullptr;
    std::byte* data_ = nullptr;
    std::size_t capacity_ = 0;
};

/// The publishing end of a stream. Destroying it stops publishing (the
/// stream stays, for another publisher; subscribers see PublisherGone).
/// Movable, not copyable.
///
/// Thread-safety: one thread at a time; may move between threads. Destroy
/// it (and its Loan) before its Client.
class Publisher {
public:
    /// An empty publisher (every call on it throws InvalidArgument).
    Publisher() noexcept = default;
    /// Takes ownership of a handle from memsock_publisher_create.
    explicit Publisher(memsock_publisher* owned) noexcept : handle_(owned) {}
    Publisher(Publisher&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Publisher& operator=(Publisher&& other) noexcept {
        if (this != &other) {
            memsock_publisher_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    Publisher(const Publisher&) = delete;
    Publisher& operator=(const Publisher&) = delete;
    ~Publisher() { memsock_publisher_free(handle_); }

    bool valid() const noexcept { return handle_ != nullptr; }
    explicit operator bool() const noexcept { return valid(); }
    memsock_publisher* native() const noexcept { return handle_; }

    /// Whether the broker that handed out the stream is gone (sending goes
    /// on meanwhile).
    bool broker_gone() const noexcept { return memsock_publisher_broker_gone(handle_) != 0; }

    /// Loans a slot to write the next frame in place (one Loan at a time:
    /// see the top of this header).
    Loan loan() {
        void* data = nullptr;
        std::size_t capacity = 0;
        detail::check(memsock_publisher_loan(handle_, &data, &capacity));
        return Loan(handle_, data, capacity);
    }

    /// Copies `count` bytes at `data` into a slot and sends them, waiting as
    /// long as a lossless subscriber takes to make room.
    void send_copy(const void* data, std::size_t count) {
        if (!send_copy(data, count, forever)) {
            detail::throw_status(MEMSOCK_TIMEOUT);
        }
    }
    /// As above, waiting at most `timeout` for room (negative: forever;
    /// zero: not at all). False if there was none in time.
    [[nodiscard]] bool send_copy(const void* data, std::size_t count, std::chrono::nanoseconds timeout) {
        const memsock_status st = memsock_publisher_send_copy(handle_, data, count, detail::timeout_ns(timeout));
        if (st == MEMSOCK_OK) {
            return true;
        }
        if (st == MEMSOCK_WOULD_BLOCK || st == MEMSOCK_TIMEOUT) {
            return false;
        }
        detail::throw_status(st);
    }
    void send_copy(bytes frame) { send_copy(frame.data(), frame.size()); }
    [[nodiscard]] bool send_copy(bytes frame, std::chrono::nanoseconds timeout) {
        return send_copy(frame.data(), frame.size(), timeout);
    }
    void send_copy(std::string_view frame) { send_copy(frame.data(), frame.size()); }
    [[nodiscard]] bool send_copy(std::string_view frame, std::chrono::nanoseconds timeout) {
        return send_copy(frame.data(), frame.size(), timeout);
    }

private:
    memsock_publisher* handle_ = nullptr;
};

// ---------------------------------------------------------------------------
// Subscribing.

/// A received frame: read-only bytes in the stream's shared memory, held
/// (one credit of its subscriber) until released, by `release()` or the
/// destructor. Movable (a moved-from Sample holds nothing and releases
/// nothing), not copyable.
///
/// Thread-safety: as its Subscriber, on whose thread it is released; it
/// must not outlive the Subscriber.
class Sample {
public:
    /// An empty sample.
    Sample() noexcept = default;
    Sample(Sample&& other) noexcept : subscriber_(other.subscriber_), sample_(other.sample_) { other.forget(); }
    Sample& operator=(Sample&& other) noexcept {
        if (this != &other) {
            release();
            subscriber_ = other.subscriber_;
            sample_ = other.sample_;
            other.forget();
        }
        return *this;
    }
    Sample(const Sample&) = delete;
    Sample& operator=(const Sample&) = delete;
    ~Sample() { release(); }

    /// Whether it holds a frame (not released or moved from).
    bool valid() const noexcept { return sample_.data != nullptr; }
    explicit operator bool() const noexcept { return valid(); }

    /// The frame's bytes (empty once released).
    memsock::bytes bytes() const noexcept { return memsock::bytes(data(), sample_.len); }
    const std::byte* data() const noexcept { return static_cast<const std::byte*>(sample_.data); }
    std::size_t size() const noexcept { return sample_.len; }
    /// The frame's bytes as characters.
    std::string_view str() const noexcept { return std::string_view(static_cast<const char*>(sample_.data), sample_.len); }
    /// Its sequence number in the stream: a jump shows frames lost.
    std::uint64_t seq() const noexcept { return sample_.seq; }
    /// When it was sent (monotonic clock, ns; 0 if the stream has no
    /// timestamps).
    std::uint64_t timestamp_ns() const noexcept { return sample_.timestamp_ns; }
    /// Whether it comes from the stream's history: sent before this
    /// subscriber came, received first.
    bool history() const noexcept { return (sample_.flags & MEMSOCK_SAMPLE_HISTORY) != 0; }

    /// Gives the frame's slot back now (nothing if empty). `seq()` and
    /// `timestamp_ns()` stay; the bytes are gone.
    void release() noexcept {
        if (sample_.data != nullptr) {
            (void)memsock_sample_release(subscriber_, &sample_);
            forget();
        }
    }

    /// The C sample (for memsock_sample_release with `native_subscriber()`).
    const memsock_sample& native() const noexcept { return sample_; }
    const memsock_subscriber* native_subscriber() const noexcept { return subscriber_; }

private:
    friend class Subscriber;
    friend class Event;
    Sample(const memsock_subscriber* subscriber, const memsock_sample& sample) noexcept
        : subscriber_(subscriber), sample_(sample) {}
    void forget() noexcept {
        sample_.data = nullptr;
        sample_.len = 0;
    }

    const memsock_subscriber* subscriber_ = nullptr;
    memsock_sample sample_{};
};

/// What a receive of `Subscriber::next`/`try_next` found: a frame, or one
/// of the routine outcomes, in the order the stream has them. Movable, not
/// copyable (it may hold a Sample).
class Event {
public:
    enum class Kind {
        /// A frame: `sample()`.
        Frame,
        /// `next(timeout)`: nothing came in time.
        Timeout,
        /// `try_next()`: nothing is queued.
        Empty,
        /// The stream's publisher went away (after its last frames); the
        /// stream stays for another.
        PublisherGone,
        /// A publisher came back; its frames follow.
        PublisherBack,
        /// The stream was closed (after the frames sent before); every
        /// later receive says so again.
        Closed,
        /// `Subscriber::interrupt()` was called.
        Interrupted,
    };

    Kind kind() const noexcept { return kind_; }
    bool is_frame() const noexcept { return kind_ == Kind::Frame; }
    /// True for a frame.
    explicit operator bool() const noexcept { return is_frame(); }

    /// The frame (an empty Sample unless `is_frame()`).
    Sample& sample() & noexcept { return sample_; }
    const Sample& sample() const& noexcept { return sample_; }
    Sample sample() && noexcept { return std::move(sample_); }

private:
    friend class Subscriber;
    explicit Event(Kind kind) noexcept : kind_(kind) {}
    Event(const memsock_subscriber* subscriber, const memsock_sample& sample) noexcept
        : kind_(Kind::Frame), sample_(subscriber, sample) {}

    Kind kind_;
    Sample sample_;
};

/// A subscriber of a stream, and a range of its frames (see the top of
/// this header for the three ways to receive). Movable, not copyable.
///
/// Thread-safety: one thread at a time; may move to another thread with
/// no Sample out. `interrupt()` may be called from any thread while it is
/// live. Destroy its Samples before it, and it before its Client.
class Subscriber {
public:
    class iterator;
    /// The end of the range.
    struct sentinel {};

    /// An empty subscriber (every receive on it throws InvalidArgument).
    Subscriber() noexcept = default;
    /// Takes ownership of a handle from memsock_subscriber_create.
    explicit Subscriber(memsock_subscriber* owned) noexcept : handle_(owned) {}
    Subscriber(Subscriber&& other) noexcept
        : handle_(std::exchange(other.handle_, nullptr)), closed_(std::exchange(other.closed_, false)) {}
    Subscriber& operator=(Subscriber&& other) noexcept {
        if (this != &other) {
            memsock_subscriber_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
            closed_ = std::exchange(other.closed_, false);
        }
        return *this;
    }
    Subscriber(const Subscriber&) = delete;
    Subscriber& operator=(const Subscriber&) = delete;
    ~Subscriber() { memsock_subscriber_free(handle_); }

    bool valid() const noexcept { return handle_ != nullptr; }
    explicit operator bool() const noexcept { return valid(); }
    memsock_subscriber* native() const noexcept { return handle_; }

    // -- Frames only: publisher news skipped; end and interrupt thrown.

    /// The next frame, waiting as long as it takes. Throws StreamClosed
    /// once the stream is closed (and every frame before received),
    /// Interrupted after `interrupt()`, Error on failure.
    Sample recv() {
        memsock_sample s;
        for (;;) {
            const memsock_status st = memsock_subscriber_recv(handle_, -1, &s);
            if (st == MEMSOCK_OK) {
                return Sample(handle_, s);
            }
            if (!detail::is_publisher_news(st) && st != MEMSOCK_TIMEOUT) {
                fail(st);
            }
        }
    }

    /// The next frame, waiting at most `timeout` (negative: forever);
    /// std::nullopt if none came in time. Throws as `recv()`.
    std::optional<Sample> recv(std::chrono::nanoseconds timeout) {
        if (timeout.count() < 0) {
            return recv();
        }
        memsock_sample s;
        // A frame queued: taken without reading the clock.
        for (;;) {
            const memsock_status st = memsock_subscriber_try_recv(handle_, &s);
            if (st == MEMSOCK_OK) {
                return Sample(handle_, s);
            }
            if (st == MEMSOCK_WOULD_BLOCK) {
                break;
            }
            if (!detail::is_publisher_news(st)) {
                fail(st);
            }
        }
        if (timeout.count() == 0) {
            return std::nullopt;
        }
        // Waiting: publisher news skipped does not extend the deadline.
        using clock = std::chrono::steady_clock;
        const clock::time_point start = clock::now();
        const clock::time_point deadline =
            timeout < clock::time_point::max() - start ? start + timeout : clock::time_point::max();
        for (clock::time_point now = start;; now = clock::now()) {
            const std::chrono::nanoseconds left = now < deadline ? deadline - now : std::chrono::nanoseconds(0);
            const memsock_status st = memsock_subscriber_recv(handle_, detail::timeout_ns(left), &s);
            if (st == MEMSOCK_OK) {
                return Sample(handle_, s);
            }
            if (st == MEMSOCK_TIMEOUT) {
                return std::nullopt;
            }
            if (!detail::is_publisher_news(st)) {
                fail(st);
            }
        }
    }

    /// The next frame if one is queued, else std::nullopt, without
    /// waiting. Throws as `recv()`.
    std::optional<Sample> try_recv() {
        memsock_sample s;
        for (;;) {
            const memsock_status st = memsock_subscriber_try_recv(handle_, &s);
            if (st == MEMSOCK_OK) {
                return Sample(handle_, s);
            }
            if (st == MEMSOCK_WOULD_BLOCK) {
                return std::nullopt;
            }
            if (!detail::is_publisher_news(st)) {
                fail(st);
            }
        }
    }

    // -- Everything, in order: nothing routine is thrown.

    /// The next frame or news, waiting as long as it takes. Throws only on
    /// failure (Disconnected, credits exhausted, ...).
    Event next() { return next(forever); }

    /// The next frame or news, waiting at most `timeout` (negative:
    /// forever): Event::Kind::Timeout if nothing came.
    Event next(std::chrono::nanoseconds timeout) {
        memsock_sample s;
        return event(memsock_subscriber_recv(handle_, detail::timeout_ns(timeout), &s), s);
    }

    /// The next frame or news if there is any, else Event::Kind::Empty.
    Event try_next() {
        memsock_sample s;
        return event(memsock_subscriber_try_recv(handle_, &s), s);
    }

    // -- The range of frames.

    /// Receives frames until the stream is closed or the subscriber
    /// interrupted (see the top of this header). At most one iteration at
    /// a time; do not move the Subscriber while iterating.
    iterator begin() noexcept;
    sentinel end() const noexcept { return {}; }

    // -- The rest.

    /// Makes the receive in progress, or else the next one, end with
    /// MEMSOCK_INTERRUPTED (once per interrupt; several before a receive
    /// count as one): a range-for ends, `next` gives Event::Kind::Interrupted,
    /// `recv` throws Interrupted. Safe from any thread while the Subscriber
    /// is live (it reads only the C handle). No effect if empty.
    void interrupt() const noexcept { (void)memsock_subscriber_interrupt(handle_); }

    /// Whether a receive on this thread found the stream closed.
    bool closed() const noexcept { return closed_; }

    /// Changes the subscriber's credits (the broker checks the pool can
    /// honour them).
    void set_credits(std::uint32_t credits) { detail::check(memsock_subscriber_set_credits(handle_, credits)); }

    /// The publisher generation the subscriber has seen: it changes when a
    /// publisher goes or comes (0 if empty).
    std::uint64_t publisher_generation() const noexcept { return memsock_subscriber_publisher_generation(handle_); }

    /// Whether the broker that handed out the stream is gone (receiving
    /// goes on meanwhile).
    bool broker_gone() const noexcept { return memsock_subscriber_broker_gone(handle_) != 0; }

private:
    [[noreturn]] void fail(memsock_status st) {
        if (st == MEMSOCK_CLOSED) {
            closed_ = true;
        }
        detail::throw_status(st);
    }

    Event event(memsock_status st, const memsock_sample& s) {
        switch (st) {
        case MEMSOCK_OK:
            return Event(handle_, s);
        case MEMSOCK_TIMEOUT:
            return Event(Event::Kind::Timeout);
        case MEMSOCK_WOULD_BLOCK:
            return Event(Event::Kind::Empty);
        case MEMSOCK_PUBLISHER_GONE:
            return Event(Event::Kind::PublisherGone);
        case MEMSOCK_PUBLISHER_BACK:
            return Event(Event::Kind::PublisherBack);
        case MEMSOCK_CLOSED:
            closed_ = true;
            return Event(Event::Kind::Closed);
        case MEMSOCK_INTERRUPTED:
            return Event(Event::Kind::Interrupted);
        default:
            detail::throw_status(st);
        }
    }

    memsock_subscriber* handle_ = nullptr;
    bool closed_ = false;
};

/// An input iterator over a subscriber's frames: `*it` is the current
/// Sample as an rvalue (`Sample s = *it` takes it over; `auto&& s = *it`
/// leaves it in the iterator, released at the next step). Move-only.
/// Receives lazily, when compared with the end (or dereferenced), so that
/// stopping after N frames never waits for one more.
class Subscriber::iterator {
public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Sample;
    using difference_type = std::ptrdiff_t;
    using pointer = void;
    using reference = Sample&&;

    /// An iterator at the end.
    iterator() noexcept = default;
    iterator(iterator&&) noexcept = default;
    iterator& operator=(iterator&&) noexcept = default;
    iterator(const iterator&) = delete;
    iterator& operator=(const iterator&) = delete;
    ~iterator() = default;

    Sample&& operator*() const {
        fetch();
        return std::move(current_);
    }
    /// Releases the current sample (if the loop did not take it) and moves
    /// on; the next receive happens at the next comparison with the end.
    iterator& operator++() noexcept {
        current_.release();
        pending_ = true;
        return *this;
    }
    void operator++(int) noexcept { ++*this; }

    friend bool operator==(const iterator& it, sentinel) { return it.at_end(); }
    friend bool operator==(sentinel, const iterator& it) { return it.at_end(); }
    friend bool operator!=(const iterator& it, sentinel) { return !it.at_end(); }
    friend bool operator!=(sentinel, const iterator& it) { return !it.at_end(); }

private:
    friend class Subscriber;
    explicit iterator(Subscriber* subscriber) noexcept : subscriber_(subscriber), pending_(true) {}

    bool at_end() const {
        fetch();
        return subscriber_ == nullptr;
    }

    /// Receives the next frame if due, skipping publisher news; at the end
    /// of the stream or on an interrupt, becomes the end.
    void fetch() const {
        if (!pending_ || subscriber_ == nullptr) {
            return;
        }
        memsock_sample s;
        for (;;) {
            const memsock_status st = memsock_subscriber_recv(subscriber_->handle_, -1, &s);
            if (st == MEMSOCK_OK) {
                current_ = Sample(subscriber_->handle_, s);
                pending_ = false;
                return;
            }
            if (st == MEMSOCK_CLOSED || st == MEMSOCK_INTERRUPTED) {
                if (st == MEMSOCK_CLOSED) {
                    subscriber_->closed_ = true;
                }
                subscriber_ = nullptr;
                pending_ = false;
                return;
            }
            if (!detail::is_publisher_news(st) && st != MEMSOCK_TIMEOUT) {
                detail::throw_status(st);
            }
        }
    }

    mutable Subscriber* subscriber_ = nullptr;
    mutable Sample current_;
    mutable bool pending_ = false;
};

inline Subscriber::iterator Subscriber::begin() noexcept { return iterator(this); }

// ---------------------------------------------------------------------------
// The connection.

/// A connection to the broker: the lease of every stream, publisher and
/// subscriber opened through it. Movable, not copyable.
///
/// Thread-safety: may be shared between threads (every member function is
/// const and safe from any thread). Destroy it after every Publisher and
/// Subscriber made through it.
class Client {
public:
    /// An empty client (every call on it throws InvalidArgument).
    Client() noexcept = default;
    /// Takes ownership of a handle from memsock_connect.
    explicit Client(memsock_client* owned) noexcept : handle_(owned) {}
    Client(Client&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    Client& operator=(Client&& other) noexcept {
        if (this != &other) {
            memsock_client_free(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
        }
        return *this;
    }
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;
    ~Client() { memsock_client_free(handle_); }

    /// Connects to the broker at $MEMSOCK_SOCKET, else the default path.
    static Client connect() { return open(nullptr); }
    /// Connects to the broker at `socket_path`.
    static Client connect(const std::string& socket_path) { return open(socket_path.c_str()); }

    /// Whether the broker is gone (shut down, crashed): its publishers and
    /// subscribers go on, but nothing new can be asked of it.
    bool broker_gone() const noexcept { return memsock_client_broker_gone(handle_) != 0; }
    bool valid() const noexcept { return handle_ != nullptr; }
    explicit operator bool() const noexcept { return valid(); }
    memsock_client* native() const noexcept { return handle_; }

    /// Becomes the publisher of stream `name`, creating it with `config` (or
    /// taking it over, same geometry, if its publisher is gone).
    Publisher publisher(const std::string& name, const StreamConfig& config = StreamConfig()) const {
        const memsock_stream_config c = config.to_c();
        memsock_publisher* out = nullptr;
        detail::check(memsock_publisher_create(handle_, name.c_str(), &c, &out));
        return Publisher(out);
    }

    /// Subscribes to stream `name` (NoSuchStream if there is none and
    /// `options.wait_for_stream` is false).
    Subscriber subscriber(const std::string& name, const SubscribeOptions& options = SubscribeOptions()) const {
        const memsock_subscribe_options c = options.to_c();
        memsock_subscriber* out = nullptr;
        detail::check(memsock_subscriber_create(handle_, name.c_str(), &c, &out));
        return Subscriber(out);
    }

    /// The broker's statistics as one JSON document (what `memsock stats
    /// --json` prints), of every stream.
    std::string stats_json() const { return stats(nullptr); }
    /// Of stream `name` only (NoSuchStream if there is none).
    std::string stats_json(const std::string& name) const { return stats(name.c_str()); }

    /// Closes stream `name` for good: its publisher's next send throws
    /// StreamClosed, its subscribers see the end after the frames already
    /// sent.
    void close_stream(const std::string& name) const { detail::check(memsock_close_stream(handle_, name.c_str())); }

private:
    static Client open(const char* path) {
        memsock_client* out = nullptr;
        detail::check(memsock_connect(path, &out));
        return Client(out);
    }

    std::string stats(const char* name) const {
        char* out = nullptr;
        detail::check(memsock_stats_json(handle_, name, &out));
        const std::unique_ptr<char, void (*)(char*)> owned(out, memsock_string_free);
        return std::string(owned.get());
    }

    memsock_client* handle_ = nullptr;
};

}  // namespace memsock

#undef MEMSOCK_HPP_COLD_

#endif  // MEMSOCK_HPP
