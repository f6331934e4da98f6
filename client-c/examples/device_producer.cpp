// A device process's shape (seed 000): frames of 576,717 uint16 samples
// (1,153,434 bytes) from several channels of a device, published at a fixed
// rate into one stream per channel ("device/0", "device/1", ...), for
// Python workers (fft_worker.py) to transform. Here the device is a tone
// generator: channel c carries a sine of 100 + 10 c cycles per frame, so a
// worker can tell it got the right stream, whole.
//
//   device_producer [--socket PATH] CHANNELS FRAMES RATE_HZ
//
// Build: c++ -std=c++17 device_producer.cpp $(pkg-config --cflags --libs memsock)
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "memsock.hpp"

namespace {

constexpr std::size_t kSamples = 576717;  // 1,153,434 bytes a frame
constexpr double kPi = 3.14159265358979323846;

// One frame of channel `channel`: a tone, shifted by the frame number.
void capture(std::size_t channel, std::uint64_t frame, std::uint16_t* out) {
    const double cycles = 100.0 + 10.0 * static_cast<double>(channel);
    const double phase = 0.1 * static_cast<double>(frame);
    for (std::size_t i = 0; i < kSamples; i++) {
        const double x = std::sin(2 * kPi * cycles * static_cast<double>(i) / kSamples + phase);
        out[i] = static_cast<std::uint16_t>(32768.0 + 16000.0 * x);
    }
}

}  // namespace

int main(int argc, char** argv) {
    int arg = 1;
    std::string socket;
    if (argc > 2 && std::strcmp(argv[1], "--socket") == 0) {
        socket = argv[2];
        arg = 3;
    }
    if (argc - arg != 3) {
        std::fprintf(stderr, "usage: %s [--socket PATH] CHANNELS FRAMES RATE_HZ\n", argv[0]);
        return 2;
    }
    const std::size_t channels = std::strtoul(argv[arg], nullptr, 10);
    const std::uint64_t frames = std::strtoull(argv[arg + 1], nullptr, 10);
    const double rate = std::strtod(argv[arg + 2], nullptr);
    try {
        memsock::Client client = socket.empty() ? memsock::Client::connect() : memsock::Client::connect(socket);
        memsock::StreamConfig config;
        config.slot_size = kSamples * sizeof(std::uint16_t);
        config.slot_count = 8;
        std::vector<memsock::Publisher> streams;
        for (std::size_t c = 0; c < channels; c++) {
            streams.push_back(client.publisher("device/" + std::to_string(c), config));
        }
        const auto period = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double>(1.0 / rate));
        auto next = std::chrono::steady_clock::now();
        std::uint64_t dropped = 0;
        for (std::uint64_t f = 0; f < frames; f++) {
            std::this_thread::sleep_until(next);
            next += period;
            for (std::size_t c = 0; c < channels; c++) {
                memsock::Loan loan = streams[c].loan();
                // The frame is captured straight into shared memory.
                capture(c, f, reinterpret_cast<std::uint16_t*>(loan.data()));
                // A worker that falls behind loses frames (the default
                // policy) and never stalls the device.
                if (!loan.try_send(kSamples * sizeof(std::uint16_t))) {
                    dropped++;
                }
            }
        }
        std::printf("{\"frames\": %llu, \"channels\": %zu, \"not_sent\": %llu}\n",
                    static_cast<unsigned long long>(frames), channels, static_cast<unsigned long long>(dropped));
    } catch (const memsock::Error& e) {
        std::fprintf(stderr, "device_producer: %s\n", e.what());
        return 1;
    }
    return 0;
}
