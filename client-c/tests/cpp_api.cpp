// The C++ wrapper (memsock.hpp) against a real broker: errors, loans,
// samples, the three ways to receive, interrupts, closing. Usage: cpp_api
// SOCKET_PATH. Ends with a line "N passed, N failed"; exits 0 only if none
// failed. Builds as C++17 and C++20.
#include "memsock.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#if defined(__cpp_lib_ranges) && __cpp_lib_ranges >= 201911L
#include <ranges>
#define CPP_API_RANGES 1
#endif

using namespace std::chrono_literals;

namespace {

int passed, failed;

void check(bool ok, const char* what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        std::fprintf(stderr, "FAILED: %s (last error: %s)\n", what, memsock_last_error());
    }
}

// Only to catch a hang: what should come at once gets this long.
constexpr auto kHang = 10s;

// Whether `f` throws `E` with status `st` (and, if given, `needle` in its
// message).
template <class E = memsock::Error, class F>
bool throws(F&& f, memsock_status st, const char* needle = nullptr) {
    try {
        f();
    } catch (const E& e) {
        if (e.status() != st) {
            std::fprintf(stderr, "  threw status %d (%s), not %d\n", static_cast<int>(e.status()), e.what(),
                         static_cast<int>(st));
            return false;
        }
        if (needle != nullptr && std::strstr(e.what(), needle) == nullptr) {
            std::fprintf(stderr, "  message \"%s\" lacks \"%s\"\n", e.what(), needle);
            return false;
        }
        return true;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "  threw something else: %s\n", e.what());
        return false;
    }
    std::fprintf(stderr, "  did not throw\n");
    return false;
}

// Frame `i` of a test run: 1 to 64 bytes, each a function of `i`.
std::size_t frame_len(unsigned i) { return 1 + i % 64; }
std::byte frame_byte(unsigned i, std::size_t j) { return std::byte(static_cast<unsigned char>(i * 7 + j)); }

void fill(memsock::mutable_bytes b, unsigned i) {
    for (std::size_t j = 0; j < frame_len(i); j++) {
        b[j] = frame_byte(i, j);
    }
}

bool frame_is(const memsock::Sample& s, unsigned i) {
    if (s.size() != frame_len(i)) {
        return false;
    }
    memsock::bytes b = s.bytes();
    for (std::size_t j = 0; j < b.size(); j++) {
        if (b[j] != frame_byte(i, j)) {
            return false;
        }
    }
    return true;
}

bool is(const std::optional<memsock::Sample>& s, std::string_view text) { return s && s->valid() && s->str() == text; }

// Ends the process if the tests take far too long (a hang), saying so.
class Watchdog {
public:
    explicit Watchdog(std::chrono::seconds limit)
        : thread_([this, limit] {
              std::unique_lock<std::mutex> lock(mutex_);
              if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
                  std::fprintf(stderr, "FAILED: the tests hung (watchdog)\n");
                  std::printf("%d passed, %d failed\n", passed, failed + 1);
                  std::fflush(stdout);
                  std::_Exit(1);
              }
          }) {}
    ~Watchdog() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            done_ = true;
        }
        cv_.notify_one();
        thread_.join();
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool done_ = false;
    std::thread thread_;
};

// A flag one thread raises and another waits for (at most kHang).
class Signal {
public:
    void raise() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            up_ = true;
        }
        cv_.notify_all();
    }
    bool wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        return cv_.wait_for(lock, kHang, [this] { return up_; });
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool up_ = false;
};

memsock::StreamConfig small_stream() {
    memsock::StreamConfig config;
    config.slot_size = 64;
    config.slot_count = 8;
    return config;
}

memsock::SubscribeOptions lossless(std::uint32_t credits) {
    memsock::SubscribeOptions options;
    options.policy = memsock::Policy::Lossless;
    options.credits = credits;
    return options;
}

