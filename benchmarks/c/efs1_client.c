/* A C client of the agent's local inference API over the shared-memory channel (EFS1),
 * written from docs/inference-api.md alone: what a non-Python application on the gateway
 * needs, and the proof that the protocol description is enough to write one.
 *
 *   cc -O2 -pthread -o efs1_client efs1_client.c
 *   efs1_client SOCKET INPUT FEATURES THREADS SECONDS [SPIN_US]
 *
 * Each of THREADS threads opens its own channel (one request at a time per channel) and
 * predicts one float32 row of FEATURES values (x[j] = j / 100) on input INPUT, as fast as it
 * can for SECONDS, spinning up to SPIN_US (default 1000) for each reply before it parks on
 * the socket. Prints one JSON line: {"calls": N, "errors": E, "first": [outputs of the first
 * reply's first tensor], "error": "code: message" of the first error frame, if any}.
 * With SECONDS 0 every thread makes one call. Exit status 0, or 2 on a usage or channel error.
 * x86-64 Linux (the agent offers EFS1 there only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { W_MAGIC = 0, W_REQ = 1, W_REP = 2, W_SERVER_PARKED = 3, W_CLIENT_PARKED = 4 };
#define MAGIC_WORD (0x31534645ULL | (1ULL << 32)) /* "EFS1" little-endian | version 1 << 32 */

#pragma pack(push, 1)
struct efb1_header {
    char magic[4];
    uint8_t kind, flags;
    uint16_t status, n_arrays, reserved;
    uint32_t meta_len, desc_len, payload_len;
};
#pragma pack(pop)

static const char *g_path, *g_input;
static int g_features, g_seconds;
static double g_spin_us = 1000.0;
static atomic_long g_calls, g_errors;
static atomic_int g_failed;
static char g_first[4096], g_error[512];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int fail(const char *what) {
    fprintf(stderr, "efs1_client: %s: %s\n", what, strerror(errno));
    atomic_store(&g_failed, 1);
    return -1;
}

/* The unsigned integer after "key": in a flat JSON object (the agent's shm reply). */
static long long json_int(const char *doc, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *at = strstr(doc, pat);
    if (!at) return -1;
    at += strlen(pat);
    while (*at == ' ') at++;
    return strtoll(at, NULL, 10);
}

struct channel {
    int sock;
    uint8_t *region;
    size_t size, req_off, req_size, rep_off, rep_size;
    _Atomic uint64_t *ctl;
    uint64_t seq;
};

/* Steps 1-3 of EFS1: connect, ask for a channel, map the region the agent passes back. */
static int channel_open(struct channel *ch) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, g_path, sizeof addr.sun_path - 1);
    ch->sock = socket(AF_UNIX, SOCK_STREAM, 0);
    if (ch->sock < 0 || connect(ch->sock, (struct sockaddr *)&addr, sizeof addr) < 0) return fail("connect");
    const char *head = "{\"op\": \"shm_open\", \"request_bytes\": 65536, \"reply_bytes\": 65536}";
    uint8_t frame[128];
    uint32_t hl = (uint32_t)strlen(head);
    memcpy(frame, "EFI1", 4);
    frame[4] = hl >> 24; frame[5] = hl >> 16; frame[6] = hl >> 8; frame[7] = hl; /* big-endian */
    memset(frame + 8, 0, 4);                                                    /* no payload */
    memcpy(frame + 12, head, hl);
    if (send(ch->sock, frame, 12 + hl, 0) != (ssize_t)(12 + hl)) return fail("send shm_open");

    char reply[4096];
    size_t have = 0;
    int fd = -1;
    while (have < 12 || have < 12 + ((uint32_t)(uint8_t)reply[4] << 24 | (uint8_t)reply[5] << 16 |
                                     (uint8_t)reply[6] << 8 | (uint8_t)reply[7])) {
        char cbuf[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {reply + have, sizeof reply - 1 - have};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                             .msg_controllen = sizeof cbuf};
        ssize_t got = recvmsg(ch->sock, &msg, 0);
        if (got <= 0) return fail("recvmsg shm_open reply");
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(c), sizeof fd);
        have += (size_t)got;
        if (have >= sizeof reply - 1) break;
    }
    reply[have] = 0;
    if (fd < 0 || json_int(reply + 12, "status") != 200) {
        fprintf(stderr, "efs1_client: no shared memory offered: %s\n", reply + 12);
        atomic_store(&g_failed, 1);
        return -1;
    }
    ch->size = (size_t)json_int(reply + 12, "size");
    ch->req_off = (size_t)json_int(reply + 12, "req_offset");
    ch->req_size = (size_t)json_int(reply + 12, "req_size");
    ch->rep_off = (size_t)json_int(reply + 12, "rep_offset");
    ch->rep_size = (size_t)json_int(reply + 12, "rep_size");
    ch->region = mmap(NULL, ch->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (ch->region == MAP_FAILED) return fail("mmap");
    ch->ctl = (_Atomic uint64_t *)ch->region;
    if (atomic_load(&ch->ctl[W_MAGIC]) != MAGIC_WORD) {
        fprintf(stderr, "efs1_client: not an EFS1 region\n");
        atomic_store(&g_failed, 1);
        return -1;
    }
    ch->seq = atomic_load(&ch->ctl[W_REQ]);
    return 0;
}

