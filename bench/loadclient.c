/*
 * loadclient — an epoll WebSocket load client for `make bench`.
 *
 * Opens N connections, upgrades each with a bearer token, then only reads: for every text
 * message carrying a `"seq":` it computes latency = receive wall time − the message's outer
 * `"timestamp"` (the server's publish time, ISO-8601 UTC with microseconds) and counts `seq`
 * gaps per connection and symbol. It answers pings and closes, and never sends anything else.
 *
 * One thread: on a 2-core machine shared with the server a second client thread would only
 * compete with the server for the other core. The hot path is one recv() per ready socket and
 * one clock read per recv (every frame in a buffer arrived at the same moment), so the client
 * stays far cheaper than the server it measures; it reports its own CPU so a reader can check.
 *
 * Progress goes to stderr as JSON lines (all_connected, window_start, window_end) so a driver can
 * sample the server exactly over the measurement window; the result is one JSON object on stdout.
 *
 * Churn (--churn-rate R, for the soak): from all_connected to window_end, R connections per
 * second are closed (a masked close frame, then close()) and reopened at once, round-robin over
 * the last --churn-pool connections; the others are never churned and keep their whole stream.
 * A reopened connection is a new joiner (its seq tracking restarts); its upgrade time goes into
 * churn_connect_ms, its failures into churn_failed, never into the connect-phase figures.
 *
 * Build: gcc -O2 -Wall -Wextra -o loadclient loadclient.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define MAX_SYMBOLS 16
#define SYMBOL_MAX_LEN 32
#define RBUF_SIZE (256 * 1024)
#define MAX_FRAME (RBUF_SIZE / 2)    /* larger frames are skipped, not parsed */
#define MAX_HTTP_RESPONSE 8192
#define MAX_EVENTS 1024
#define SUB_BITS 7                   /* histogram: 2^7 sub-buckets per power of two, <0.8% error */
#define SUB_COUNT (1 << SUB_BITS)
#define HIST_BUCKETS (SUB_COUNT * 40)
#define NONREADER_SURVEY_S 2.0       /* time given to non-readers' buffered data to drain */

/* The RFC 6455 sample key and its accept value: a fixed key is valid, and lets us check the
 * server's Sec-WebSocket-Accept without SHA-1 and base64 code here. */
static const char WS_KEY[] = "dGhlIHNhbXBsZSBub25jZQ==";
static const char WS_ACCEPT[] = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

struct options {
    const char *host;
    const char *port;
    const char *token;
    const char *path;
    const char *source;      /* local address to connect from (its own ephemeral ports); NULL: any */
    int clients;
    double duration;
    double warmup;
    double connect_rate;     /* connections started per second; 0 = all at once */
    double connect_timeout;  /* seconds for the whole connect phase */
    double nonreading_fraction;
    bool deflate;            /* offer permessage-deflate (RFC 7692) and inflate what comes */
    double churn_rate;       /* connections closed and reopened per second; 0 = none */
    int churn_pool;          /* how many connections (the last ones) churn; default: all */
};

enum state { ST_IDLE, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_PARKED, ST_SURVEY, ST_DONE };

struct conn {
    int fd;
    uint8_t state;
    bool nonreading;
    bool cut;                /* the server closed it (close frame or EOF) */
    bool rejoin;             /* reopened by churn: counted apart from the connect phase */
    uint16_t req_sent;
    uint32_t pending_len, pending_cap;
    unsigned char *pending;  /* an incomplete frame (or HTTP response) carried to the next recv */
    uint64_t skip;           /* payload bytes of an oversized frame still to discard */
    double started;          /* monotonic time of connect(), for the connect-time histogram */
    int64_t last_seq[MAX_SYMBOLS];
};

struct histogram {
    uint64_t counts[HIST_BUCKETS];
    uint64_t total;
    uint64_t max_us;
    double sum_us;
};

struct stats {
    int started, upgraded, connect_failed, http_refused, bad_accept, connect_timeouts;
    int readers_closed, closed_eof, closed_error, protocol_errors;
    int nonreaders_cut, nonreaders_open;
    uint64_t messages, deliveries, other_messages, unparsed, oversized;
    uint64_t lost_window, lost_total, out_of_order, negative_latency, pings, inflated;
    uint64_t nonreaders_drained_bytes;   /* what the survey read: queued for the non-readers */
    uint64_t close_codes[16];   /* 1000..1015 */
    uint64_t close_other;
    uint64_t churned, churn_upgraded, churn_failed, churn_skipped;
    char first_error[128];
};

