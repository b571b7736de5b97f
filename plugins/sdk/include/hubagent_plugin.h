/*
 * hubagent_plugin.h - the hubagent plugin ABI, version 1 (minor 3).
 *
 * A plugin is a shared library (.so) that exports ONE symbol:
 *
 *     const hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void);
 *
 * The host (hubagent) calls it once after loading the library and checks the descriptor before
 * calling anything else. Everything that crosses the boundary is a plain C type: integers,
 * pointer + length byte buffers, and structs whose first field (or size field) lets them grow.
 *
 * ABI RULES
 *
 *  1. Versioning. The descriptor starts with HUBAGENT_PLUGIN_MAGIC, the ABI major and minor
 *     version the plugin was built against and the sizes of the structs as the plugin knows them.
 *     The host refuses a library whose magic or major version differs, whose minor version is
 *     newer than the host's, or whose struct sizes are smaller than the v1.0 ones. Minor versions
 *     only ever append fields at the end of structs; check `struct_size` before using a field
 *     added after 1.0.
 *
 *  2. Ownership. Every pointer passed in a call is BORROWED for the duration of that call:
 *       - host -> plugin: `settings_json` (UTF-8, also NUL-terminated for convenience; `len`
 *         excludes the NUL) is valid only until the callback returns. Copy what you keep.
 *       - plugin -> host: the message given to `publish` (body, strings, property array) is
 *         copied by the host before `publish` returns; the plugin frees its own memory.
 *       - reason / error texts: the host passes a `hubagent_buf` it owns; the plugin copies at
 *         most `cap` bytes of UTF-8 into `ptr` and sets `len`. Longer texts are truncated.
 *       - the descriptor and its `name` / `version` strings are static: valid forever.
 *       - the instance pointer returned by `start` belongs to the plugin; `stop` frees it.
 *       - the host API table passed to `start` stays valid until `stop` returns.
 *     Nothing is ever allocated on one side and freed on the other.
 *
 *  3. Threads. `start`, `apply_settings` and `stop` are called one at a time, from one host
 *     thread, and must return promptly (the host's `callback_timeout`, 10 s by default; a plugin
 *     that does not return in time is considered hung and is killed). A plugin does its work on
 *     threads it starts itself in `start` and joins in `stop`. The host API functions are
 *     thread-safe and may be called from any thread the plugin owns, between `start` and the
 *     return of `stop`; after that, `publish` returns HUBAGENT_ERR_STOPPING.
 *
 *  4. Publishing. `publish` blocks until the message is on disk in the agent's durable queue
 *     (then returns HUBAGENT_OK) or was refused: HUBAGENT_ERR_RATE_LIMITED (over the plugin's
 *     `max_rate`; the message was dropped and counted), HUBAGENT_ERR_TOO_LARGE,
 *     HUBAGENT_ERR_INVALID_ARGUMENT (bad struct or non-UTF-8 strings) or HUBAGENT_ERR_STOPPING
 *     (the plugin is being stopped: finish up). It may block for a while when the queue applies
 *     back-pressure (`full_policy = "reject-new"`).
 *
 *  5. Errors. Callbacks return HUBAGENT_OK or an error code. `apply_settings` returns
 *     HUBAGENT_ERR_REJECTED (with a reason) to refuse new settings: the plugin keeps running
 *     with its old ones and the agent reports the reason. `start` returning
 *     HUBAGENT_ERR_REJECTED means "these settings are unusable"; any other error from `start`
 *     counts as a failure and the plugin is restarted with backoff. No exception, longjmp or
 *     Rust panic may cross the boundary (the Rust SDK catches panics and returns
 *     HUBAGENT_ERR_PANICKED, which counts as a failure).
 *
 *  6. Health. `report_health(HUBAGENT_HEALTH_FAILED, ...)` asks the host to restart the plugin
 *     (it counts as a failure); DEGRADED and OK are reported as they are.
 *
 *  7. Lifetime. The host never unloads a library (no dlclose): a restart calls `start` again
 *     (in-process) or starts a fresh process (isolation = "process", the default). Library
 *     constructors/destructors must not depend on being unloaded.
 *
 *  8. Output. In a plugin process, the plugin's stdout and stderr are captured as log lines;
 *     they do not disturb the host's protocol. Prefer `log`.
 *
 *  9. Methods and C2D (ABI 1.1). `methods` lists the direct methods the plugin answers; the
 *     agent routes the hub's method `<plugin name>.<method>` to `invoke_method`, which returns
 *     the status (200..599) and writes its JSON answer (empty = null) into `answer`. `c2d_filter`
 *     says which cloud-to-device messages the plugin takes (a JSON object of application
 *     property equalities, "{}" = all); `receive_c2d` returns HUBAGENT_OK once the plugin has
 *     the message (only then is it completed at the hub), anything else leaves it with the
 *     hub, which delivers it again with the same `message_id`. Both are callbacks like
 *     `apply_settings` (rule 3): one at a time, on the host's thread; a method that takes longer
 *     than the plugin's `method_timeout` gets 504 and holds back the callbacks after it.
 *     The host reads these four fields only when `descriptor_size` covers them: a plugin built
 *     against ABI 1.0 keeps working and offers neither.
 *
 * 10. Settings, reported properties, creation time (ABI 1.2). The host API table appends
 *     `setting_string`, `setting_number`, `setting_bool` and `setting_duration_ms`: one value of
 *     a settings JSON (the text `start` and `apply_settings` receive) by key, parsed by the
 *     host, so a C plugin needs no JSON library. A key may be a dotted path ("db.host"; twin
 *     property names cannot contain '.'). They return HUBAGENT_OK, HUBAGENT_ERR_NOT_FOUND (no
 *     such key, or null: keep your default) or HUBAGENT_ERR_INVALID_ARGUMENT with a reason that
 *     names the key ("settings.interval: 'soon' is not a duration ...") - pass it on as the
 *     rejection reason. Durations are written "500ms", "5s", "2m", "1h" (a bare number is read as
 *     seconds, as older settings write it). Use the hubagent_setting_* helpers below: they check
 *     `struct_size` and fill in the default. They may be called from any callback or thread.
 *     `report_properties` sets the plugin's own reported properties
 *     (`reported.plugins.<name>.properties`), a JSON object replacing the last one; it is refused
 *     with the reason when IoT Hub would refuse it (property names with '.', '$', ' ' or control
 *     characters or over 1 KB, strings over 4 KB, integers beyond +-2^52, null in arrays, nesting
 *     below level 10 of `reported`) or it is over 4 KB as the hub counts. `hubagent_message`
 *     appends `creation_time_ms` (milliseconds since the Unix epoch, UTC; 0 = when published),
 *     sent as the message's creation time (IoT Hub's `iothub-creation-time-utc`). A 1.2 plugin
 *     needs a 1.2 agent (rule 1); a 1.0 or 1.1 plugin keeps working unchanged.
 *
 * 11. Batches (ABI 1.3). `publish_batch(ctx, messages, count, results)` publishes `count`
 *     messages (an array of pointers, each message as `publish` takes it, borrowed for the call)
 *     with one round trip to the agent: the host sends them to the daemon in one frame and the
 *     queue appends them with one write and one sync. It makes the same promise as `publish`:
 *     when it returns, every message whose result is HUBAGENT_OK is on disk in the durable
 *     queue and survives a kill -9 of the agent. Outcomes are PER MESSAGE, not all-or-none:
 *     `results` (NULL, or `count` entries the host fills) gets, for each message, exactly the
 *     code `publish` would have returned for it - HUBAGENT_ERR_RATE_LIMITED for each one over
 *     `max_rate` (the rate is taken message by message, in order, so the first ones of a batch
 *     larger than the burst pass and the rest are dropped and counted), HUBAGENT_ERR_TOO_LARGE or
 *     HUBAGENT_ERR_INVALID_ARGUMENT for one that is too large or malformed, HUBAGENT_ERR_STOPPING
 *     when the plugin is being stopped - and a refused message holds none of the others back.
 *     The accepted ones are stored in the batch's order, after everything published before the
 *     call. It returns HUBAGENT_OK when every message was stored, else the first non-OK result.
 *     At most HUBAGENT_MAX_BATCH messages per call (more: every result
 *     HUBAGENT_ERR_INVALID_ARGUMENT, nothing stored); `count` 0 returns HUBAGENT_OK. Like
 *     `publish` it blocks while the queue applies back-pressure, and may be called from several
 *     threads at once. Why a blocking batch rather than a publish that returns a completion: the
 *     plugin's memory stays borrowed for the call only (rule 2 unchanged: the host never holds
 *     plugin pointers after a call returns), a plugin needs no callback running on host threads,
 *     and the per-message round trip, which is what limits throughput, goes away all the same.
 *     Check HUBAGENT_HOST_HAS(host, publish_batch) first (hubagent_publish_batch below does, and
 *     falls back to one `publish` per message on an older agent); a 1.0-1.2 plugin keeps working.
 */
