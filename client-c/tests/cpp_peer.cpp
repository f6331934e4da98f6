// A C++ peer for the cross-language tests (client-c/tests/test_cross_language.py),
// through memsock.hpp: publishes or receives the test pattern of
// tests/src/lib.rs and reports JSON lines on stdout, as peer.c does.
//
//   cpp_peer publish SOCKET STREAM COUNT SLOT_SIZE SLOTS
//   cpp_peer subscribe SOCKET STREAM CREDITS SLOT_SIZE   (waits for the stream)
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "memsock.hpp"

namespace {

std::uint64_t mix(std::uint64_t x) {
    std::uint64_t z = x + 0x9e3779b97f4a7c15u;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

std::size_t frame_len(std::uint64_t seq, std::size_t slot_size) {
    return 1 + static_cast<std::size_t>(mix(seq ^ 0xa5a5) % slot_size);
}

// Frame `seq`: the first `len` bytes of its SplitMix64 chain, little-endian.
void fill_frame(std::uint64_t seq, unsigned char* buf, std::size_t len) {
    std::uint64_t state = mix(seq);
    for (std::size_t i = 0; i < len; i += 8) {
        state = mix(state);
        for (std::size_t b = 0; b < 8 && i + b < len; b++) {
            buf[i + b] = static_cast<unsigned char>(state >> (8 * b));
        }
    }
}

int publish(memsock::Client& client, const std::string& stream, std::uint64_t count, std::uint32_t slot_size,
            std::uint32_t slots) {
    memsock::StreamConfig config;
    config.slot_size = slot_size;
    config.slot_count = slots;
    memsock::Publisher pub = client.publisher(stream, config);
    std::printf("{\"ready\": true}\n");
    std::fflush(stdout);
    for (std::uint64_t seq = 0; seq < count; seq++) {
        memsock::Loan loan = pub.loan();
        const std::size_t len = frame_len(seq, loan.size());
        fill_frame(seq, reinterpret_cast<unsigned char*>(loan.data()), len);
        loan.send(len);
    }
    std::printf("{\"report\": {\"sent\": %" PRIu64 "}}\n", count);
    std::fflush(stdout);
    return 0;
}

int subscribe(memsock::Client& client, const std::string& stream, std::uint32_t credits, std::size_t slot_size) {
    memsock::SubscribeOptions options;
    options.credits = credits;
    options.policy = memsock::Policy::Lossless;
    options.wait_for_stream = true;
    memsock::Subscriber sub = client.subscriber(stream, options);
    std::vector<unsigned char> expected(slot_size);
    std::uint64_t received = 0, missing = 0, bad = 0, first = 0, last = 0;
    const char* end = "closed";
    for (;;) {
        memsock::Event event = sub.next();
        if (event.kind() == memsock::Event::Kind::PublisherGone) {
            end = "publisher_gone";
            break;
        }
        if (event.kind() == memsock::Event::Kind::Closed) {
            break;
        }
        if (!event.is_frame()) {
            continue;
        }
        const memsock::Sample& sample = event.sample();
        if (received == 0) {
            first = sample.seq();
        } else {
            missing += sample.seq() - last - 1;
        }
        last = sample.seq();
        const std::size_t len = frame_len(sample.seq(), slot_size);
        if (sample.size() != len) {
            bad++;
        } else {
            fill_frame(sample.seq(), expected.data(), len);
            bad += std::memcmp(expected.data(), sample.data(), len) != 0;
        }
        received++;
    }
    std::printf("{\"report\": {\"received\": %" PRIu64 ", \"missing\": %" PRIu64 ", \"bad\": %" PRIu64
                ", \"first\": %" PRIu64 ", \"last\": %" PRIu64 ", \"end\": \"%s\"}}\n",
                received, missing, bad, first, last, end);
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const std::string role = argc > 1 ? argv[1] : "";
        if (role == "publish" && argc == 7) {
            memsock::Client client = memsock::Client::connect(argv[2]);
            return publish(client, argv[3], std::strtoull(argv[4], nullptr, 10),
                           static_cast<std::uint32_t>(std::strtoul(argv[5], nullptr, 10)),
                           static_cast<std::uint32_t>(std::strtoul(argv[6], nullptr, 10)));
        }
        if (role == "subscribe" && argc == 6) {
            memsock::Client client = memsock::Client::connect(argv[2]);
            return subscribe(client, argv[3], static_cast<std::uint32_t>(std::strtoul(argv[4], nullptr, 10)),
                             std::strtoull(argv[5], nullptr, 10));
        }
        std::fprintf(stderr, "usage: %s publish SOCKET STREAM COUNT SLOT_SIZE SLOTS | subscribe SOCKET STREAM CREDITS SLOT_SIZE\n",
                     argv[0]);
        return 2;
    } catch (const memsock::Error& e) {
        std::fprintf(stderr, "%s (status %d)\n", e.what(), static_cast<int>(e.status()));
        return 1;
    }
}