static struct options opt;
static struct conn *conns;
static struct histogram hist;          /* delivery latency, measurement window only */
static struct histogram connect_hist;  /* connect() to 101, per connection */
static struct histogram churn_hist;    /* the same for connections reopened by churn */
static bool churning;                  /* churn runs between all_connected and window_end */
static double churn_t0;
static double run_t0;                  /* the start, for progress lines */
static uint64_t churn_cursor;
static struct stats st;
static int epfd;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static struct sockaddr_storage source_addr;  /* --source, port 0 */
static socklen_t source_addrlen;             /* 0: no --source */
static char *request;
static size_t request_len;
static unsigned char rbuf[RBUF_SIZE];
static bool in_window;
static int nsymbols;
static char symbols[MAX_SYMBOLS][SYMBOL_MAX_LEN];
static size_t symbol_lens[MAX_SYMBOLS];

/* ---------------------------------------------------------------- small helpers */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadclient: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t wall_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Own CPU time: user seconds in [0], system seconds in [1]. */
static void cpu_seconds(double out[2])
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    out[0] = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    out[1] = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void progress(const char *event, double t0)
{
    fprintf(stderr, "{\"event\":\"%s\",\"t\":%.3f,\"upgraded\":%d,\"failed\":%d}\n", event,
            mono_now() - t0, st.upgraded,
            st.connect_failed + st.http_refused + st.bad_accept + st.connect_timeouts);
    fflush(stderr);
}

static void note_error(const char *what, int err)
{
    if (!st.first_error[0])
        snprintf(st.first_error, sizeof st.first_error, "%s: %s", what, strerror(err));
}

/* first_error is printed inside a JSON string: keep it to plain printable characters. */
static void sanitize(char *s)
{
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e || *s == '"' || *s == '\\')
            *s = '?';
}

/* Ten thousand sockets need more than the usual soft limit of 1024 descriptors. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)opt.clients + 16)
        die("open-file limit %llu is below --clients %d", (unsigned long long)rl.rlim_cur,
            opt.clients);
}

/* ---------------------------------------------------------------- latency histogram */

/* Log-linear buckets: exact below 2^SUB_BITS µs, then SUB_COUNT buckets per power of two. */
static unsigned bucket_of(uint64_t v)
{
    if (v < SUB_COUNT)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - SUB_BITS;
    unsigned idx = (shift + 1) * SUB_COUNT + (unsigned)((v >> shift) - SUB_COUNT);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

/* The middle of a bucket's range, in µs. */
static double bucket_value(unsigned idx)
{
    if (idx < SUB_COUNT)
        return idx;
    unsigned shift = idx / SUB_COUNT - 1;
    uint64_t low = (uint64_t)(idx % SUB_COUNT + SUB_COUNT) << shift;
    return (double)low + (double)((1ULL << shift) - 1) / 2.0;
}

static void hist_add(struct histogram *h, uint64_t us)
{
    h->counts[bucket_of(us)]++;
    h->total++;
    h->sum_us += (double)us;
    if (us > h->max_us)
        h->max_us = us;
}

static double hist_percentile_ms(const struct histogram *h, double p)
{
    if (!h->total)
        return 0;
    uint64_t rank = (uint64_t)(p * (double)h->total + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= rank) {
            double v = bucket_value(i);
            return (v > (double)h->max_us ? (double)h->max_us : v) / 1000.0;
        }
    }
    return (double)h->max_us / 1000.0;
}

/* ---------------------------------------------------------------- message parsing */

static const unsigned char *find_last(const unsigned char *p, size_t n, const char *pat)
{
    size_t m = strlen(pat);
    if (n < m)
        return NULL;
    for (size_t i = n - m + 1; i-- > 0;)
        if (p[i] == (unsigned char)pat[0] && memcmp(p + i, pat, m) == 0)
            return p + i;
    return NULL;
}

