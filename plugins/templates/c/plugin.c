/*
 * {{name}}: a hubagent library plugin in C. Every `interval` it publishes {"count": N},
 * counting up by `step`; the direct method `{{name}}.get` answers the count.
 *
 * Settings (a JSON object): `interval` (a duration: "500ms", "5s", "1m"; default "1s") and
 * `step` (a whole number, not 0; default 1). The small readers below understand exactly these
 * two keys; a plugin with richer settings would use a JSON library.
 *
 * Build: make                  (gcc -shared -fPIC -pthread -I . {{crate}}.c -o lib{{crate}}.so)
 * Try:   hubagent plugins try ./lib{{crate}}.so --settings '{"step": 2}'
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hubagent_plugin.h"

typedef struct plugin {
    const hubagent_host_api *host;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int stopping;
    long interval_ms;
    long step;
    long count;
} plugin;

/* The text after `"key":` in the settings, or NULL when the key is absent. */
static const char *value_of(hubagent_str json, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    size_t plen = strlen(pattern);
    for (size_t i = 0; i + plen <= json.len; i++) {
        if (memcmp(json.ptr + i, pattern, plen) != 0) continue;
        const char *p = json.ptr + i + plen;
        while (*p == ' ' || *p == '\t' || *p == ':') p++;
        return p;
    }
    return NULL;
}

/* Reads the settings; writes why to `why` and returns -1 when they are unusable. */
static int read_settings(hubagent_str json, long *interval_ms, long *step, hubagent_buf *why) {
    *interval_ms = 1000;
    *step = 1;
    const char *p = value_of(json, "interval");
    if (p) {
        char *end;
        errno = 0;
        double n = (*p == '"') ? strtod(p + 1, &end) : 0;
        double unit = 0;
        if (*p == '"' && end != p + 1 && !errno) {
            if (strncmp(end, "ms\"", 3) == 0) unit = 1;
            else if (strncmp(end, "s\"", 2) == 0) unit = 1000;
            else if (strncmp(end, "m\"", 2) == 0) unit = 60000;
            else if (strncmp(end, "h\"", 2) == 0) unit = 3600000;
        }
        if (unit == 0) {
            hubagent_buf_set(why, "interval must be a duration such as \"5s\" (ms, s, m, h)");
            return -1;
        }
        *interval_ms = (long)(n * unit);
        if (*interval_ms < 10) {
            hubagent_buf_set(why, "interval must be at least 10ms");
            return -1;
        }
    }
    p = value_of(json, "step");
    if (p) {
        char *end;
        errno = 0;
        *step = strtol(p, &end, 10);
        if (end == p || errno || *end == '.') {
            hubagent_buf_set(why, "step must be a whole number");
            return -1;
        }
        if (*step == 0) {
            hubagent_buf_set(why, "step must not be 0");
            return -1;
        }
    }
    return 0;
}

static void *run(void *arg) {
    plugin *c = arg;
    pthread_mutex_lock(&c->lock);
    while (!c->stopping) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += c->interval_ms / 1000;
        until.tv_nsec += (c->interval_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!c->stopping && pthread_cond_timedwait(&c->wake, &c->lock, &until) != ETIMEDOUT) {
        }
        if (c->stopping) break;
        c->count += c->step;
        char body[64];
        int n = snprintf(body, sizeof body, "{\"count\": %ld}", c->count);
        pthread_mutex_unlock(&c->lock);

        hubagent_message m;
        memset(&m, 0, sizeof m);
        m.struct_size = sizeof m;
        m.body.ptr = (const uint8_t *)body;
        m.body.len = (size_t)n;
        m.content_type = hubagent_str_from("application/json");
        m.content_encoding = hubagent_str_from("utf-8");
        /* Returns once the message is on disk in the agent's queue. */
        int32_t rc = c->host->publish(c->host->ctx, &m);
        pthread_mutex_lock(&c->lock);
        if (rc == HUBAGENT_ERR_STOPPING) break;
        if (rc != HUBAGENT_OK) {
            c->host->log(c->host->ctx, HUBAGENT_LOG_WARN, hubagent_str_from("a count was not published"));
        }
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static int32_t plugin_start(const hubagent_host_api *host, hubagent_str settings, void **instance,
                            hubagent_buf *error) {
    long interval_ms, step;
    if (read_settings(settings, &interval_ms, &step, error) != 0) return HUBAGENT_ERR_REJECTED;
    plugin *c = calloc(1, sizeof *c);
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
    host->log(host->ctx, HUBAGENT_LOG_INFO, hubagent_str_from("started"));
    *instance = c;
    return HUBAGENT_OK;
}

/* New settings: HUBAGENT_ERR_REJECTED with a reason refuses them (the old ones stay). */
static int32_t plugin_apply(void *instance, hubagent_str settings, hubagent_buf *reason) {
    plugin *c = instance;
    long interval_ms, step;
    if (read_settings(settings, &interval_ms, &step, reason) != 0) return HUBAGENT_ERR_REJECTED;
    pthread_mutex_lock(&c->lock);
    c->interval_ms = interval_ms;
    c->step = step;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    return HUBAGENT_OK;
}

static int32_t plugin_method(void *instance, hubagent_str method, hubagent_str payload,
                             hubagent_buf *answer) {
    (void)payload;
    plugin *c = instance;
    if (method.len == 3 && memcmp(method.ptr, "get", 3) == 0) {
        char text[64];
        pthread_mutex_lock(&c->lock);
        snprintf(text, sizeof text, "{\"count\": %ld}", c->count);
        pthread_mutex_unlock(&c->lock);
        hubagent_buf_set(answer, text);
        return 200;
    }
    hubagent_buf_set(answer, "{}");
    return 404;
}

static int32_t plugin_stop(void *instance) {
    plugin *c = instance;
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
    .name = "{{name}}",
    .version = "0.1.0",
    .start = plugin_start,
    .apply_settings = plugin_apply,
    .stop = plugin_stop,
    /* Each method name ends with a NUL; the string's own NUL ends the list. */
    .methods = "get\0",
    .invoke_method = plugin_method,
};

const hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void) { return &descriptor; }