// The type-level promises.
static_assert(!std::is_copy_constructible_v<memsock::Client> && std::is_nothrow_move_constructible_v<memsock::Client>);
static_assert(!std::is_copy_constructible_v<memsock::Publisher> && std::is_nothrow_move_assignable_v<memsock::Publisher>);
static_assert(!std::is_copy_constructible_v<memsock::Subscriber> && std::is_nothrow_move_assignable_v<memsock::Subscriber>);
static_assert(!std::is_copy_constructible_v<memsock::Loan> && std::is_nothrow_move_assignable_v<memsock::Loan>);
static_assert(!std::is_copy_constructible_v<memsock::Sample> && std::is_nothrow_move_assignable_v<memsock::Sample>);
static_assert(!std::is_copy_constructible_v<memsock::Event> && std::is_nothrow_move_constructible_v<memsock::Event>);
static_assert(std::is_base_of_v<std::runtime_error, memsock::Error>);
static_assert(std::is_base_of_v<memsock::Error, memsock::NoSuchStream>);
static_assert(static_cast<std::uint32_t>(memsock::Policy::Lossless) == MEMSOCK_LOSSLESS);
static_assert(static_cast<std::uint32_t>(memsock::Wait::SpinThenPark) == MEMSOCK_WAIT_SPIN_THEN_PARK);
static_assert(std::is_convertible_v<memsock::mutable_bytes, memsock::bytes>);
#if defined(CPP_API_RANGES)
static_assert(std::input_iterator<memsock::Subscriber::iterator>);
static_assert(std::sentinel_for<memsock::Subscriber::sentinel, memsock::Subscriber::iterator>);
static_assert(std::ranges::input_range<memsock::Subscriber>);
#endif

void test_basics() {
    check(std::strlen(memsock::version()) >= 5, "version");
    check(std::string(memsock::status_str(MEMSOCK_NO_SUCH_STREAM)) == "no such stream", "status_str");
    memsock::StreamConfig config;
    check(config.slot_size == 4096 && config.slot_count == 16 && config.timestamps, "stream config defaults");
    memsock_stream_config c = config.to_c();
    check(c.size == sizeof c && c.slot_size == 4096, "stream config as C");
    memsock::SubscribeOptions options;
    check(options.credits == 4 && options.policy == memsock::Policy::DropNewest && options.wait == memsock::Wait::Park &&
              !options.wait_for_stream,
          "subscribe options defaults");
    check(options.to_c().size == sizeof(memsock_subscribe_options), "subscribe options as C");
}

void test_errors(const std::string& socket, const std::string& tag) {
    check(throws<memsock::BrokerUnreachable>([] { memsock::Client::connect("/nonexistent/memsock.sock"); },
                                             MEMSOCK_BROKER_UNREACHABLE, "/nonexistent/memsock.sock"),
          "no broker there: BrokerUnreachable naming the path");
    try {
        memsock::Client::connect("/nonexistent/memsock.sock");
        check(false, "an unreachable broker throws");
    } catch (const memsock::Error& e) {
        check(e.status() == MEMSOCK_BROKER_UNREACHABLE, "caught as memsock::Error, with its status");
    }
    try {
        memsock::Client::connect("/nonexistent/memsock.sock");
    } catch (const std::runtime_error& e) {
        check(std::strstr(e.what(), "/nonexistent/memsock.sock") != nullptr, "caught as std::runtime_error");
    }

    memsock::Client client = memsock::Client::connect(socket);
    check(client.valid(), "connect");
    check(!client.broker_gone(), "its broker is there");
    const std::string nope = "nope-" + tag;
    check(throws<memsock::NoSuchStream>([&] { client.stats_json(nope); }, MEMSOCK_NO_SUCH_STREAM, nope.c_str()),
          "stats of an unknown stream: NoSuchStream naming it");
    check(throws<memsock::NoSuchStream>([&] { client.close_stream(nope); }, MEMSOCK_NO_SUCH_STREAM),
          "close an unknown stream");
    memsock::SubscribeOptions options;
    options.wait_for_stream = false;
    check(throws<memsock::NoSuchStream>([&] { client.subscriber(nope, options); }, MEMSOCK_NO_SUCH_STREAM),
          "subscribe to an unknown stream without waiting: NoSuchStream");
    memsock::StreamConfig bad;
    bad.slot_count = 1;
    check(throws<memsock::InvalidArgument>([&] { client.publisher("bad-" + tag, bad); }, MEMSOCK_INVALID_ARGUMENT),
          "one slot is refused");
    options.policy = static_cast<memsock::Policy>(7);
    check(throws<memsock::InvalidArgument>([&] { client.subscriber(nope, options); }, MEMSOCK_INVALID_ARGUMENT),
          "no such policy");

    // Empty objects: every call refused, nothing crashes.
    memsock::Client moved = std::move(client);
    check(!client.valid() && moved.valid(), "a moved client");
    check(throws<memsock::InvalidArgument>([&] { client.stats_json(); }, MEMSOCK_INVALID_ARGUMENT),
          "a moved-from client refuses");
    memsock::Publisher no_pub;
    check(throws<memsock::InvalidArgument>([&] { no_pub.loan(); }, MEMSOCK_INVALID_ARGUMENT),
          "an empty publisher refuses");
    memsock::Subscriber no_sub;
    check(throws<memsock::InvalidArgument>([&] { no_sub.try_next(); }, MEMSOCK_INVALID_ARGUMENT),
          "an empty subscriber refuses");
    no_sub.interrupt();  // nothing
    check(no_sub.publisher_generation() == 0, "an empty subscriber's generation");
}