static bool parse_digits(const unsigned char *p, int n, int64_t *out)
{
    int64_t v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return true;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* "YYYY-MM-DDTHH:MM:SS.ffffffZ" (fraction of 0–6 digits) to µs since the epoch. */
static bool parse_iso_us(const unsigned char *p, size_t n, int64_t *out)
{
    int64_t y, mo, d, h, mi, s, frac = 0;
    if (n < 20 || p[4] != '-' || p[7] != '-' || p[10] != 'T' || p[13] != ':' || p[16] != ':')
        return false;
    if (!parse_digits(p, 4, &y) || !parse_digits(p + 5, 2, &mo) || !parse_digits(p + 8, 2, &d) ||
        !parse_digits(p + 11, 2, &h) || !parse_digits(p + 14, 2, &mi) ||
        !parse_digits(p + 17, 2, &s))
        return false;
    size_t i = 19;
    int digits = 0;
    if (p[i] == '.') {
        for (i++; i < n && digits < 6 && p[i] >= '0' && p[i] <= '9'; i++, digits++)
            frac = frac * 10 + (p[i] - '0');
    }
    for (; digits < 6; digits++)
        frac *= 10;
    int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s;
    *out = secs * 1000000 + frac;
    return true;
}

static int symbol_slot(const unsigned char *msg, size_t n)
{
    static const char key[] = "\"symbol\":\"";
    const unsigned char *p = memmem(msg, n, key, sizeof key - 1);
    if (!p)
        return 0;
    p += sizeof key - 1;
    const unsigned char *end = memchr(p, '"', n - (size_t)(p - msg));
    if (!end || end - p >= SYMBOL_MAX_LEN)
        return 0;
    size_t len = (size_t)(end - p);
    for (int i = 0; i < nsymbols; i++)
        if (symbol_lens[i] == len && memcmp(symbols[i], p, len) == 0)
            return i;
    if (nsymbols == MAX_SYMBOLS)
        return 0;   /* beyond the table: share slot 0, gaps may be over-counted */
    memcpy(symbols[nsymbols], p, len);
    symbol_lens[nsymbols] = len;
    return nsymbols++;
}

static void track_seq(struct conn *c, int slot, int64_t seq)
{
    int64_t last = c->last_seq[slot];
    c->last_seq[slot] = seq;
    if (last < 0)
        return;   /* first update on this connection: it joined mid-stream */
    if (seq <= last) {
        st.out_of_order++;
    } else if (seq > last + 1) {
        st.lost_total += (uint64_t)(seq - last - 1);
        if (in_window)
            st.lost_window += (uint64_t)(seq - last - 1);
    }
}

static void on_text(struct conn *c, const unsigned char *msg, size_t n, int64_t now_us)
{
    static const char seq_key[] = "\"seq\":";
    if (c->state == ST_SURVEY)
        return;   /* a non-reader's stale backlog: only its ending matters */
    st.messages++;
    const unsigned char *sq = memmem(msg, n, seq_key, sizeof seq_key - 1);
    /* The outer timestamp is the publish time; data.timestamp (the bar's) comes before it. */
    const unsigned char *ts = find_last(msg, n, "\"timestamp\":");
    if (!sq || !ts) {
        st.other_messages++;
        return;
    }
    int64_t seq = 0, published = 0;
    sq += sizeof seq_key - 1;
    while (sq < msg + n && *sq == ' ')
        sq++;
    int digits = 0;
    while (sq + digits < msg + n && sq[digits] >= '0' && sq[digits] <= '9' && digits < 18)
        digits++;
    for (ts += 12; ts < msg + n && (*ts == ' ' || *ts == '"'); ts++)
        ;   /* to the first digit of the value, whatever the JSON spacing */
    if (!digits || !parse_digits(sq, digits, &seq) ||
        !parse_iso_us(ts, n - (size_t)(ts - msg), &published)) {
        st.unparsed++;
        return;
    }
    track_seq(c, symbol_slot(msg, n), seq);
    if (!in_window)
        return;
    int64_t latency = now_us - published;
    if (latency < 0) {
        st.negative_latency++;
        latency = 0;
    }
    st.deliveries++;
    hist_add(&hist, (uint64_t)latency);
}

/* ---------------------------------------------------------------- connection lifecycle */

static void count_close_code(unsigned code)
{
    if (code >= 1000 && code < 1016)
        st.close_codes[code - 1000]++;
    else
        st.close_other++;
}

/* A failed connection attempt: a churn reopen is counted apart from the connect phase. */
static void count_failure(struct conn *c, int *counter)
{
    if (c->rejoin)
        st.churn_failed++;
    else
        ++*counter;
}

static void finish(struct conn *c, uint8_t state)
{
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    free(c->pending);
    c->pending = NULL;
    c->pending_len = c->pending_cap = 0;
    c->state = state;
}

/* A client frame: always masked (RFC 6455 §5.3); payload ≤ 125 bytes (control frames only). */
static void send_control(struct conn *c, unsigned opcode, const unsigned char *payload, size_t n)
{
    unsigned char frame[2 + 4 + 125];
    if (n > 125)
        n = 125;
    uint32_t key = (uint32_t)rand();
    frame[0] = (unsigned char)(0x80 | opcode);
    frame[1] = (unsigned char)(0x80 | n);
    memcpy(frame + 2, &key, 4);
    for (size_t i = 0; i < n; i++)
        frame[6 + i] = payload[i] ^ frame[2 + i % 4];
    /* Control frames are tiny and rare; if the socket is full the server is gone anyway. */
    if (send(c->fd, frame, 6 + n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
        note_error("send control frame", errno);
}

static void mark_cut(struct conn *c)
{
    c->cut = true;
    if (!c->nonreading)
        st.readers_closed++;
}

/* A permessage-deflate message (RSV1). The servers compress with no context takeover, so every
 * message inflates on its own: one raw-inflate stream, reset per message (RFC 7692 §7.2.2). */
static void on_compressed_text(struct conn *c, const unsigned char *p, size_t n, int64_t now)
{
    static z_stream z;
    static bool ready;
    static unsigned char out[1 << 20];
    static const unsigned char tail[4] = {0x00, 0x00, 0xff, 0xff};
    if (!ready) {
        if (inflateInit2(&z, -15) != Z_OK)
            die("inflateInit2 failed");
        ready = true;
    }
    inflateReset(&z);
    z.next_out = out;
    z.avail_out = sizeof out;
    z.next_in = (unsigned char *)p;
    z.avail_in = (uInt)n;
    int rc = inflate(&z, Z_SYNC_FLUSH);
    if (rc == Z_OK || rc == Z_BUF_ERROR) {
        z.next_in = (unsigned char *)tail;
        z.avail_in = 4;
        rc = inflate(&z, Z_SYNC_FLUSH);
    }
    if (rc != Z_OK && rc != Z_BUF_ERROR && rc != Z_STREAM_END) {
        st.protocol_errors++;
        return;
    }
    st.inflated++;
    on_text(c, out, sizeof out - z.avail_out, now);
}

static bool on_frame(struct conn *c, unsigned b0, const unsigned char *p, size_t n, int64_t now)
{
    unsigned opcode = b0 & 0x0f;
    bool fin = b0 & 0x80;
    switch (opcode) {
    case 0x1:
        if (!fin)
            st.unparsed++;   /* fragmented text: servers here never fragment */
        else if (b0 & 0x40)
            on_compressed_text(c, p, n, now);
        else
            on_text(c, p, n, now);
        return true;
    case 0x0:
    case 0x2:
        st.unparsed++;
        return true;
    case 0x9:
        st.pings++;
        send_control(c, 0xA, p, n);
        return true;
    case 0xA:
        return true;
    case 0x8: {
        unsigned code = n >= 2 ? (unsigned)(p[0] << 8 | p[1]) : 1005;
        count_close_code(code);
        send_control(c, 0x8, p, n >= 2 ? 2 : 0);
        mark_cut(c);
        finish(c, ST_DONE);
        return false;
    }
    default:
        st.protocol_errors++;
        finish(c, ST_DONE);
        return false;
    }
}

/* Parse every complete frame in buf; returns the bytes consumed (the rest is a partial frame). */
static size_t parse_frames(struct conn *c, const unsigned char *buf, size_t len, int64_t now)
{
    size_t off = 0;
    while (off < len) {
        if (c->skip) {
            size_t take = len - off < c->skip ? len - off : (size_t)c->skip;
            c->skip -= take;
            off += take;
            continue;
        }
        size_t avail = len - off, hdr = 2;
        if (avail < 2)
            break;
        const unsigned char *f = buf + off;
        uint64_t plen = f[1] & 0x7f;
        if (f[1] & 0x80) {   /* servers must not mask */
            st.protocol_errors++;
            finish(c, ST_DONE);
            return len;
        }
        if (plen == 126) {
            hdr = 4;
            if (avail < hdr)
                break;
            plen = (uint64_t)f[2] << 8 | f[3];
        } else if (plen == 127) {
            hdr = 10;
            if (avail < hdr)
                break;
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = plen << 8 | f[2 + i];
        }
        if (plen > MAX_FRAME) {
            st.oversized++;
            c->skip = plen;
            off += hdr;
            continue;
        }
        if (avail < hdr + plen)
            break;
        if (!on_frame(c, f[0], f + hdr, (size_t)plen, now))
            return len;
        off += hdr + (size_t)plen;
    }
    return off;
}

static void keep_pending(struct conn *c, const unsigned char *data, size_t n)
{
    if (n > c->pending_cap) {
        uint32_t cap = c->pending_cap ? c->pending_cap : 512;
        while (cap < n)
            cap *= 2;
        unsigned char *p = realloc(c->pending, cap);
        if (!p)
            die("out of memory");
        c->pending = p;
        c->pending_cap = cap;
    }
    if (n)
        memmove(c->pending, data, n);
    c->pending_len = (uint32_t)n;
}

static void start_connect(struct conn *c)
{
    if (!c->rejoin)
        st.started++;
    c->started = mono_now();
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        note_error("socket", errno);
        count_failure(c, &st.connect_failed);
        c->state = ST_DONE;
        return;
    }
    c->fd = fd;
    if (source_addrlen) {
        /* The port is chosen at connect(), per destination: bind() alone would reserve one. */
        int on = 1;
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &on, sizeof on);
        if (bind(fd, (struct sockaddr *)&source_addr, source_addrlen) < 0) {
            note_error("bind", errno);
            count_failure(c, &st.connect_failed);
            finish(c, ST_DONE);
            return;
        }
    }
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        note_error("connect", errno);
        count_failure(c, &st.connect_failed);
        finish(c, ST_DONE);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    c->state = ST_CONNECTING;
}

static void send_request(struct conn *c)
{
    ssize_t n = send(c->fd, request + c->req_sent, request_len - c->req_sent, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN)
            return;
        note_error("send upgrade", errno);
        count_failure(c, &st.connect_failed);
        finish(c, ST_DONE);
        return;
    }
    c->req_sent += (uint16_t)n;
    if (c->req_sent < request_len)
        return;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->state = ST_HANDSHAKE;
}

