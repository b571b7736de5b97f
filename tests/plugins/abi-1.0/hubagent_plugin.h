/*
 * hubagent_plugin.h - the hubagent plugin ABI, version 1.
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
#define HUBAGENT_PLUGIN_ABI_MINOR 0
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

/* One telemetry message. The host adds the message id and creation time. */
typedef struct hubagent_message {
    uint32_t struct_size;          /* sizeof(hubagent_message) */
    uint32_t reserved;             /* 0 */
    hubagent_bytes body;
    hubagent_str content_type;     /* e.g. "application/json"; absent: {NULL, 0} */
    hubagent_str content_encoding; /* e.g. "utf-8"; absent: {NULL, 0} */
    const hubagent_property *properties;
    size_t property_count;
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
} hubagent_host_api;

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

#ifdef __cplusplus
}
#endif

#endif /* HUBAGENT_PLUGIN_H */