#ifndef HUBAGENT_PLUGIN_H
#define HUBAGENT_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HUBAGENT_PLUGIN_MAGIC 0x48415047u /* "HAPG" */
#define HUBAGENT_PLUGIN_ABI_MAJOR 1
#define HUBAGENT_PLUGIN_ABI_MINOR 3
#define HUBAGENT_PLUGIN_ENTRY_SYMBOL "hubagent_plugin_entry_v1"

/* Result codes (int32_t). */
#define HUBAGENT_OK 0
#define HUBAGENT_ERR_REJECTED 1         /* settings refused; reason given */
#define HUBAGENT_ERR_FAILED 2           /* generic failure; reason given */
#define HUBAGENT_ERR_PANICKED 3         /* a Rust panic was caught at the boundary */
#define HUBAGENT_ERR_INVALID_ARGUMENT 4 /* a malformed struct or non-UTF-8 string */
#define HUBAGENT_ERR_RATE_LIMITED 5     /* publish: over max_rate, message dropped and counted */
#define HUBAGENT_ERR_STOPPING 6         /* publish: the plugin is being stopped */
#define HUBAGENT_ERR_TOO_LARGE 7        /* publish: larger than the hub accepts */
#define HUBAGENT_ERR_NOT_FOUND 8        /* settings accessors (1.2): no such key; keep the default */