static void on_writable(struct conn *c)
{
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            note_error("connect", err);
            count_failure(c, &st.connect_failed);
            finish(c, ST_DONE);
            return;
        }
    }
    send_request(c);
}

/* Returns how many bytes after the HTTP response are frames, or -1 while it is incomplete. */
static ssize_t on_http_response(struct conn *c, const unsigned char *buf, size_t len,
                                double *last_upgrade)
{
    const unsigned char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) {
        if (len > MAX_HTTP_RESPONSE) {
            count_failure(c, &st.http_refused);
            finish(c, ST_DONE);
        }
        return -1;
    }
    size_t head = (size_t)(end - buf) + 4;
    if (len < 12 || memcmp(buf, "HTTP/1.1 101", 12) != 0) {
        count_failure(c, &st.http_refused);
        if (!st.first_error[0])
            snprintf(st.first_error, sizeof st.first_error, "upgrade refused: %.12s", buf);
        finish(c, ST_DONE);
        return -1;
    }
    if (!memmem(buf, head, WS_ACCEPT, sizeof WS_ACCEPT - 1)) {
        count_failure(c, &st.bad_accept);
        finish(c, ST_DONE);
        return -1;
    }
    if (c->rejoin) {
        st.churn_upgraded++;
        hist_add(&churn_hist, (uint64_t)((mono_now() - c->started) * 1e6));
    } else {
        st.upgraded++;
        *last_upgrade = mono_now();
        hist_add(&connect_hist, (uint64_t)((*last_upgrade - c->started) * 1e6));
    }
    if (c->nonreading) {
        /* Never read again: the kernel's socket buffers fill (on loopback, 3-4 MB once the
         * server's send buffer has autotuned), and only then the server's own backlog.
         * The bytes after the response are kept so the survey can resume the frame stream. */
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        keep_pending(c, buf + head, len - head);
        c->state = ST_PARKED;
        return -1;
    }
    c->state = ST_OPEN;
    return (ssize_t)(len - head);
}