void test_stats(const memsock::Client& client) {
    const std::string json = client.stats_json();
    check(json.find("\"broker_pid\"") != std::string::npos, "stats are JSON with the broker's pid");
}

// 1000 frames through loans, one thread: try_send until a lossless
// subscriber is full, then receive.
void test_lossless_one_thread(const memsock::Client& client, const std::string& tag) {
    const std::string name = "lossless-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(4));
    check(!sub.try_recv().has_value(), "nothing queued yet");
    check(!sub.recv(1ms).has_value(), "a millisecond of nothing");
    unsigned sent = 0, received = 0, blocked = 0;
    bool exact = true, capacity = true;
    std::uint64_t first_seq = 0;
    memsock::Loan loan;
    while (received < 1000) {
        while (sent < 1000) {
            if (!loan) {
                loan = pub.loan();
                capacity = capacity && loan.size() == 64 && loan.bytes().size() == 64;
            }
            fill(loan.bytes(), sent);
            if (!loan.try_send(frame_len(sent))) {
                blocked++;
                exact = exact && loan.valid();
                break;  // the loan stays, sent after receiving
            }
            exact = exact && !loan.valid();
            sent++;
        }
        while (std::optional<memsock::Sample> s = sub.try_recv()) {
            if (received == 0) {
                first_seq = s->seq();
            }
            exact = exact && frame_is(*s, received) && s->seq() == first_seq + received && s->timestamp_ns() != 0;
            received++;
        }
    }
    check(capacity, "a loan is the slot's 64 bytes");
    check(sent == 1000 && received == 1000 && exact, "1000 frames through loans, in order, byte-exact");
    check(blocked > 0, "the lossless subscriber made try_send return false");
}

// 1000 frames through loans from another thread, blocking sends, received
// by a range-for that the close of the stream ends.
void test_lossless_threads(const memsock::Client& client, const std::string& tag) {
    const std::string name = "threads-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(3));
    std::exception_ptr publisher_error;
    std::thread publisher([&client, &name, &publisher_error, pub = std::move(pub)]() mutable {
        try {
            for (unsigned i = 0; i < 1000; i++) {
                memsock::Loan loan = pub.loan();
                fill(loan.bytes(), i);
                loan.send(frame_len(i));
            }
            client.close_stream(name);
        } catch (...) {
            publisher_error = std::current_exception();
        }
    });
    unsigned received = 0;
    bool exact = true;
    std::uint64_t next_seq = 0;
    try {
        for (memsock::Sample s : sub) {
            if (received == 0) {
                next_seq = s.seq();
            }
            exact = exact && s.valid() && frame_is(s, received) && s.seq() == next_seq;
            next_seq++;
            received++;
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "  range-for threw: %s\n", e.what());
        exact = false;
    }
    publisher.join();
    check(!publisher_error, "the publishing thread sent without failure");
    check(received == 1000 && exact, "1000 frames from another thread through a range-for, in order, byte-exact");
    check(sub.closed(), "the close of the stream ended the range-for");
    check(throws<memsock::StreamClosed>([&] { sub.recv(); }, MEMSOCK_CLOSED), "recv() after the close throws");
    check(throws<memsock::StreamClosed>([&] { sub.try_recv(); }, MEMSOCK_CLOSED), "and try_recv()");
    check(sub.next(kHang).kind() == memsock::Event::Kind::Closed, "next() says Closed, again");
    int more = 0;
    for (memsock::Sample s : sub) {
        (void)s;
        more++;
    }
    check(more == 0, "a range-for over a closed stream ends at once");
}

