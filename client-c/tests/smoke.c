/* The C API against a real broker: connecting, errors with their
 * messages, stats, closing. Usage: smoke SOCKET_PATH. Ends with a line
 * "N passed, N failed". */
#include <stdio.h>
#include <string.h>

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
    memsock_client_free(client);
    memsock_client_free(NULL);
    memsock_string_free(NULL);

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