static void on_readable(struct conn *c, double *last_upgrade)
{
    size_t have = c->pending_len;
    if (have)
        memcpy(rbuf, c->pending, have);
    ssize_t n = recv(c->fd, rbuf + have, sizeof rbuf - have, 0);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN)
            return;
        bool handshaking = c->state == ST_HANDSHAKE;
        if (handshaking) {
            note_error("upgrade response", n < 0 ? errno : ECONNRESET);
            count_failure(c, &st.connect_failed);
        } else if (!c->cut) {
            if (!c->nonreading)
                ++*(n == 0 ? &st.closed_eof : &st.closed_error);
            mark_cut(c);
        }
        finish(c, ST_DONE);
        return;
    }
    int64_t now = wall_now_us();
    size_t len = have + (size_t)n;
    if (c->state == ST_SURVEY)
        st.nonreaders_drained_bytes += (uint64_t)n;
    const unsigned char *frames = rbuf;
    if (c->state == ST_HANDSHAKE) {
        ssize_t rest = on_http_response(c, rbuf, len, last_upgrade);
        if (rest < 0) {
            if (c->state == ST_HANDSHAKE)
                keep_pending(c, rbuf, len);
            return;
        }
        frames = rbuf + len - (size_t)rest;
        len = (size_t)rest;
    }
    size_t used = parse_frames(c, frames, len, now);
    if (c->state == ST_OPEN || c->state == ST_SURVEY)
        keep_pending(c, frames + used, len - used);
}