// A full lossless subscriber: try_send and timed sends give false, the
// loan stays usable.
void test_full(const memsock::Client& client, const std::string& tag) {
    const std::string name = "full-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(2));
    memsock::Loan a = pub.loan();
    std::memcpy(a.data(), "a", 1);
    check(a.try_send(1) && !a.valid(), "first frame sent, the loan spent");
    check(pub.send_copy("b", 0ns), "second frame (a copy)");
    memsock::Loan c = pub.loan();
    std::memcpy(c.data(), "c", 1);
    check(!c.try_send(1), "a full lossless subscriber: try_send is false");
    check(c.valid() && c.size() == 64, "and the loan stays");
    check(!c.send(1, 1ms), "a timed send finds no room either");
    check(!c.send(1, 0ns), "nor a send without waiting");
    check(c.valid(), "the loan still stays");
    c[1] = std::byte('!');
    check(is(sub.recv(kHang), "a"), "receive the first (released at once)");
    check(c.try_send(2), "now the loan goes");
    check(is(sub.recv(kHang), "b") && is(sub.recv(kHang), "c!"), "every frame, in order");
    check(!sub.try_recv(), "and no more");

    memsock::Loan big = pub.loan();
    check(throws<memsock::InvalidArgument>([&] { big.send(65); }, MEMSOCK_INVALID_ARGUMENT),
          "more than the slot is refused");
    check(big.valid() && big.try_send(0), "keeping the loan: an empty frame");
    std::optional<memsock::Sample> empty = sub.recv(kHang);
    check(empty && empty->valid() && empty->size() == 0, "an empty frame is a frame");
}

// A loan destroyed unsent sends nothing.
void test_discard(const memsock::Client& client, const std::string& tag) {
    const std::string name = "discard-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(4));
    {
        memsock::Loan loan = pub.loan();
        std::memcpy(loan.data(), "unsent", 6);
    }
    {
        memsock::Loan loan = pub.loan();
        loan.discard();
        check(!loan.valid() && loan.size() == 0, "discarded");
        check(throws<memsock::InvalidArgument>([&] { loan.send(1); }, MEMSOCK_INVALID_ARGUMENT),
              "a discarded loan cannot be sent");
    }
    memsock::Loan moved;
    {
        memsock::Loan loan = pub.loan();
        std::memcpy(loan.data(), "moved", 5);
        moved = std::move(loan);
        check(!loan.valid() && moved.valid(), "a loan moved");
    }
    check(moved.try_send(5), "sent by its new owner after the old one was destroyed");
    pub.send_copy(std::string("after"));
    check(is(sub.recv(kHang), "moved") && is(sub.recv(kHang), "after"), "only what was sent arrives");
    check(!sub.try_recv(), "nothing extra");
}

