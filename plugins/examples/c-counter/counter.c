/*
 * c-counter: a minimal hubagent library plugin in C.
 *
 * Publishes {"count": N, "step": S} every `interval` (settings: {"interval": "1s", "step": 1},
 * the duration format of every hubagent setting: "500ms", "5s", "2m", "1h"); refuses a step of 0
 * or an interval below 10 ms. `interval_ms` (a number of milliseconds), which older
 * configurations of this example use, is still read when `interval` is absent. Settings are read
 * with the agent's accessors (ABI 1.2, hubagent_setting_* in hubagent_plugin.h): no JSON code
 * here, and a wrong value is refused with a reason naming its key. At start it reports
 * {"unit": "counts"} as its own reported property. Direct methods (ABI 1.1):
 * `<plugin name>.get` answers {"count": N}; `<plugin name>.reset` sets the count to the number in
 * its payload (0 when there is none) and answers the old count. Cloud-to-device messages with
 * the property to=counter are taken: a body that is a number is added to the count, anything else
 * is refused (the hub keeps the message). Build:
 *
 *     gcc -shared -fPIC -O2 -Wall -Wextra -pthread -I ../../sdk/include counter.c -o libc_counter.so
 *
 * or, with the hubagent-dev package installed:
 *
 *     cc $(pkg-config --cflags hubagent-plugin) -shared -fPIC -O2 -Wall -pthread counter.c -o libc_counter.so
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hubagent_plugin.h"

typedef struct counter {
    const hubagent_host_api *host;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stopping;
    unsigned changes; /* bumped by each settings change: a new interval starts now */
    long interval_ms;
    long step;
    long count;
} counter;

/* Reads the settings into interval/step; writes why to `why` and returns -1 when unusable. */
static int parse_settings(const hubagent_host_api *host, hubagent_str settings, long *interval_ms,
                          long *step, hubagent_buf *why) {
    uint64_t interval = 1000, legacy_ms = 0;
    double step_value = 1, legacy = 0;
    if (hubagent_setting_duration_ms(host, settings, "interval", 0, &interval, why) != HUBAGENT_OK ||
        hubagent_setting_number(host, settings, "interval_ms", 0, &legacy, why) != HUBAGENT_OK ||
        hubagent_setting_number(host, settings, "step", 1, &step_value, why) != HUBAGENT_OK) {
        return -1;
    }
    legacy_ms = legacy > 0 ? (uint64_t)legacy : 0;
    if (interval == 0) interval = legacy_ms ? legacy_ms : 1000;
    if (interval < 10) {
        hubagent_buf_set(why, "settings.interval: must be at least 10ms");
        return -1;
    }
    if (step_value != (double)(long)step_value) {
        hubagent_buf_set(why, "settings.step: must be a whole number");
        return -1;
    }
    if ((long)step_value == 0) {
        hubagent_buf_set(why, "step must not be 0");
        return -1;
    }
    *interval_ms = (long)interval;
    *step = (long)step_value;
    return 0;
}