static void dispatch(struct epoll_event *ev, double *last_upgrade)
{
    struct conn *c = ev->data.ptr;
    if (c->state == ST_CONNECTING) {
        if (ev->events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
            on_writable(c);
        return;
    }
    if (ev->events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        on_readable(c, last_upgrade);
}

/* ---------------------------------------------------------------- the run */

static bool is_nonreading(int i)
{
    /* Spread evenly: connection i is a non-reader when floor(i·f) steps up. */
    double f = opt.nonreading_fraction;
    return (int64_t)((i + 1) * f) > (int64_t)(i * f);
}

static void resolve(void)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res;
    int rc = getaddrinfo(opt.host, opt.port, &hints, &res);
    if (rc)
        die("%s:%s: %s", opt.host, opt.port, gai_strerror(rc));
    memcpy(&addr, res->ai_addr, res->ai_addrlen);
    addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    if (opt.source) {
        hints.ai_family = addr.ss_family;
        hints.ai_flags = AI_NUMERICHOST;
        rc = getaddrinfo(opt.source, "0", &hints, &res);
        if (rc)
            die("--source %s: %s", opt.source, gai_strerror(rc));
        memcpy(&source_addr, res->ai_addr, res->ai_addrlen);
        source_addrlen = res->ai_addrlen;
        freeaddrinfo(res);
    }
}

static void build_request(void)
{
    size_t cap = 512 + strlen(opt.path) + strlen(opt.host) + strlen(opt.token);
    request = malloc(cap);
    if (!request)
        die("out of memory");
    int n = snprintf(request, cap,
                     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s%s%s%s\r\n",
                     opt.path, opt.host, opt.port, WS_KEY, *opt.token ? "Authorization: Bearer " : "",
                     opt.token, *opt.token ? "\r\n" : "",
                     opt.deflate ? "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; "
                                   "client_no_context_takeover\r\n" : "");
    request_len = (size_t)n;
}

static int pump(int timeout_ms, double *last_upgrade)
{
    static struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(epfd, events, MAX_EVENTS, timeout_ms);
    for (int i = 0; i < n; i++)
        dispatch(&events[i], last_upgrade);
    return n;
}

/* Every connection has an outcome: each failure path counts exactly one of these. */
static bool connect_phase_done(void)
{
    int settled = st.upgraded + st.connect_failed + st.http_refused + st.bad_accept;
    return st.started == opt.clients && settled == opt.clients;
}

/* Start connections at the configured rate until all are upgraded, failed or timed out. */
static void connect_phase(double t0, double *last_upgrade)
{
    double deadline = t0 + opt.connect_timeout;
    for (;;) {
        double now = mono_now();
        int due = opt.connect_rate > 0 ? (int)((now - t0) * opt.connect_rate) + 1 : opt.clients;
        while (st.started < opt.clients && st.started < due)
            start_connect(&conns[st.started]);
        if (connect_phase_done())
            return;
        if (now >= deadline)
            break;
        pump(opt.connect_rate > 0 ? 1 : 20, last_upgrade);
    }
    for (int i = 0; i < opt.clients; i++) {
        if (conns[i].state <= ST_HANDSHAKE) {
            st.connect_timeouts++;
            finish(&conns[i], ST_DONE);
        }
    }
    if (st.connect_timeouts && !st.first_error[0])
        snprintf(st.first_error, sizeof st.first_error, "not upgraded within %gs",
                 opt.connect_timeout);
}

/* Close one connection of the churn pool and open it again; the next one in turn if it is still
 * connecting (its previous reopen has not finished) or is a non-reader. */
static void churn_one(void)
{
    int pool = opt.churn_pool, first = opt.clients - pool;
    static const unsigned char normal[2] = {0x03, 0xe8};   /* 1000 */
    for (int tries = 0; tries < pool; tries++) {
        struct conn *c = &conns[first + (int)(churn_cursor++ % (uint64_t)pool)];
        if (c->nonreading || c->state == ST_CONNECTING || c->state == ST_HANDSHAKE)
            continue;
        if (c->state == ST_OPEN)
            send_control(c, 0x8, normal, 2);
        finish(c, ST_IDLE);
        c->rejoin = true;
        c->cut = false;
        c->req_sent = 0;
        c->skip = 0;
        memset(c->last_seq, 0xff, sizeof c->last_seq);   /* a new joiner */
        st.churned++;
        start_connect(c);
        return;
    }
    st.churn_skipped++;
}

static void churn_due(void)
{
    static double last_report;
    if (!churning || opt.churn_rate <= 0)
        return;
    double now = mono_now();
    uint64_t due = (uint64_t)((now - churn_t0) * opt.churn_rate);
    while (st.churned + st.churn_skipped < due)
        churn_one();
    if (now - last_report >= 10.0) {
        last_report = now;
        fprintf(stderr,
                "{\"event\":\"churn\",\"t\":%.3f,\"churned\":%llu,\"rejoined\":%llu,"
                "\"failed\":%llu}\n",
                now - run_t0, (unsigned long long)st.churned, (unsigned long long)st.churn_upgraded,
                (unsigned long long)st.churn_failed);
        fflush(stderr);
    }
}

static void run_until(double until, double *last_upgrade)
{
    for (double now = mono_now(); now < until; now = mono_now()) {
        int ms = (int)((until - now) * 1000) + 1;
        /* Churn is due every 1/rate s: wake often enough to keep the pace even. */
        int cap = churning && opt.churn_rate > 0 ? 5 : 50;
        pump(ms > cap ? cap : ms, last_upgrade);
        churn_due();
    }
}

/* After the window: read what the non-readers have buffered, to learn which the server cut. */
static void survey_nonreaders(double *last_upgrade)
{
    for (int i = 0; i < opt.clients; i++) {
        struct conn *c = &conns[i];
        if (c->state != ST_PARKED)
            continue;
        c->state = ST_SURVEY;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    }
    /* A cut connection ends, after its buffered frames, with a close frame or EOF. */
    run_until(mono_now() + NONREADER_SURVEY_S, last_upgrade);
    for (int i = 0; i < opt.clients; i++) {
        if (!conns[i].nonreading || conns[i].state == ST_IDLE)
            continue;
        if (conns[i].cut)
            st.nonreaders_cut++;
        else if (conns[i].state == ST_SURVEY)
            st.nonreaders_open++;
    }
}

static void close_all(void)
{
    static const unsigned char normal[2] = {0x03, 0xe8};   /* 1000 */
    for (int i = 0; i < opt.clients; i++) {
        if (conns[i].state == ST_OPEN || conns[i].state == ST_SURVEY)
            send_control(&conns[i], 0x8, normal, 2);
        finish(&conns[i], conns[i].state);
    }
}

/* ---------------------------------------------------------------- report */

static void print_report(double connect_s, double window_s, const double cpu_window[2],
                         int nonreaders)
{
    double cpu[2], busy = cpu_window[0] + cpu_window[1];
    cpu_seconds(cpu);
    sanitize(st.first_error);
    printf("{\"clients\":%d,\"readers\":%d,\"nonreaders\":%d,", opt.clients, opt.clients - nonreaders,
           nonreaders);
    printf("\"upgraded\":%d,\"connect_failed\":%d,\"http_refused\":%d,\"bad_accept\":%d,"
           "\"connect_timeouts\":%d,\"connect_all_s\":%.3f,",
           st.upgraded, st.connect_failed, st.http_refused, st.bad_accept, st.connect_timeouts,
           connect_s);
    printf("\"messages\":%llu,\"deliveries\":%llu,\"window_s\":%.3f,\"deliveries_per_s\":%.1f,",
           (unsigned long long)st.messages, (unsigned long long)st.deliveries, window_s,
           window_s > 0 ? (double)st.deliveries / window_s : 0.0);
    printf("\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,"
           "\"mean\":%.3f},",
           hist_percentile_ms(&hist, 0.50), hist_percentile_ms(&hist, 0.90),
           hist_percentile_ms(&hist, 0.99), hist_percentile_ms(&hist, 0.999),
           (double)hist.max_us / 1000.0, hist.total ? hist.sum_us / (double)hist.total / 1000.0 : 0.0);
    printf("\"connect_ms\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},",
           hist_percentile_ms(&connect_hist, 0.50), hist_percentile_ms(&connect_hist, 0.90),
           hist_percentile_ms(&connect_hist, 0.99), (double)connect_hist.max_us / 1000.0);
    printf("\"lost\":%llu,\"lost_total\":%llu,\"out_of_order\":%llu,\"negative_latency\":%llu,",
           (unsigned long long)st.lost_window, (unsigned long long)st.lost_total,
           (unsigned long long)st.out_of_order, (unsigned long long)st.negative_latency);
    printf("\"inflated\":%llu,", (unsigned long long)st.inflated);
    if (opt.churn_rate > 0) {
        int pending = 0;
        for (int i = opt.clients - opt.churn_pool; i < opt.clients; i++)
            pending += conns[i].state == ST_CONNECTING || conns[i].state == ST_HANDSHAKE;
        printf("\"churn_rate\":%.1f,\"churn_pool\":%d,\"churned\":%llu,\"churn_upgraded\":%llu,"
               "\"churn_failed\":%llu,\"churn_skipped\":%llu,\"churn_pending\":%d,",
               opt.churn_rate, opt.churn_pool, (unsigned long long)st.churned,
               (unsigned long long)st.churn_upgraded, (unsigned long long)st.churn_failed,
               (unsigned long long)st.churn_skipped, pending);
        printf("\"churn_connect_ms\":{\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},",
               hist_percentile_ms(&churn_hist, 0.50), hist_percentile_ms(&churn_hist, 0.90),
               hist_percentile_ms(&churn_hist, 0.99), (double)churn_hist.max_us / 1000.0);
    }
    printf("\"other_messages\":%llu,\"unparsed\":%llu,\"oversized\":%llu,\"pings\":%llu,",
           (unsigned long long)st.other_messages, (unsigned long long)st.unparsed,
           (unsigned long long)st.oversized, (unsigned long long)st.pings);
    printf("\"readers_closed\":%d,\"closed_eof\":%d,\"closed_error\":%d,\"protocol_errors\":%d,",
           st.readers_closed, st.closed_eof, st.closed_error, st.protocol_errors);
    printf("\"close_codes\":{");
    bool first = true;
    for (int i = 0; i < 16; i++) {
        if (!st.close_codes[i])
            continue;
        printf("%s\"%d\":%llu", first ? "" : ",", 1000 + i, (unsigned long long)st.close_codes[i]);
        first = false;
    }
    if (st.close_other)
        printf("%s\"other\":%llu", first ? "" : ",", (unsigned long long)st.close_other);
    printf("},\"nonreaders_cut\":%d,\"nonreaders_open\":%d,\"nonreaders_drained_bytes\":%llu,",
           st.nonreaders_cut, st.nonreaders_open,
           (unsigned long long)st.nonreaders_drained_bytes);
    printf("\"cpu_s\":%.3f,\"cpu_window_user_s\":%.3f,\"cpu_window_sys_s\":%.3f,"
           "\"cpu_pct\":%.1f,\"first_error\":\"%s\"}\n",
           cpu[0] + cpu[1], cpu_window[0], cpu_window[1],
           window_s > 0 ? 100.0 * busy / window_s : 0.0, st.first_error);
}

/* ---------------------------------------------------------------- options */

static void usage(void)
{
    fputs("usage: loadclient --port P [--host H] [--source A] [--clients N] [--token T] [--path /]\n"
          "       [--duration S] [--warmup S] [--connect-rate R] [--connect-timeout S]\n"
          "       [--nonreading-fraction F] [--deflate] [--churn-rate R] [--churn-pool N]\n",
          stderr);
    exit(2);
}

static void parse_options(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"host", required_argument, 0, 'h'},       {"port", required_argument, 0, 'p'},
        {"clients", required_argument, 0, 'n'},    {"token", required_argument, 0, 't'},
        {"duration", required_argument, 0, 'd'},   {"warmup", required_argument, 0, 'w'},
        {"path", required_argument, 0, 'P'},       {"connect-rate", required_argument, 0, 'r'},
        {"connect-timeout", required_argument, 0, 'T'},
        {"nonreading-fraction", required_argument, 0, 'f'},
        {"deflate", no_argument, 0, 'z'},
        {"churn-rate", required_argument, 0, 'c'},
        {"churn-pool", required_argument, 0, 'C'},
        {"source", required_argument, 0, 's'},
        {0, 0, 0, 0},
    };
    opt = (struct options){.host = "127.0.0.1", .port = NULL, .token = "", .path = "/",
                           .clients = 1000, .duration = 20, .warmup = 5, .connect_timeout = 60,
                           .churn_pool = -1};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = optarg; break;
        case 'n': opt.clients = atoi(optarg); break;
        case 't': opt.token = optarg; break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'P': opt.path = optarg; break;
        case 'z': opt.deflate = true; break;
        case 'r': opt.connect_rate = atof(optarg); break;
        case 'T': opt.connect_timeout = atof(optarg); break;
        case 'f': opt.nonreading_fraction = atof(optarg); break;
        case 'c': opt.churn_rate = atof(optarg); break;
        case 'C': opt.churn_pool = atoi(optarg); break;
        case 's': opt.source = optarg; break;
        default: usage();
        }
    }
    if (opt.churn_pool < 0 || opt.churn_pool > opt.clients)
        opt.churn_pool = opt.clients;
    if (!opt.port || opt.clients < 1 || opt.duration <= 0 || opt.warmup < 0 ||
        opt.nonreading_fraction < 0 || opt.nonreading_fraction >= 1 || opt.churn_rate < 0 ||
        (opt.churn_rate > 0 && opt.churn_pool < 1))
        usage();
}