// Samples hold credits until released; moved samples release once.
void test_samples(const memsock::Client& client, const std::string& tag) {
    const std::string name = "samples-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(2));
    pub.send_copy("a");
    pub.send_copy(memsock::as_bytes("b", 1));
    std::optional<memsock::Sample> a = sub.recv(kHang);
    std::optional<memsock::Sample> b = sub.recv(kHang);
    check(is(a, "a") && is(b, "b"), "two samples held");
    check(!pub.send_copy("c", 0ns), "two credits held: a lossless publisher has no room");
    check(throws([&] { sub.try_recv(); }, MEMSOCK_CREDITS_EXHAUSTED, "release one"),
          "receiving a third throws CREDITS_EXHAUSTED");

    memsock::Sample m = std::move(*a);
    check(!a->valid() && a->size() == 0 && a->bytes().empty(), "a moved-from sample is empty");
    check(m.str() == "a", "the moved-to sample has the frame");
    a.reset();  // destroys the moved-from sample: releases nothing
    check(!pub.send_copy("c", 0ns), "destroying a moved-from sample gives no credit back");
    m.release();
    check(!m.valid() && m.seq() + 1 == b->seq(), "released explicitly (its seq stays)");
    check(pub.send_copy("c", 0ns), "a released sample gives its credit back");
    memsock::Sample c = std::move(*sub.recv(kHang));
    check(c.str() == "c", "received");
    c = std::move(*b);  // releases "c"
    check(c.str() == "b", "move-assigned");
    check(pub.send_copy("d", 0ns), "the overwritten sample was released");
    check(is(sub.recv(kHang), "d"), "and the credit used");
    b.reset();
    c.release();

    unsigned received = 0;
    for (unsigned i = 0; i < 20; i++) {
        const std::string frame = std::to_string(i);
        if (pub.send_copy(frame, 0ns) && is(sub.recv(kHang), frame)) {
            received++;
        }
    }
    check(received == 20, "20 frames through 2 credits, each sample released at the end of its scope");

    std::vector<memsock::Sample> kept;
    for (unsigned i = 0; i < 3; i++) {
        if (pub.send_copy("k", 0ns)) {
            if (std::optional<memsock::Sample> s = sub.try_recv()) {
                kept.push_back(std::move(*s));
            }
        }
    }
    check(kept.size() == 2 && kept[0].str() == "k" && kept[1].valid(), "samples kept in a vector hold their credits");
    kept.clear();
    check(pub.send_copy("e", 0ns) && is(sub.recv(kHang), "e"), "and give them back when destroyed");

    check(throws([&] { sub.set_credits(1000); }, MEMSOCK_INVALID_ARGUMENT), "set_credits beyond the queue");
    sub.set_credits(1);
    pub.send_copy("f");
    std::optional<memsock::Sample> f = sub.recv(kHang);
    check(is(f, "f") && !pub.send_copy("g", 0ns), "one credit after set_credits(1)");
}