/* ABI 1.3: the most messages one publish_batch takes. */
#define HUBAGENT_MAX_BATCH 1024

/* Log levels. */
#define HUBAGENT_LOG_ERROR 1
#define HUBAGENT_LOG_WARN 2
#define HUBAGENT_LOG_INFO 3
#define HUBAGENT_LOG_DEBUG 4
#define HUBAGENT_LOG_TRACE 5

/* Health states. */
#define HUBAGENT_HEALTH_OK 0
#define HUBAGENT_HEALTH_DEGRADED 1
#define HUBAGENT_HEALTH_FAILED 2 /* asks the host to restart the plugin */

/* A borrowed UTF-8 string: `ptr` may be NULL when `len` is 0 (meaning "absent"). */
typedef struct hubagent_str {
    const char *ptr;
    size_t len;
} hubagent_str;

/* A borrowed byte buffer. */
typedef struct hubagent_bytes {
    const uint8_t *ptr;
    size_t len;
} hubagent_bytes;

/* An output buffer owned by the host: write at most `cap` bytes to `ptr`, then set `len`. */
typedef struct hubagent_buf {
    uint8_t *ptr;
    size_t cap;
    size_t len;
} hubagent_buf;

/* An application property of a message (both UTF-8). */
typedef struct hubagent_property {
    hubagent_str key;
    hubagent_str value;
} hubagent_property;

/* One telemetry message. The host adds the message id, and the creation time unless the plugin
 * set it (1.2). */
typedef struct hubagent_message {
    uint32_t struct_size;          /* sizeof(hubagent_message) */
    uint32_t reserved;             /* 0 */
    hubagent_bytes body;
    hubagent_str content_type;     /* e.g. "application/json"; absent: {NULL, 0} */
    hubagent_str content_encoding; /* e.g. "utf-8"; absent: {NULL, 0} */
    const hubagent_property *properties;
    size_t property_count;
    /* ABI 1.2: when the reading was taken, ms since the Unix epoch (UTC); 0 = when published. */
    int64_t creation_time_ms;
} hubagent_message;

/* What the host offers the plugin. Every function takes `ctx` as its first argument. */
typedef struct hubagent_host_api {
    uint32_t struct_size; /* sizeof(hubagent_host_api) as the host knows it */
    uint16_t abi_major;
    uint16_t abi_minor;
    void *ctx;
    int32_t (*publish)(void *ctx, const hubagent_message *message);
    void (*log)(void *ctx, int32_t level, hubagent_str text);
    void (*report_health)(void *ctx, int32_t health, hubagent_str detail);

    /* ABI 1.2 (rule 10): present when `struct_size` covers them; use the helpers below. */
    int32_t (*setting_string)(void *ctx, hubagent_str settings_json, hubagent_str key,
                              hubagent_buf *out, hubagent_buf *error);
    int32_t (*setting_number)(void *ctx, hubagent_str settings_json, hubagent_str key,
                              double *out, hubagent_buf *error);
    int32_t (*setting_bool)(void *ctx, hubagent_str settings_json, hubagent_str key,
                            int32_t *out, hubagent_buf *error);
    int32_t (*setting_duration_ms)(void *ctx, hubagent_str settings_json, hubagent_str key,
                                   uint64_t *out_ms, hubagent_buf *error);
    int32_t (*report_properties)(void *ctx, hubagent_str properties_json, hubagent_buf *error);

    /* ABI 1.3 (rule 11): present when `struct_size` covers it; see hubagent_publish_batch. */
    int32_t (*publish_batch)(void *ctx, const hubagent_message *const *messages, size_t count,
                             int32_t *results);
} hubagent_host_api;

