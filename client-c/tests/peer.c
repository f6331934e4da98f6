/* A C peer for the cross-language tests (client-c/tests/test_cross_language.py):
 * publishes or receives the test pattern of tests/src/lib.rs (SplitMix64
 * frames of pseudo-random length) through libmemsock, and reports JSON
 * lines on stdout.
 *
 *   peer publish SOCKET STREAM COUNT SLOT_SIZE SLOTS
 *   peer subscribe SOCKET STREAM CREDITS SLOT_SIZE   (waits for the stream)
 *   peer hold SOCKET STREAM N                   (holds N frames until killed)
 *   peer broker-gone SOCKET                     (reads a line once the broker is dead)
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "memsock.h"

static uint64_t mix(uint64_t x) {
    uint64_t z = x + 0x9e3779b97f4a7c15u;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static size_t frame_len(uint64_t seq, size_t slot_size) {
    return 1 + (size_t)(mix(seq ^ 0xa5a5) % slot_size);
}

/* Frame `seq`'s bytes (little-endian words of a SplitMix64 chain). */
static void fill_frame(uint64_t seq, unsigned char *buf, size_t len) {
    uint64_t state = mix(seq);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        state = mix(state);
        for (int b = 0; b < 8; b++) {
            buf[i + b] = (unsigned char)(state >> (8 * b));
        }
    }
    uint64_t last = mix(state);
    for (int b = 0; i < len; i++, b++) {
        buf[i] = (unsigned char)(last >> (8 * b));
    }
}

static void say(const char *json) {
    printf("%s\n", json);
    fflush(stdout);
}

static int fail(const char *what, memsock_status status) {
    fprintf(stderr, "%s: %s: %s\n", what, memsock_status_str(status), memsock_last_error());
    return 1;
}

static int publish(memsock_client *client, const char *stream, uint64_t count, uint32_t slot_size, uint32_t slots) {
    memsock_stream_config config;
    memsock_stream_config_init(&config);
    config.slot_size = slot_size;
    config.slot_count = slots;
    memsock_publisher *pub = NULL;
    memsock_status st = memsock_publisher_create(client, stream, &config, &pub);
    if (st != MEMSOCK_OK) {
        return fail("publisher", st);
    }
    say("{\"ready\": true}");
    for (uint64_t seq = 0; seq < count; seq++) {
        void *data;
        size_t capacity;
        if ((st = memsock_publisher_loan(pub, &data, &capacity)) != MEMSOCK_OK) {
            return fail("loan", st);
        }
        size_t len = frame_len(seq, capacity);
        fill_frame(seq, data, len);
        if ((st = memsock_publisher_send_timeout(pub, len, -1)) != MEMSOCK_OK) {
            return fail("send", st);
        }
    }
    printf("{\"report\": {\"sent\": %" PRIu64 "}}\n", count);
    fflush(stdout);
    memsock_publisher_free(pub);
    return 0;
}

static int subscribe(memsock_client *client, const char *stream, uint32_t credits, size_t slot_size) {
    memsock_subscribe_options options;
    memsock_subscribe_options_init(&options);
    options.credits = credits;
    options.policy = MEMSOCK_LOSSLESS;
    options.wait_for_stream = true;
    memsock_subscriber *sub = NULL;
    memsock_status st = memsock_subscriber_create(client, stream, &options, &sub);
    if (st != MEMSOCK_OK) {
        return fail("subscriber", st);
    }
    say("{\"ready\": true}");
    unsigned char *expected = malloc(slot_size);
    if (expected == NULL) {
        return 1;
    }
    uint64_t received = 0, missing = 0, bad = 0, first = 0, last = 0;
    const char *end;
    for (;;) {
        memsock_sample sample;
        st = memsock_subscriber_recv(sub, 60 * 1000000000LL, &sample);
        if (st == MEMSOCK_PUBLISHER_GONE) {
            end = "publisher_gone";
            break;
        }
        if (st == MEMSOCK_CLOSED) {
            end = "closed";
            break;
        }
        if (st == MEMSOCK_PUBLISHER_BACK) {
            continue;
        }
        if (st != MEMSOCK_OK) {
            return fail("receive", st);
        }
        if (received == 0) {
            first = sample.seq;
        } else {
            missing += sample.seq - last - 1;
        }
        last = sample.seq;
        size_t len = frame_len(sample.seq, slot_size);
        if (sample.len != len) {
            bad++;
        } else {
            fill_frame(sample.seq, expected, len);
            bad += memcmp(expected, sample.data, len) != 0;
        }
        received++;
        if ((st = memsock_sample_release(sub, &sample)) != MEMSOCK_OK) {
            return fail("release", st);
        }
    }
    free(expected);
    printf("{\"report\": {\"received\": %" PRIu64 ", \"missing\": %" PRIu64 ", \"bad\": %" PRIu64
           ", \"first\": %" PRIu64 ", \"last\": %" PRIu64 ", \"end\": \"%s\"}}\n",
           received, missing, bad, first, last, end);
    fflush(stdout);
    memsock_subscriber_free(sub);
    return 0;
}

