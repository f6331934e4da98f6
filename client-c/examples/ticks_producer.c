/* A market-data feed's shape (seed 003): 64-byte messages, an index and a
 * timestamp, published at full speed to stream "ticks". A lossless
 * subscriber (ticks_consumer.py) makes it wait rather than lose one.
 *
 *   ticks_producer [--socket PATH] COUNT
 *
 * Build: cc -std=c11 ticks_producer.c $(pkg-config --cflags --libs memsock)
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "memsock.h"

/* What goes into each slot: 64 bytes, as the Python side reads them. */
struct tick {
    uint64_t index;
    uint64_t timestamp_ns; /* CLOCK_MONOTONIC */
    double price;
    uint8_t reserved[40];
};
_Static_assert(sizeof(struct tick) == 64, "a tick is 64 bytes");

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what, memsock_status status) {
    fprintf(stderr, "ticks_producer: %s: %s\n", what, memsock_last_error());
    return status == MEMSOCK_OK ? 1 : (int)status;
}

int main(int argc, char **argv) {
    const char *socket = NULL; /* NULL: the default socket */
    int arg = 1;
    if (argc == 4 && strcmp(argv[1], "--socket") == 0) {
        socket = argv[2];
        arg = 3;
    }
    if (arg != argc - 1) {
        fprintf(stderr, "usage: %s [--socket PATH] COUNT\n", argv[0]);
        return 2;
    }
    uint64_t count = strtoull(argv[arg], NULL, 10);

    memsock_client *client;
    memsock_status st = memsock_connect(socket, &client);
    if (st != MEMSOCK_OK) {
        return fail("connect", st);
    }
    memsock_stream_config config;
    memsock_stream_config_init(&config);
    config.slot_size = sizeof(struct tick);
    config.slot_count = 1024;
    memsock_publisher *pub;
    if ((st = memsock_publisher_create(client, "ticks", &config, &pub)) != MEMSOCK_OK) {
        return fail("publish", st);
    }
    uint64_t start = now_ns();
    for (uint64_t i = 0; i < count; i++) {
        void *slot;
        size_t capacity;
        if ((st = memsock_publisher_loan(pub, &slot, &capacity)) != MEMSOCK_OK) {
            return fail("loan", st);
        }
        struct tick *t = slot; /* written in place, in shared memory */
        t->index = i;
        t->timestamp_ns = now_ns();
        t->price = 100.0 + (double)(i % 100) / 100.0;
        if ((st = memsock_publisher_send_timeout(pub, sizeof *t, -1)) != MEMSOCK_OK) {
            return fail("send", st);
        }
    }
    double seconds = (double)(now_ns() - start) / 1e9;
    printf("sent %" PRIu64 " ticks in %.3f s (%.2f M/s)\n", count, seconds, (double)count / seconds / 1e6);
    memsock_publisher_free(pub);
    memsock_client_free(client);
    return 0;
}