/* ABI 1.1: a cloud-to-device message, borrowed for the duration of `receive_c2d`. */
typedef struct hubagent_c2d_message {
    uint32_t struct_size;          /* sizeof(hubagent_c2d_message) as the host knows it */
    uint32_t reserved;             /* 0 */
    hubagent_str message_id;       /* the hub's id: the same on every redelivery */
    hubagent_bytes body;
    hubagent_str content_type;     /* absent: {NULL, 0} */
    hubagent_str content_encoding; /* absent: {NULL, 0} */
    const hubagent_property *properties; /* the sender's application properties */
    size_t property_count;
} hubagent_c2d_message;

/* What the plugin offers the host, returned by hubagent_plugin_entry_v1(). */
typedef struct hubagent_plugin_descriptor {
    uint32_t magic;           /* HUBAGENT_PLUGIN_MAGIC */
    uint16_t abi_major;       /* HUBAGENT_PLUGIN_ABI_MAJOR */
    uint16_t abi_minor;       /* HUBAGENT_PLUGIN_ABI_MINOR */
    uint32_t descriptor_size; /* sizeof(hubagent_plugin_descriptor) */
    uint32_t host_api_size;   /* sizeof(hubagent_host_api) */
    uint32_t message_size;    /* sizeof(hubagent_message) */
    uint32_t reserved;        /* 0 */
    const char *name;         /* NUL-terminated, static */
    const char *version;      /* NUL-terminated, static */

    /* Start an instance with its settings (a JSON object). On success store the instance in
     * `*instance` and return HUBAGENT_OK; otherwise return an error and write why to `error`. */
    int32_t (*start)(const hubagent_host_api *host, hubagent_str settings_json, void **instance,
                     hubagent_buf *error);
    /* New settings for a running instance: HUBAGENT_OK, or HUBAGENT_ERR_REJECTED and why (the
     * old settings stay in force). */
    int32_t (*apply_settings)(void *instance, hubagent_str settings_json, hubagent_buf *reason);
    /* Stop: join the plugin's threads, stop calling the host and free the instance. */
    int32_t (*stop)(void *instance);

    /* ABI 1.1 (rule 9). Leave NULL for none. */
    const char *methods;    /* "open_valve\0read_meter\0": names each ended by a NUL, then "" */
    const char *c2d_filter; /* e.g. "{\"kind\":\"valve\"}", or "{}" for every message */
    /* Answers a method: returns its status, writes the JSON answer to `answer` (at most
     * `answer->cap`, 128 KiB). `method` and `payload_json` (JSON, "null" when the caller sent
     * none) are also NUL-terminated; `len` excludes the NUL. */
    int32_t (*invoke_method)(void *instance, hubagent_str method, hubagent_str payload_json,
                             hubagent_buf *answer);
    /* Takes a C2D message: HUBAGENT_OK, or an error and why (the hub delivers it again). */
    int32_t (*receive_c2d)(void *instance, const hubagent_c2d_message *message,
                           hubagent_buf *reason);
} hubagent_plugin_descriptor;

/* The one exported entry point. */
const hubagent_plugin_descriptor *hubagent_plugin_entry_v1(void);

/* Helpers for C plugins. */
static inline hubagent_str hubagent_str_from(const char *text) {
    hubagent_str s;
    size_t n = 0;
    if (text) {
        while (text[n]) n++;
    }
    s.ptr = text;
    s.len = n;
    return s;
}

/* Copies `text` into an output buffer, truncating to its capacity. */
static inline void hubagent_buf_set(hubagent_buf *buf, const char *text) {
    size_t n = 0;
    if (!buf || !buf->ptr) return;
    while (text && text[n] && n < buf->cap) {
        buf->ptr[n] = (uint8_t)text[n];
        n++;
    }
    buf->len = n;
}

/* ABI 1.2 helpers (rule 10). Each returns HUBAGENT_OK with the value in `*out` (the default when
 * the settings do not have the key), or HUBAGENT_ERR_INVALID_ARGUMENT with the reason in `error`,
 * which names the key: return HUBAGENT_ERR_REJECTED with it. */
#define HUBAGENT_HOST_HAS(host, field)                                                          \
    ((host) && (host)->struct_size >= offsetof(hubagent_host_api, field) + sizeof((host)->field) && \
     (host)->field)

static inline int32_t hubagent_setting_result_(int32_t rc, hubagent_buf *error) {
    (void)error;
    return rc == HUBAGENT_ERR_NOT_FOUND ? HUBAGENT_OK : rc;
}