static int hold(memsock_client *client, const char *stream, unsigned n) {
    memsock_subscribe_options options;
    memsock_subscribe_options_init(&options);
    options.credits = n;
    options.policy = MEMSOCK_LOSSLESS;
    memsock_subscriber *sub = NULL;
    memsock_status st = memsock_subscriber_create(client, stream, &options, &sub);
    if (st != MEMSOCK_OK) {
        return fail("subscriber", st);
    }
    say("{\"ready\": true}");
    memsock_sample held[64];
    for (unsigned i = 0; i < n && i < 64;) {
        st = memsock_subscriber_recv(sub, -1, &held[i]);
        if (st == MEMSOCK_OK) {
            i++;
        } else if (st != MEMSOCK_PUBLISHER_BACK) {
            return fail("receive", st);
        }
    }
    printf("{\"holding\": %u}\n", n);
    fflush(stdout);
    for (;;) {
        pause(); /* until SIGKILL */
    }
}

/* Publishes and receives in one process; once the test has killed the
 * broker (a line on stdin), says what still works and what reports it. */
static int broker_gone(memsock_client *client, const char *socket) {
    memsock_stream_config config;
    memsock_stream_config_init(&config);
    config.slot_size = 64;
    memsock_publisher *pub = NULL;
    memsock_subscriber *sub = NULL;
    memsock_subscribe_options options;
    memsock_subscribe_options_init(&options);
    memsock_status st;
    if ((st = memsock_publisher_create(client, "gone", &config, &pub)) != MEMSOCK_OK ||
        (st = memsock_subscriber_create(client, "gone", &options, &sub)) != MEMSOCK_OK) {
        return fail("setup", st);
    }
    say("{\"ready\": true}");
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL) {
        return 1;
    }
    memsock_sample sample;
    memsock_status sent = memsock_publisher_send_copy(pub, "after", 5, 0);
    memsock_status got = memsock_subscriber_recv(sub, 10 * 1000000000LL, &sample);
    int exact = got == MEMSOCK_OK && sample.len == 5 && memcmp(sample.data, "after", 5) == 0;
    if (got == MEMSOCK_OK) {
        memsock_sample_release(sub, &sample);
    }
    char *json = NULL;
    memsock_status stats = memsock_stats_json(client, NULL, &json);
    char stats_error[256];
    snprintf(stats_error, sizeof stats_error, "%s", memsock_last_error());
    memsock_status credits = memsock_subscriber_set_credits(sub, 2);
    memsock_client *again = NULL;
    memsock_status reconnect = memsock_connect(socket, &again);
    char reconnect_error[512];
    snprintf(reconnect_error, sizeof reconnect_error, "%s", memsock_last_error());
    /* The messages are printed as JSON strings: they hold no quotes or
     * backslashes (checked by the test reading them). */
    printf("{\"report\": {\"sent\": \"%s\", \"received\": \"%s\", \"exact\": %s, \"stats\": \"%s\", "
           "\"stats_error\": \"%s\", \"set_credits\": \"%s\", \"connect\": \"%s\", \"connect_error\": \"%s\"}}\n",
           memsock_status_str(sent), memsock_status_str(got), exact ? "true" : "false", memsock_status_str(stats),
           stats_error, memsock_status_str(credits), memsock_status_str(reconnect), reconnect_error);
    fflush(stdout);
    memsock_subscriber_free(sub);
    memsock_publisher_free(pub);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ROLE SOCKET ...\n", argv[0]);
        return 2;
    }
    const char *role = argv[1];
    memsock_client *client = NULL;
    memsock_status st = memsock_connect(argv[2], &client);
    if (st != MEMSOCK_OK) {
        return fail("connect", st);
    }
    int code = 2;
    if (strcmp(role, "publish") == 0 && argc == 7) {
        code = publish(client, argv[3], strtoull(argv[4], NULL, 10), (uint32_t)strtoul(argv[5], NULL, 10),
                       (uint32_t)strtoul(argv[6], NULL, 10));
    } else if (strcmp(role, "subscribe") == 0 && argc == 6) {
        code = subscribe(client, argv[3], (uint32_t)strtoul(argv[4], NULL, 10), strtoull(argv[5], NULL, 10));
    } else if (strcmp(role, "hold") == 0 && argc == 5) {
        code = hold(client, argv[3], (unsigned)strtoul(argv[4], NULL, 10));
    } else if (strcmp(role, "broker-gone") == 0) {
        code = broker_gone(client, argv[2]);
    } else {
        fprintf(stderr, "bad arguments for role %s\n", role);
    }
    memsock_client_free(client);
    return code;
}
