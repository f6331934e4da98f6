/* Prints what a stream carries: one line per frame (sequence number, length,
 * age, first bytes), and the publisher's comings and goings, until the
 * stream closes or MAX frames came.
 *
 *   print_subscriber [--socket PATH] STREAM [MAX]
 *
 * Build: cc -std=c11 print_subscriber.c $(pkg-config --cflags --libs memsock)
 */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "memsock.h"

static memsock_subscriber *sub;

/* Ctrl-C ends the wait (memsock_subscriber_interrupt is signal-safe). */
static void on_interrupt(int signo) {
    (void)signo;
    memsock_subscriber_interrupt(sub);
}

int main(int argc, char **argv) {
    const char *socket = NULL;
    int arg = 1;
    if (argc > 2 && strcmp(argv[1], "--socket") == 0) {
        socket = argv[2];
        arg = 3;
    }
    if (argc - arg < 1 || argc - arg > 2) {
        fprintf(stderr, "usage: %s [--socket PATH] STREAM [MAX]\n", argv[0]);
        return 2;
    }
    const char *stream = argv[arg];
    uint64_t max = argc - arg == 2 ? strtoull(argv[arg + 1], NULL, 10) : UINT64_MAX;

    memsock_client *client;
    memsock_subscribe_options options;
    memsock_subscribe_options_init(&options);
    options.wait_for_stream = true;
    memsock_status st = memsock_connect(socket, &client);
    if (st == MEMSOCK_OK) {
        st = memsock_subscriber_create(client, stream, &options, &sub);
    }
    if (st != MEMSOCK_OK) {
        fprintf(stderr, "print_subscriber: %s\n", memsock_last_error());
        return 1;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_interrupt;
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    printf("-- subscribed to %s\n", stream);
    fflush(stdout);

    uint64_t frames = 0;
    while (frames < max) {
        memsock_sample sample;
        st = memsock_subscriber_recv(sub, -1, &sample);
        if (st == MEMSOCK_PUBLISHER_GONE || st == MEMSOCK_PUBLISHER_BACK) {
            printf("-- %s\n", memsock_status_str(st));
            continue;
        }
        if (st != MEMSOCK_OK) {
            printf("-- %s\n", memsock_status_str(st)); /* closed, interrupted, ... */
            break;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        printf("seq %" PRIu64 " len %zu", sample.seq, sample.len);
        if (sample.timestamp_ns != 0) {
            printf(" age %.1f us", (double)(now - sample.timestamp_ns) / 1e3);
        }
        printf(" |");
        const unsigned char *bytes = sample.data;
        for (size_t i = 0; i < sample.len && i < 16; i++) {
            printf(" %02x", bytes[i]);
        }
        printf("%s\n", sample.len > 16 ? " ..." : "");
        memsock_sample_release(sub, &sample);
        frames++;
    }
    fflush(stdout);
    memsock_subscriber_free(sub);
    memsock_client_free(client);
    return 0;
}
