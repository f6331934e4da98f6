/* The C side of `memsock-bench c`: a publisher or a subscriber of stream
 * STREAM through libmemsock, doing per frame exactly what the Rust side
 * (bench/src/cstream.rs) does: the publisher fills the frame with one byte
 * (memset), the subscriber checks every byte equals the first (memcmp of
 * the frame against itself shifted by one) and that byte against the
 * sequence number. Reports JSON lines on stdout.
 *
 *   c_stream publish SOCKET STREAM SIZE COUNT SLOTS
 *   c_stream subscribe SOCKET STREAM COUNT CREDITS
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "memsock.h"

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what) {
    fprintf(stderr, "c_stream: %s: %s\n", what, memsock_last_error());
    return 1;
}

static int publish(memsock_client *client, const char *stream, size_t size, uint64_t count, uint32_t slots) {
    memsock_stream_config config;
    memsock_stream_config_init(&config);
    config.slot_size = (uint32_t)size;
    config.slot_count = slots;
    config.timestamps = false;
    memsock_publisher *pub;
    if (memsock_publisher_create(client, stream, &config, &pub) != MEMSOCK_OK) {
        return fail("publish");
    }
    printf("{\"ready\": true}\n");
    fflush(stdout);
    for (uint64_t seq = 0; seq < count; seq++) {
        void *data;
        size_t capacity;
        if (memsock_publisher_loan(pub, &data, &capacity) != MEMSOCK_OK) {
            return fail("loan");
        }
        memset(data, (int)(seq & 0xff), size);
        if (memsock_publisher_send_timeout(pub, size, -1) != MEMSOCK_OK) {
            return fail("send");
        }
    }
    printf("{\"sent\": %" PRIu64 "}\n", count);
    fflush(stdout);
    memsock_publisher_free(pub);
    return 0;
}

static int subscribe(memsock_client *client, const char *stream, uint64_t count, uint32_t credits) {
    memsock_subscribe_options options;
    memsock_subscribe_options_init(&options);
    options.credits = credits;
    options.policy = MEMSOCK_LOSSLESS;
    options.wait = MEMSOCK_WAIT_SPIN;
    options.wait_for_stream = true;
    memsock_subscriber *sub;
    if (memsock_subscriber_create(client, stream, &options, &sub) != MEMSOCK_OK) {
        return fail("subscribe");
    }
    uint64_t bad = 0, start = 0;
    for (uint64_t i = 0; i < count; i++) {
        memsock_sample s;
        memsock_status st;
        while ((st = memsock_subscriber_recv(sub, -1, &s)) == MEMSOCK_PUBLISHER_BACK) {
        }
        if (st != MEMSOCK_OK) {
            return fail("receive");
        }
        if (i == 0) {
            start = now_ns();
        }
        const unsigned char *p = s.data;
        bad += s.len == 0 || p[0] != (unsigned char)(s.seq & 0xff) || memcmp(p, p + 1, s.len - 1) != 0;
        memsock_sample_release(sub, &s);
    }
    uint64_t ns = now_ns() - start;
    printf("{\"received\": %" PRIu64 ", \"bad\": %" PRIu64 ", \"ns\": %" PRIu64 "}\n", count, bad, ns);
    fflush(stdout);
    memsock_subscriber_free(sub);
    return 0;
}

int main(int argc, char **argv) {
    memsock_client *client;
    if (argc < 3 || memsock_connect(argv[2], &client) != MEMSOCK_OK) {
        return argc < 3 ? 2 : fail("connect");
    }
    int code = 2;
    if (argc == 7 && strcmp(argv[1], "publish") == 0) {
        code = publish(client, argv[3], strtoull(argv[4], NULL, 10), strtoull(argv[5], NULL, 10),
                       (uint32_t)strtoul(argv[6], NULL, 10));
    } else if (argc == 6 && strcmp(argv[1], "subscribe") == 0) {
        code = subscribe(client, argv[3], strtoull(argv[4], NULL, 10), (uint32_t)strtoul(argv[5], NULL, 10));
    } else {
        fprintf(stderr, "usage: c_stream publish SOCKET STREAM SIZE COUNT SLOTS | subscribe SOCKET STREAM COUNT CREDITS\n");
    }
    memsock_client_free(client);
    return code;
}