/* Step 4: write the request frame, publish it, ring a parked agent, wait for the reply. */
static int channel_call(struct channel *ch, const uint8_t *frame, size_t len) {
    if (len > ch->req_size) { errno = EMSGSIZE; return fail("request too large for the area"); }
    memcpy(ch->region + ch->req_off, frame, len);
    uint64_t seq = ++ch->seq;
    atomic_store_explicit(&ch->ctl[W_REQ], seq, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load(&ch->ctl[W_SERVER_PARKED]) && send(ch->sock, "R", 1, MSG_DONTWAIT) < 0 && errno != EAGAIN)
        return fail("ring");
    double deadline = now_s() + g_spin_us / 1e6;
    while (atomic_load_explicit(&ch->ctl[W_REP], memory_order_acquire) != seq) {
        if (now_s() < deadline) {  /* spin, giving the CPU to the agent when it shares ours */
            _mm_pause();
            sched_yield();
            continue;
        }
        atomic_store(&ch->ctl[W_CLIENT_PARKED], 1);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&ch->ctl[W_REP]) == seq) break;
        char rings[64];
        ssize_t got = recv(ch->sock, rings, sizeof rings, 0);
        if (got == 0) { errno = EPIPE; return fail("the agent closed the channel"); }
        if (got < 0 && errno != EINTR) return fail("recv");
    }
    atomic_store(&ch->ctl[W_CLIENT_PARKED], 0);
    return 0;
}

static size_t build_request(uint8_t *buf) {
    uint16_t name_len = (uint16_t)strlen(g_input);
    uint32_t dims[2] = {1, (uint32_t)g_features};
    uint32_t desc_len = 4 + 8 + name_len, payload_len = 4u * (uint32_t)g_features;
    struct efb1_header h = {{'E', 'F', 'B', '1'}, 1, 0, 0, 1, 0, 0, desc_len, payload_len};
    uint8_t *p = buf;
    memcpy(p, &h, sizeof h); p += sizeof h;
    *p++ = 1; *p++ = 2;  /* float32, 2 dims */
    memcpy(p, &name_len, 2); p += 2;
    memcpy(p, dims, 8); p += 8;
    memcpy(p, g_input, name_len); p += name_len;
    for (int j = 0; j < g_features; j++) { float v = j / 100.0f; memcpy(p, &v, 4); p += 4; }
    return (size_t)(p - buf);
}