static inline int32_t hubagent_setting_too_old_(hubagent_buf *error) {
    hubagent_buf_set(error, "this agent has no settings accessors (ABI 1.2 needed)");
    return HUBAGENT_ERR_INVALID_ARGUMENT;
}

/* A string into `out` (NUL-terminated, at most `cap - 1` bytes; longer is an error). */
static inline int32_t hubagent_setting_string(const hubagent_host_api *host, hubagent_str settings,
                                              const char *key, const char *fallback, char *out,
                                              size_t cap, hubagent_buf *error) {
    if (!HUBAGENT_HOST_HAS(host, setting_string)) return hubagent_setting_too_old_(error);
    if (!out || cap == 0) return HUBAGENT_ERR_INVALID_ARGUMENT;
    hubagent_buf value;
    value.ptr = (uint8_t *)out;
    value.cap = cap - 1;
    value.len = 0;
    int32_t rc = host->setting_string(host->ctx, settings, hubagent_str_from(key), &value, error);
    if (rc == HUBAGENT_ERR_NOT_FOUND) {
        size_t n = 0;
        while (fallback && fallback[n] && n < cap - 1) {
            out[n] = fallback[n];
            n++;
        }
        out[n] = 0;
        return HUBAGENT_OK;
    }
    out[rc == HUBAGENT_OK || rc == HUBAGENT_ERR_TOO_LARGE ? value.len : 0] = 0;
    return rc;
}

static inline int32_t hubagent_setting_number(const hubagent_host_api *host, hubagent_str settings,
                                              const char *key, double fallback, double *out,
                                              hubagent_buf *error) {
    if (!HUBAGENT_HOST_HAS(host, setting_number)) return hubagent_setting_too_old_(error);
    *out = fallback;
    return hubagent_setting_result_(
        host->setting_number(host->ctx, settings, hubagent_str_from(key), out, error), error);
}

/* `*out` is 1 for true, 0 for false. */
static inline int32_t hubagent_setting_bool(const hubagent_host_api *host, hubagent_str settings,
                                            const char *key, int32_t fallback, int32_t *out,
                                            hubagent_buf *error) {
    if (!HUBAGENT_HOST_HAS(host, setting_bool)) return hubagent_setting_too_old_(error);
    *out = fallback;
    return hubagent_setting_result_(
        host->setting_bool(host->ctx, settings, hubagent_str_from(key), out, error), error);
}

/* A duration ("500ms", "5s", "2m", "1h"; a bare number is seconds) in milliseconds. */
static inline int32_t hubagent_setting_duration_ms(const hubagent_host_api *host,
                                                   hubagent_str settings, const char *key,
                                                   uint64_t fallback_ms, uint64_t *out_ms,
                                                   hubagent_buf *error) {
    if (!HUBAGENT_HOST_HAS(host, setting_duration_ms)) return hubagent_setting_too_old_(error);
    *out_ms = fallback_ms;
    return hubagent_setting_result_(
        host->setting_duration_ms(host->ctx, settings, hubagent_str_from(key), out_ms, error),
        error);
}

/* The plugin's own reported properties (a JSON object text); the reason in `error` if refused. */
static inline int32_t hubagent_report_properties(const hubagent_host_api *host, const char *json,
                                                 hubagent_buf *error) {
    if (!HUBAGENT_HOST_HAS(host, report_properties)) {
        hubagent_buf_set(error, "this agent takes no reported properties (ABI 1.2 needed)");
        return HUBAGENT_ERR_INVALID_ARGUMENT;
    }
    return host->report_properties(host->ctx, hubagent_str_from(json), error);
}

/* ABI 1.3 (rule 11): `count` messages with one round trip; `results` (NULL or `count` entries)
 * gets each one's code. On an agent older than 1.3, one `publish` per message (same promise, the
 * old speed). Returns HUBAGENT_OK when all were stored, else the first non-OK result. */
static inline int32_t hubagent_publish_batch(const hubagent_host_api *host,
                                             const hubagent_message *const *messages,
                                             size_t count, int32_t *results) {
    if (HUBAGENT_HOST_HAS(host, publish_batch))
        return host->publish_batch(host->ctx, messages, count, results);
    int32_t first = HUBAGENT_OK;
    for (size_t i = 0; i < count; i++) {
        int32_t rc = host->publish(host->ctx, messages[i]);
        if (results) results[i] = rc;
        if (first == HUBAGENT_OK) first = rc;
    }
    return first;
}

#ifdef __cplusplus
}
#endif

#endif /* HUBAGENT_PLUGIN_H */
