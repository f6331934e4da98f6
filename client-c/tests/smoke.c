/* The C API against a real broker: connecting, errors with their
 * messages, stats, closing. Usage: smoke SOCKET_PATH. Ends with a line
 * "N passed, N failed". */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "memsock.h"

static int passed, failed;

static void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAILED: %s (last error: %s)\n", what, memsock_last_error());
    }
}

/* Interrupts: a receive blocked in another thread, and one in a thread
 * whose signal handler interrupts it. */
static memsock_subscriber *interrupted_sub;

static void *blocked_receive(void *arg) {
    memsock_sample sample;
    *(memsock_status *)arg = memsock_subscriber_recv(interrupted_sub, -1, &sample);
    return NULL;
}

static void on_signal(int signo) {
    (void)signo;
    memsock_subscriber_interrupt(interrupted_sub);
}

static void check_interrupts(memsock_publisher *pub, memsock_subscriber *sub) {
    memsock_sample sample;
    check(memsock_subscriber_interrupt(NULL) == MEMSOCK_INVALID_ARGUMENT, "interrupt NULL");
    check(memsock_subscriber_interrupt(sub) == MEMSOCK_OK, "interrupt");
    check(memsock_subscriber_try_recv(sub, &sample) == MEMSOCK_INTERRUPTED, "the next receive reports it");
    check(strstr(memsock_last_error(), "interrupt") != NULL, "and says so");
    check(memsock_subscriber_try_recv(sub, &sample) == MEMSOCK_WOULD_BLOCK, "once");
    memsock_subscriber_interrupt(sub);
    memsock_subscriber_interrupt(sub);
    check(memsock_subscriber_recv(sub, -1, &sample) == MEMSOCK_INTERRUPTED, "a pending interrupt ends a wait at once");
    check(memsock_subscriber_recv(sub, 0, &sample) == MEMSOCK_TIMEOUT, "two before a receive count as one");
    check(memsock_publisher_send_copy(pub, "f", 1, -1) == MEMSOCK_OK, "a frame queued");
    memsock_subscriber_interrupt(sub);
    check(memsock_subscriber_recv(sub, -1, &sample) == MEMSOCK_INTERRUPTED, "the interrupt comes before it");
    check(memsock_subscriber_recv(sub, -1, &sample) == MEMSOCK_OK && sample.len == 1, "then the frame");
    check(memsock_sample_release(sub, &sample) == MEMSOCK_OK, "released");

    /* Another thread blocked without end: whether the interrupt comes
     * before it sleeps or after, it returns MEMSOCK_INTERRUPTED. */
    interrupted_sub = sub;
    memsock_status status = MEMSOCK_OK;
    pthread_t thread;
    check(pthread_create(&thread, NULL, blocked_receive, &status) == 0, "a receiving thread");
    check(memsock_subscriber_interrupt(sub) == MEMSOCK_OK, "interrupted from this thread");
    pthread_join(thread, NULL);
    check(status == MEMSOCK_INTERRUPTED, "the blocked receive returned MEMSOCK_INTERRUPTED");

    /* A signal handler in the blocked thread itself. */
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    check(sigaction(SIGUSR1, &action, NULL) == 0, "a handler");
    status = MEMSOCK_OK;
    check(pthread_create(&thread, NULL, blocked_receive, &status) == 0, "another receiving thread");
    check(pthread_kill(thread, SIGUSR1) == 0, "signalled");
    pthread_join(thread, NULL);
    check(status == MEMSOCK_INTERRUPTED, "the handler's interrupt ended its receive");
    check(memsock_subscriber_try_recv(sub, &sample) == MEMSOCK_WOULD_BLOCK, "nothing left over");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    check(strcmp(memsock_version(), "0.1.0") == 0, "version");
    check(strcmp(memsock_status_str(MEMSOCK_OK), "ok") == 0, "status_str");
    check(strcmp(memsock_status_str(MEMSOCK_NO_SUCH_STREAM), "no such stream") == 0, "status_str of a refusal");
    check(strcmp(memsock_status_str(-7), "unknown status") == 0, "status_str of no status");
    check(strcmp(memsock_last_error(), "") == 0, "no error yet");

    memsock_client *client = NULL;
    check(memsock_connect(argv[1], NULL) == MEMSOCK_INVALID_ARGUMENT, "NULL out is refused");
    check(strstr(memsock_last_error(), "out is NULL") != NULL, "and said so");
    check(memsock_connect("/nonexistent/memsock.sock", &client) == MEMSOCK_BROKER_UNREACHABLE,
          "no broker there");
    check(strstr(memsock_last_error(), "/nonexistent/memsock.sock") != NULL, "the message names the path");
    check(client == NULL, "no client on failure");

    check(memsock_connect(argv[1], &client) == MEMSOCK_OK, "connect");
    if (client == NULL) {
        printf("%d passed, %d failed\n", passed, failed + 1);
        return 1;
    }
    check(memsock_client_broker_gone(client) == 0 && memsock_client_broker_gone(NULL) == 0,
          "the broker is there (and NULL has none gone)");
    char *json = NULL;
    check(memsock_stats_json(client, NULL, &json) == MEMSOCK_OK, "stats");
    check(json != NULL && strstr(json, "\"broker_pid\"") != NULL, "stats are JSON with the broker's pid");
    memsock_string_free(json);
    check(memsock_stats_json(client, "nope", &json) == MEMSOCK_NO_SUCH_STREAM, "stats of an unknown stream");
    check(strstr(memsock_last_error(), "nope") != NULL, "the message names the stream");
    check(memsock_close_stream(client, "nope") == MEMSOCK_NO_SUCH_STREAM, "close an unknown stream");
    check(memsock_close_stream(client, NULL) == MEMSOCK_INVALID_ARGUMENT, "close NULL");
    check(memsock_close_stream(NULL, "x") == MEMSOCK_INVALID_ARGUMENT, "close on a NULL client");
    check(memsock_stats_json(client, NULL, NULL) == MEMSOCK_INVALID_ARGUMENT, "stats into NULL");

    /* Publishing. */
    memsock_stream_config config;
    check(memsock_stream_config_init(&config) == MEMSOCK_OK, "config defaults");
    check(config.size == sizeof config && config.slot_size == 4096 && config.slot_count == 16, "its defaults");
    config.slot_size = 64;
    config.slot_count = 8;
    memsock_publisher *pub = NULL;
    check(memsock_publisher_create(client, "c-pub", NULL, &pub) == MEMSOCK_INVALID_ARGUMENT, "NULL config");
    memsock_stream_config unsized = config;
    unsized.size = 3;
    check(memsock_publisher_create(client, "c-pub", &unsized, &pub) == MEMSOCK_INVALID_ARGUMENT, "config not init");
    check(strstr(memsock_last_error(), "memsock_stream_config_init") != NULL, "says how to fill it");
    memsock_stream_config bad = config;
    bad.slot_count = 1;
    check(memsock_publisher_create(client, "c-pub", &bad, &pub) == MEMSOCK_INVALID_ARGUMENT, "one slot refused");
    check(memsock_publisher_create(client, "c-pub", &config, &pub) == MEMSOCK_OK, "publisher");
    memsock_publisher *second = NULL;
    check(memsock_publisher_create(client, "c-pub", &config, &second) == MEMSOCK_REFUSED, "a second publisher");
    check(strstr(memsock_last_error(), "already has a publisher") != NULL, "is refused with the reason");
    check(memsock_publisher_send(pub, 1) == MEMSOCK_INVALID_ARGUMENT, "send without a loan");
    void *data = NULL;
    size_t capacity = 0;
    check(memsock_publisher_loan(pub, &data, &capacity) == MEMSOCK_OK && capacity == 64, "loan");
    void *again = NULL;
    check(memsock_publisher_loan(pub, &again, &capacity) == MEMSOCK_OK && again == data, "the same loan again");
    memcpy(data, "hello", 5);
    check(memsock_publisher_send(pub, 65) == MEMSOCK_INVALID_ARGUMENT, "more than the slot");
    check(memsock_publisher_send(pub, 5) == MEMSOCK_OK, "the loan stayed current: sent");
    check(memsock_publisher_loan(pub, &data, &capacity) == MEMSOCK_OK, "another loan");
    /* A forked child does not get the parent's current loan (the parent
     * is filling that slot): its loan is refused. It reports through a
     * pipe and ends by SIGKILL, so that no exit-time check (valgrind's
     * leak check of the child) changes its answer. */
    int report[2];
    check(pipe(report) == 0, "a pipe");
    pid_t child = fork();
    if (child == 0) {
        void *theirs = NULL;
        size_t cap = 0;
        memsock_status st = memsock_publisher_loan(pub, &theirs, &cap);
        memsock_status sent = memsock_publisher_send(pub, 1);
        char verdict = st == MEMSOCK_FORKED && theirs == NULL && sent == MEMSOCK_FORKED ? 'y'
                       : theirs == data                                                ? 'p'
                                                                                       : 'n';
        if (write(report[1], &verdict, 1) != 1) {
            _exit(1);
        }
        raise(SIGKILL);
    }
    char verdict = 0;
    check(child > 0 && read(report[0], &verdict, 1) == 1 && waitpid(child, NULL, 0) == child, "forked");
    check(verdict == 'y', "a forked child's loan and send are refused");
    close(report[0]);
    close(report[1]);
    void *same = NULL;
    check(memsock_publisher_loan(pub, &same, &capacity) == MEMSOCK_OK && same == data, "the parent's loan stays");
    check(memsock_publisher_discard(pub) == MEMSOCK_OK, "discarded");
    check(memsock_publisher_send_copy(pub, "copy", 4, 0) == MEMSOCK_OK, "send a copy");
    check(memsock_publisher_send_copy(pub, NULL, 4, 0) == MEMSOCK_INVALID_ARGUMENT, "copy from NULL");
    char big[65] = {0};
    check(memsock_publisher_send_copy(pub, big, sizeof big, 0) == MEMSOCK_INVALID_ARGUMENT, "copy too big");
    check(memsock_stats_json(client, "c-pub", &json) == MEMSOCK_OK, "its stats");
    check(json != NULL && strstr(json, "\"published\":2") != NULL, "two frames published");
    memsock_string_free(json);
    check(memsock_publisher_loan(pub, &data, &capacity) == MEMSOCK_OK, "a loan current at the close");
    check(memsock_close_stream(client, "c-pub") == MEMSOCK_OK, "close it");
    check(memsock_publisher_send(pub, 1) == MEMSOCK_CLOSED, "its send after the close");
    check(memsock_publisher_send(pub, 1) == MEMSOCK_INVALID_ARGUMENT, "the loan is gone with it");
    check(memsock_publisher_loan(pub, &data, &capacity) == MEMSOCK_CLOSED, "no loan after the close");
    check(memsock_publisher_send_copy(pub, "late", 4, 0) == MEMSOCK_CLOSED, "a send after the close");
    memsock_publisher_free(pub);
    memsock_publisher_free(NULL);
    check(memsock_publisher_send(NULL, 1) == MEMSOCK_INVALID_ARGUMENT, "send on NULL");

    /* History: the last value outlives its publisher; a subscriber that
     * comes later gets it first, flagged; one that declines does not. */
    memsock_stream_config keeping = config;
    keeping.history = 1;
    check(memsock_publisher_create(client, "c-state", &keeping, &pub) == MEMSOCK_OK, "a publisher keeping 1");
    check(memsock_publisher_send_copy(pub, "old", 3, 0) == MEMSOCK_OK, "an old value");
    check(memsock_publisher_send_copy(pub, "now", 3, 0) == MEMSOCK_OK, "the current value");
    memsock_publisher_free(pub);
    memsock_subscribe_options late;
    check(memsock_subscribe_options_init(&late) == MEMSOCK_OK && late.history == UINT32_MAX, "history: all by default");
    late.credits = 2;
    memsock_subscriber *reader = NULL;
    check(memsock_subscriber_create(client, "c-state", &late, &reader) == MEMSOCK_OK, "a late reader");
    memsock_sample value;
    check(memsock_subscriber_recv(reader, 5000000000, &value) == MEMSOCK_OK && value.len == 3 &&
              memcmp(value.data, "now", 3) == 0 && value.seq == 1 && (value.flags & MEMSOCK_SAMPLE_HISTORY),
          "gets the current value, flagged as history");
    check(memsock_sample_release(reader, &value) == MEMSOCK_OK, "released");
    late.history = 0;
    memsock_subscriber *decliner = NULL;
    check(memsock_subscriber_create(client, "c-state", &late, &decliner) == MEMSOCK_OK, "a reader declining it");
    check(memsock_subscriber_try_recv(decliner, &value) == MEMSOCK_WOULD_BLOCK, "gets nothing");
    memsock_subscriber_free(decliner);
    memsock_subscriber_free(reader);
    check(memsock_close_stream(client, "c-state") == MEMSOCK_OK, "closed, it goes");

    /* Subscribing: a lossless subscriber gets every frame, byte-exact. */
    memsock_subscribe_options options;
    check(memsock_subscribe_options_init(&options) == MEMSOCK_OK && options.size == sizeof options, "options");
    memsock_subscriber *sub = NULL;
    check(memsock_subscriber_create(client, "c-sub", &options, &sub) == MEMSOCK_NO_SUCH_STREAM, "no stream yet");
    check(memsock_publisher_create(client, "c-sub", &config, &pub) == MEMSOCK_OK, "its publisher");
    options.credits = 4;
    options.policy = 7;
    check(memsock_subscriber_create(client, "c-sub", &options, &sub) == MEMSOCK_INVALID_ARGUMENT, "no such policy");
    options.policy = MEMSOCK_LOSSLESS;
    check(memsock_subscriber_create(client, "c-sub", &options, &sub) == MEMSOCK_OK, "subscriber");
    memsock_sample sample;
    check(memsock_subscriber_try_recv(sub, &sample) == MEMSOCK_WOULD_BLOCK, "nothing yet");
    check(memsock_subscriber_recv(sub, 1000000, &sample) == MEMSOCK_TIMEOUT, "a millisecond of nothing");
    unsigned sent = 0, received = 0, exact = 1, blocked = 0;
    uint64_t first_seq = 0;
    while (received < 1000) {
        while (sent < 1000) {
            if (memsock_publisher_loan(pub, &data, &capacity) != MEMSOCK_OK) {
                break;
            }
            unsigned len = 1 + sent % 64;
            for (unsigned i = 0; i < len; i++) {
                ((unsigned char *)data)[i] = (unsigned char)(sent * 7 + i);
            }
            memsock_status st = memsock_publisher_send(pub, len);
            if (st == MEMSOCK_WOULD_BLOCK) {
                blocked++;
                break; /* the loan stays current: sent again after receiving */
            }
            sent++;
        }
        while (memsock_subscriber_try_recv(sub, &sample) == MEMSOCK_OK) {
            if (received == 0) {
                first_seq = sample.seq;
            }
            unsigned len = 1 + received % 64;
            exact = exact && sample.len == len && sample.seq == first_seq + received;
            for (unsigned i = 0; exact && i < len; i++) {
                exact = ((const unsigned char *)sample.data)[i] == (unsigned char)(received * 7 + i);
            }
            exact = exact && memsock_sample_release(sub, &sample) == MEMSOCK_OK && sample.data == NULL;
            received++;
        }
    }
    check(sent == 1000 && received == 1000 && exact, "1000 frames, in order, byte-exact, each released");
    check(blocked > 0, "the lossless subscriber made the publisher wait");
    check(memsock_sample_release(sub, &sample) == MEMSOCK_INVALID_ARGUMENT, "a second release is refused");
    /* A copy of a released sample cannot release another's slot. */
    memsock_sample held[4], copy;
    for (int i = 0; i < 4; i++) {
        check(memsock_publisher_send_copy(pub, "x", 1, 0) == MEMSOCK_OK, "send for holding");
        check(memsock_subscriber_try_recv(sub, &held[i]) == MEMSOCK_OK, "hold");
    }
    check(memsock_subscriber_try_recv(sub, &sample) == MEMSOCK_CREDITS_EXHAUSTED, "every credit held");
    check(strstr(memsock_last_error(), "release one") != NULL, "and what to do");
    void *full = NULL, *again_full = NULL;
    check(memsock_publisher_loan(pub, &full, &capacity) == MEMSOCK_OK, "a loan for a full subscriber");
    check(memsock_publisher_send_timeout(pub, 1, 1000000) == MEMSOCK_TIMEOUT, "a millisecond without room");
    check(memsock_publisher_send(pub, 1) == MEMSOCK_WOULD_BLOCK, "no room at once either");
    check(memsock_publisher_loan(pub, &again_full, &capacity) == MEMSOCK_OK && again_full == full,
          "the loan stayed current");
    check(memsock_publisher_discard(pub) == MEMSOCK_OK, "and is discarded");
    copy = held[0];
    check(memsock_sample_release(sub, &held[0]) == MEMSOCK_OK, "release the first");
    check(memsock_sample_release(sub, &copy) == MEMSOCK_INVALID_ARGUMENT, "its copy is refused");
    for (int i = 1; i < 4; i++) {
        check(memsock_sample_release(sub, &held[i]) == MEMSOCK_OK, "the others are still theirs");
    }
    check(memsock_sample_release(sub, NULL) == MEMSOCK_INVALID_ARGUMENT, "release NULL");
    check(memsock_subscriber_set_credits(sub, 2) == MEMSOCK_OK, "fewer credits");
    check(memsock_subscriber_set_credits(sub, 7) == MEMSOCK_REFUSED, "more than the pool can promise");
    check(strstr(memsock_last_error(), "7 credits refused, 6 available") != NULL, "with the numbers");
    check(memsock_subscriber_set_credits(sub, 100) == MEMSOCK_INVALID_ARGUMENT, "more than the queue");
    /* A forked child cannot use its parent's handles: they say
     * MEMSOCK_FORKED, and freeing them leaves the parent's lease alone.
     * (Through a pipe and SIGKILL, as above.) */
    memsock_sample kept;
    check(memsock_publisher_send_copy(pub, "k", 1, -1) == MEMSOCK_OK &&
              memsock_subscriber_recv(sub, -1, &kept) == MEMSOCK_OK,
          "a sample held across the fork");
    check(pipe(report) == 0, "another pipe");
    pid_t forked = fork();
    if (forked == 0) {
        memsock_sample got;
        void *slot = NULL;
        size_t room = 0;
        int ok = memsock_sample_release(sub, &kept) == MEMSOCK_FORKED &&
                 memsock_subscriber_try_recv(sub, &got) == MEMSOCK_FORKED &&
                 memsock_publisher_loan(pub, &slot, &room) == MEMSOCK_FORKED &&
                 memsock_close_stream(client, "c-sub") == MEMSOCK_FORKED &&
                 strstr(memsock_last_error(), "fork") != NULL;
        memsock_subscriber_free(sub);
        memsock_publisher_free(pub);
        memsock_client_free(client);
        char answer = ok ? 'y' : 'n';
        if (write(report[1], &answer, 1) != 1) {
            _exit(1);
        }
        raise(SIGKILL);
    }
    char answer = 0;
    check(forked > 0 && read(report[0], &answer, 1) == 1 && waitpid(forked, NULL, 0) == forked, "forked again");
    check(answer == 'y', "a forked child's copies of the handles say MEMSOCK_FORKED");
    close(report[0]);
    close(report[1]);
    check(memsock_sample_release(sub, &kept) == MEMSOCK_OK, "the parent releases the sample the child could not");
    check(memsock_publisher_send_copy(pub, "p", 1, -1) == MEMSOCK_OK &&
              memsock_subscriber_recv(sub, -1, &sample) == MEMSOCK_OK && sample.len == 1,
          "the parent's handles go on after the child freed its copies");
    check(memsock_sample_release(sub, &sample) == MEMSOCK_OK, "and its sample goes back");
    check_interrupts(pub, sub);
    uint64_t generation = memsock_subscriber_publisher_generation(sub);
    memsock_publisher_free(pub);
    check(memsock_subscriber_recv(sub, -1, &sample) == MEMSOCK_PUBLISHER_GONE, "its publisher went");
    check(memsock_subscriber_publisher_generation(sub) != generation, "a new publisher generation");
    check(memsock_close_stream(client, "c-sub") == MEMSOCK_OK, "closed");
    check(memsock_subscriber_recv(sub, -1, &sample) == MEMSOCK_CLOSED, "the subscriber sees the end");
    memsock_subscriber_free(sub);
    memsock_subscriber_free(NULL);

    memsock_client_free(client);
    memsock_client_free(NULL);
    memsock_string_free(NULL);

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