/* The reply at rep_offset: outputs (kind 2), or an error frame (kind 3) kept as "code: message". */
static int read_reply(struct channel *ch, int keep) {
    const uint8_t *r = ch->region + ch->rep_off;
    struct efb1_header h;
    memcpy(&h, r, sizeof h);
    if (memcmp(h.magic, "EFB1", 4) != 0 || sizeof h + h.meta_len + h.desc_len + h.payload_len > ch->rep_size) {
        errno = EPROTO;
        return fail("malformed reply");
    }
    const uint8_t *meta = r + sizeof h;
    if (h.kind == 3) {
        uint16_t cl, ml;
        memcpy(&cl, meta, 2); memcpy(&ml, meta + 2, 2);
        if (h.meta_len < 4 || 4u + cl + ml > h.meta_len) { errno = EPROTO; return fail("malformed error frame"); }
        pthread_mutex_lock(&g_lock);
        if (!g_error[0]) {
            snprintf(g_error, sizeof g_error, "%.*s: %.*s", cl, meta + 4, ml, meta + 4 + cl);
            for (char *c = g_error; *c; c++)
                if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20) *c = '\'';  /* printable in JSON */
        }
        pthread_mutex_unlock(&g_lock);
        return 1;
    }
    if (keep) {  /* the first tensor, as float32 (the MLP's logits) */
        const uint8_t *d = meta + h.meta_len;
        uint8_t ndim = d[1];
        if (h.desc_len < 4u + 4u * ndim || d[0] != 1) { errno = EPROTO; return fail("unexpected output tensor"); }
        size_t items = 1;
        for (int i = 0; i < ndim; i++) { uint32_t dim; memcpy(&dim, d + 4 + 4 * i, 4); items *= dim; }
        if (items * 4 > h.payload_len) { errno = EPROTO; return fail("output larger than the payload"); }
        const uint8_t *payload = meta + h.meta_len + h.desc_len;
        pthread_mutex_lock(&g_lock);
        if (!g_first[0]) {
            size_t at = (size_t)snprintf(g_first, sizeof g_first, "[");
            for (size_t i = 0; i < items && at < sizeof g_first - 32; i++) {
                float v;
                memcpy(&v, payload + 4 * i, 4);
                at += (size_t)snprintf(g_first + at, sizeof g_first - at, "%s%.7g", i ? ", " : "", v);
            }
            snprintf(g_first + at, sizeof g_first - at, "]");
        }
        pthread_mutex_unlock(&g_lock);
    }
    return 0;
}

static void *worker(void *arg) {
    (void)arg;
    struct channel ch = {0};
    uint8_t frame[65536];
    if ((size_t)g_features * 4 + 256 > sizeof frame) return NULL;
    size_t len = build_request(frame);
    if (channel_open(&ch) < 0) return NULL;
    double until = now_s() + g_seconds;
    long calls = 0, errors = 0;
    do {
        if (channel_call(&ch, frame, len) < 0) break;
        int err = read_reply(&ch, calls == 0);
        if (err < 0) break;
        errors += err;
        calls++;
    } while (g_seconds > 0 && now_s() < until && !atomic_load(&g_failed));
    atomic_fetch_add(&g_calls, calls);
    atomic_fetch_add(&g_errors, errors);
    munmap(ch.region, ch.size);
    close(ch.sock);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s SOCKET INPUT FEATURES THREADS SECONDS [SPIN_US]\n", argv[0]);
        return 2;
    }
    g_path = argv[1];
    g_input = argv[2];
    g_features = atoi(argv[3]);
    int threads = atoi(argv[4]);
    g_seconds = atoi(argv[5]);
    if (argc > 6) g_spin_us = atof(argv[6]);
    if (g_features < 1 || threads < 1 || threads > 256 || g_seconds < 0) {
        fprintf(stderr, "efs1_client: FEATURES and THREADS must be positive, SECONDS >= 0\n");
        return 2;
    }
    pthread_t t[256];
    double start = now_s();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double elapsed = now_s() - start;
    printf("{\"calls\": %ld, \"errors\": %ld, \"seconds\": %.4f, \"first\": %s, \"error\": \"%s\"}\n",
           atomic_load(&g_calls), atomic_load(&g_errors), elapsed, g_first[0] ? g_first : "null", g_error);
    return atomic_load(&g_failed) ? 2 : 0;
}