// next(): everything in order, nothing routine thrown; recv and range-for
// skip publisher news.
void test_events(const memsock::Client& client, const std::string& tag) {
    using Kind = memsock::Event::Kind;
    const std::string name = "events-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(4));
    check(sub.try_next().kind() == Kind::Empty, "try_next: Empty");
    check(sub.next(1ms).kind() == Kind::Timeout, "next(1ms): Timeout");
    pub.send_copy("A");
    memsock::Event ev = sub.next(kHang);
    check(ev.is_frame() && ev && ev.sample().str() == "A", "next: a Frame");
    memsock::Sample taken = std::move(ev).sample();
    check(taken.str() == "A" && !ev.sample().valid(), "the frame taken out of its event");
    taken.release();

    check(!sub.broker_gone() && !pub.broker_gone(), "their broker is there");
    const std::uint64_t generation = sub.publisher_generation();
    pub = memsock::Publisher();  // goes away
    check(sub.next(kHang).kind() == Kind::PublisherGone, "publisher gone reported");
    check(sub.publisher_generation() != generation, "a new publisher generation");
    check(sub.try_next().kind() == Kind::Empty, "once");
    pub = client.publisher(name, small_stream());
    pub.send_copy("B");
    check(sub.next(kHang).kind() == Kind::PublisherBack, "publisher back reported");
    ev = sub.next(kHang);
    check(ev.is_frame() && ev.sample().str() == "B", "then its frame");

    // recv(timeout) skips the news, and still times out.
    pub = memsock::Publisher();
    check(!sub.recv(20ms).has_value(), "recv(timeout) skips publisher gone, then times out");
    pub = client.publisher(name, small_stream());
    pub.send_copy("C");
    check(is(sub.recv(kHang), "C"), "recv(timeout) skips publisher back");
    check(sub.try_next().kind() == Kind::Empty, "no news left");

    // recv() and try_recv() too.
    pub = memsock::Publisher();
    check(sub.try_next().kind() == Kind::PublisherGone, "gone again");
    pub = client.publisher(name, small_stream());
    pub.send_copy("D");
    check(sub.recv().str() == "D", "recv() skips publisher back");
    pub = memsock::Publisher();
    check(!sub.try_recv().has_value(), "try_recv() skips publisher gone");
    pub = client.publisher(name, small_stream());
    pub.send_copy("E");
    check(is(sub.try_recv(), "E"), "try_recv() skips publisher back");

    // And the range-for.
    pub = memsock::Publisher();
    check(sub.next(kHang).kind() == Kind::PublisherGone, "gone once more");
    pub = client.publisher(name, small_stream());
    pub.send_copy("F");
    std::string got;
    for (memsock::Sample s : sub) {
        got = std::string(s.str());
        break;
    }
    check(got == "F", "a range-for skips publisher back");
    check(sub.try_next().kind() == Kind::Empty, "the news was consumed");

    // News and frames from a thread, ended by the close: the loop sees
    // the frames only.
    Signal first;
    std::exception_ptr publisher_error;
    std::thread publisher([&] {
        try {
            pub.send_copy("G");
            if (first.wait()) {
                pub = memsock::Publisher();
                pub = client.publisher(name, small_stream());
                pub.send_copy("H");
            }
            pub.send_copy("I");
            client.close_stream(name);
        } catch (...) {
            publisher_error = std::current_exception();
        }
    });
    std::vector<std::string> frames;
    try {
        for (auto&& s : sub) {
            frames.emplace_back(s.str());
            if (frames.size() == 1) {
                first.raise();
            }
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "  range-for threw: %s\n", e.what());
    }
    first.raise();
    publisher.join();
    check(!publisher_error, "the other thread changed publishers without failure");
    check(frames == std::vector<std::string>{"G", "H", "I"} && sub.closed(),
          "a range-for: frames across a change of publisher, until the close");
    check(sub.next(kHang).kind() == Kind::Closed, "next(): Closed");
    pub = memsock::Publisher();
}

// interrupt(): from another thread, before or during a receive.
void test_interrupt(const memsock::Client& client, const std::string& tag) {
    using Kind = memsock::Event::Kind;
    const std::string name = "interrupt-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(4));

    sub.interrupt();
    sub.interrupt();
    check(sub.next(kHang).kind() == Kind::Interrupted, "an interrupt before the receive is not lost");
    check(sub.try_next().kind() == Kind::Empty, "several count as one");
    sub.interrupt();
    check(throws<memsock::Interrupted>([&] { sub.try_recv(); }, MEMSOCK_INTERRUPTED), "try_recv() throws Interrupted");
    sub.interrupt();
    int iterations = 0;
    for (memsock::Sample s : sub) {
        (void)s;
        iterations++;
    }
    check(iterations == 0 && !sub.closed(), "a range-for interrupted before it began ends at once");

    // A range-for in another thread, blocked after a frame, interrupted
    // from this one.
    std::mutex mutex;
    std::condition_variable cv;
    int received = 0;
    std::promise<void> ended;
    std::future<void> loop_ended = ended.get_future();
    std::thread receiver([&] {
        try {
            for (memsock::Sample s : sub) {
                (void)s;
                std::lock_guard<std::mutex> lock(mutex);
                received++;
                cv.notify_all();
            }
            ended.set_value();
        } catch (...) {
            ended.set_exception(std::current_exception());
        }
    });
    pub.send_copy("x");
    {
        std::unique_lock<std::mutex> lock(mutex);
        check(cv.wait_for(lock, kHang, [&] { return received == 1; }), "the other thread's range-for got a frame");
    }
    sub.interrupt();  // it blocks for the next one meanwhile (or soon will)
    const bool stopped = loop_ended.wait_for(kHang) == std::future_status::ready;
    check(stopped, "interrupt() from this thread ended its range-for");
    if (!stopped) {
        client.close_stream(name);  // ends it anyway, to join
    }
    receiver.join();
    bool clean = false;
    try {
        loop_ended.get();
        clean = true;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "  range-for threw: %s\n", e.what());
    }
    check(clean && received == 1 && !sub.closed(), "cleanly, after one frame, not closed");

    // recv() blocking in this thread, interrupted from another.
    Signal waiting;
    std::thread interrupter([&] {
        if (waiting.wait()) {
            sub.interrupt();
        }
    });
    waiting.raise();
    check(throws<memsock::Interrupted>([&] { sub.recv(); }, MEMSOCK_INTERRUPTED),
          "a blocking recv() interrupted from another thread throws Interrupted");
    interrupter.join();

    // next(timeout) likewise, not thrown.
    std::thread interrupter2([&] { sub.interrupt(); });
    const Kind kind = sub.next(kHang).kind();
    interrupter2.join();
    check(kind == Kind::Interrupted, "next() interrupted from another thread: Interrupted");
    pub.send_copy("still");
    check(is(sub.recv(kHang), "still"), "the subscriber goes on after an interrupt");
}