int main(int argc, char **argv)
{
    parse_options(argc, argv);
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    resolve();
    build_request();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)opt.clients, sizeof *conns);
    if (epfd < 0 || !conns)
        die("setup failed");
    int nonreaders = 0;
    for (int i = 0; i < opt.clients; i++) {
        conns[i].fd = -1;
        conns[i].nonreading = is_nonreading(i);
        nonreaders += conns[i].nonreading;
        memset(conns[i].last_seq, 0xff, sizeof conns[i].last_seq);   /* -1: none yet */
    }

    double t0 = mono_now(), last_upgrade = t0;
    run_t0 = t0;
    connect_phase(t0, &last_upgrade);
    double connect_s = st.upgraded ? last_upgrade - t0 : 0;
    progress("all_connected", t0);

    churning = true;
    churn_t0 = mono_now();
    run_until(mono_now() + opt.warmup, &last_upgrade);
    double cpu0[2], cpu1[2];
    cpu_seconds(cpu0);
    double w0 = mono_now();
    in_window = true;
    progress("window_start", t0);
    run_until(w0 + opt.duration, &last_upgrade);
    in_window = false;
    churning = false;
    double window_s = mono_now() - w0;
    cpu_seconds(cpu1);
    double cpu_window[2] = {cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]};
    progress("window_end", t0);

    if (nonreaders)
        survey_nonreaders(&last_upgrade);
    close_all();
    print_report(connect_s, window_s, cpu_window, nonreaders);
    return 0;
}