static void *run(void *arg) {
    counter *c = arg;
    pthread_mutex_lock(&c->lock);
    while (!c->stopping) {
        unsigned seen = c->changes;
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += c->interval_ms / 1000;
        until.tv_nsec += (c->interval_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        int elapsed = 0;
        while (!c->stopping && c->changes == seen && !elapsed) {
            elapsed = pthread_cond_timedwait(&c->wake, &c->lock, &until) == ETIMEDOUT;
        }
        if (c->stopping) break;
        if (!elapsed) continue; /* new settings: wait the new interval from now */
        c->count += c->step;
        char body[128];
        int n = snprintf(body, sizeof body, "{\"count\": %ld, \"step\": %ld}", c->count, c->step);
        pthread_mutex_unlock(&c->lock);

        hubagent_property props[1] = {{hubagent_str_from("example"), hubagent_str_from("c-counter")}};
        hubagent_message m;
        memset(&m, 0, sizeof m);
        m.struct_size = sizeof m;
        m.body.ptr = (const uint8_t *)body;
        m.body.len = (size_t)n;
        m.content_type = hubagent_str_from("application/json");
        m.content_encoding = hubagent_str_from("utf-8");
        m.properties = props;
        m.property_count = 1;
        /* Blocks until the message is on disk in the agent's queue. */
        int32_t rc = c->host->publish(c->host->ctx, &m);
        if (rc == HUBAGENT_ERR_STOPPING) {
            pthread_mutex_lock(&c->lock);
            break;
        }
        if (rc != HUBAGENT_OK) {
            c->host->log(c->host->ctx, HUBAGENT_LOG_WARN, hubagent_str_from("a count was not published"));
        }
        pthread_mutex_lock(&c->lock);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static int32_t counter_start(const hubagent_host_api *host, hubagent_str settings, void **instance,
                             hubagent_buf *error) {
    long interval_ms, step;
    if (parse_settings(host, settings, &interval_ms, &step, error) != 0) return HUBAGENT_ERR_REJECTED;
    counter *c = calloc(1, sizeof *c);
    if (!c) {
        hubagent_buf_set(error, "out of memory");
        return HUBAGENT_ERR_FAILED;
    }
    c->host = host;
    c->interval_ms = interval_ms;
    c->step = step;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->wake, NULL);
    if (pthread_create(&c->thread, NULL, run, c) != 0) {
        free(c);
        hubagent_buf_set(error, "cannot start a thread");
        return HUBAGENT_ERR_FAILED;
    }
    host->log(host->ctx, HUBAGENT_LOG_INFO, hubagent_str_from("c-counter started"));
    /* Its own reported property, beside what the agent reports of it. */
    if (hubagent_report_properties(host, "{\"unit\": \"counts\"}", error) != HUBAGENT_OK) {
        host->log(host->ctx, HUBAGENT_LOG_WARN, hubagent_str_from("reported properties refused"));
    }
    *instance = c;
    return HUBAGENT_OK;
}

static int32_t counter_apply(void *instance, hubagent_str settings, hubagent_buf *reason) {
    counter *c = instance;
    long interval_ms, step;
    if (parse_settings(c->host, settings, &interval_ms, &step, reason) != 0) {
        return HUBAGENT_ERR_REJECTED;
    }
    pthread_mutex_lock(&c->lock);
    c->interval_ms = interval_ms;
    c->step = step;
    c->changes++;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    return HUBAGENT_OK;
}

/* Direct methods: "get" and "reset". The answer is JSON written to `answer`. */
static int32_t counter_method(void *instance, hubagent_str method, hubagent_str payload,
                              hubagent_buf *answer) {
    counter *c = instance;
    char text[128];
    pthread_mutex_lock(&c->lock);
    long old = c->count;
    int32_t status = 200;
    if (method.len == 3 && memcmp(method.ptr, "get", 3) == 0) {
        snprintf(text, sizeof text, "{\"count\": %ld}", old);
    } else if (method.len == 5 && memcmp(method.ptr, "reset", 5) == 0) {
        /* The payload is JSON: a number, or null when the caller sent none. */
        char *end;
        long to = strtol(payload.ptr, &end, 10);
        c->count = end == payload.ptr ? 0 : to;
        snprintf(text, sizeof text, "{\"was\": %ld, \"count\": %ld}", old, c->count);
    } else {
        status = 404; /* not reached: the agent only passes the declared methods */
        snprintf(text, sizeof text, "{\"error\": \"no such method\"}");
    }
    pthread_mutex_unlock(&c->lock);
    hubagent_buf_set(answer, text);
    return status;
}

/* A C2D message (property to=counter): a number in the body is added to the count. Returning
 * HUBAGENT_OK completes the message at the hub; a redelivery has the same message_id. */
static int32_t counter_c2d(void *instance, const hubagent_c2d_message *message,
                           hubagent_buf *reason) {
    counter *c = instance;
    char body[32];
    size_t n = message->body.len < sizeof body - 1 ? message->body.len : sizeof body - 1;
    memcpy(body, message->body.ptr, n);
    body[n] = 0;
    char *end;
    long add = strtol(body, &end, 10);
    if (end == body) {
        hubagent_buf_set(reason, "the body is not a number");
        return HUBAGENT_ERR_REJECTED;
    }
    pthread_mutex_lock(&c->lock);
    c->count += add;
    pthread_mutex_unlock(&c->lock);
    char line[160];
    snprintf(line, sizeof line, "C2D %.*s: added %ld", (int)message->message_id.len,
             message->message_id.ptr, add);
    c->host->log(c->host->ctx, HUBAGENT_LOG_INFO, hubagent_str_from(line));
    return HUBAGENT_OK;
}

static int32_t counter_stop(void *instance) {
    counter *c = instance;
    pthread_mutex_lock(&c->lock);
    c->stopping = 1;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->thread, NULL);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->wake);
    free(c);
    return HUBAGENT_OK;
}

static const hubagent_plugin_descriptor descriptor = {
    .magic = HUBAGENT_PLUGIN_MAGIC,
    .abi_major = HUBAGENT_PLUGIN_ABI_MAJOR,
    .abi_minor = HUBAGENT_PLUGIN_ABI_MINOR,
    .descriptor_size = sizeof(hubagent_plugin_descriptor),
    .host_api_size = sizeof(hubagent_host_api),
    .message_size = sizeof(hubagent_message),
    .reserved = 0,
    .name = "c-counter",
    .version = "1.0.0",
    .start = counter_start,
    .apply_settings = counter_apply,
    .stop = counter_stop,
    /* ABI 1.1: the methods (each name ends with a NUL; the string's own NUL ends the list) and
     * the C2D messages this plugin takes. */
    .methods = "get\0reset\0",
    .c2d_filter = "{\"to\": \"counter\"}",
    .invoke_method = counter_method,
    .receive_c2d = counter_c2d,
};

const hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void) { return &descriptor; }