// close_stream ends a range-for over what was sent before; sends fail.
void test_close(const memsock::Client& client, const std::string& tag) {
    const std::string name = "close-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(4));
    pub.send_copy("1");
    pub.send_copy("2");
    memsock::Loan loan = pub.loan();
    std::memcpy(loan.data(), "3", 1);
    client.close_stream(name);
    check(throws<memsock::StreamClosed>([&] { pub.send_copy("late"); }, MEMSOCK_CLOSED),
          "send_copy after the close throws StreamClosed");
    check(throws<memsock::StreamClosed>([&] { loan.send(1); }, MEMSOCK_CLOSED), "a loan sent after the close too");
    check(!loan.valid(), "and is gone");
    check(throws<memsock::StreamClosed>([&] { pub.loan(); }, MEMSOCK_CLOSED), "no loan after the close");
    std::string got;
    for (memsock::Sample s : sub) {
        got += s.str();
    }
    check(got == "12" && sub.closed(), "the range-for gets what was sent before the close, then ends");
}

#if defined(CPP_API_RANGES)
// C++20: the subscriber as a range; take(N) does not wait for frame N+1.
void test_ranges(const memsock::Client& client, const std::string& tag) {
    const std::string name = "ranges-" + tag;
    memsock::Publisher pub = client.publisher(name, small_stream());
    memsock::Subscriber sub = client.subscriber(name, lossless(4));
    for (const char* f : {"r", "s", "t"}) {
        pub.send_copy(f);
    }
    std::string got;
    for (memsock::Sample s : sub | std::views::take(3)) {
        got += s.str();
    }
    check(got == "rst", "std::views::take(3) over a subscriber, without waiting for a fourth frame");
    std::span<const std::byte> view;
    pub.send_copy("span");
    std::optional<memsock::Sample> s = sub.recv(kHang);
    view = s->bytes();
    check(view.size() == 4 && view[0] == std::byte('s'), "bytes() is a std::span");
}
#endif

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    Watchdog watchdog(120s);
    const std::string socket = argv[1];
    const std::string tag = std::to_string(getpid());
    try {
        test_basics();
        test_errors(socket, tag);
        const memsock::Client client = memsock::Client::connect(socket);
        test_stats(client);
        test_lossless_one_thread(client, tag);
        test_lossless_threads(client, tag);
        test_full(client, tag);
        test_discard(client, tag);
        test_samples(client, tag);
        test_events(client, tag);
        test_interrupt(client, tag);
        test_close(client, tag);
#if defined(CPP_API_RANGES)
        test_ranges(client, tag);
#endif
    } catch (const memsock::Error& e) {
        failed++;
        std::fprintf(stderr, "FAILED: unexpected memsock::Error (status %d): %s\n", static_cast<int>(e.status()),
                     e.what());
    } catch (const std::exception& e) {
        failed++;
        std::fprintf(stderr, "FAILED: unexpected exception: %s\n", e.what());
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
