/*
 * connload: an MQTT 3.1.1 connection-rate load generator over TLS 1.3 with client certificates.
 *
 * It does, per connection, what benchmarks/loadgen.py's connection_rate() does:
 *   TCP connect (TCP_NODELAY) -> TLS 1.3 handshake, presenting the client certificate and verifying
 *   the server against the CA and the server name (also sent as SNI) -> MQTT CONNECT (protocol level
 *   4, clean session, keep-alive 60 s, the client's id) -> wait for CONNACK, return code 0 ->
 *   DISCONNECT -> close, without a TLS close_notify round trip (brokers differ there; it is not
 *   what is measured). Every connection is a full handshake: no TLS session is resumed.
 *
 * It is single-threaded (non-blocking sockets, epoll, one small state machine per connection), so it
 * uses at most one core and leaves the other ones to the broker being measured.
 *
 *   connload --port P --cafile CA --client CERT KEY ID [--client ...] (--seconds S | --count N)
 *            [--host 127.0.0.1] [--servername localhost] [--concurrency N] [--timeout S] [--limit S]
 *
 * Connection slot i always uses client i % (number of clients): with --concurrency equal to the
 * number of clients (the default) no two connections with one client id are ever open at once, so
 * the broker never has to take a session over, which would be a different thing to measure.
 *
 * Output: one JSON line on stdout,
 *   {"ok": n, "failed": n, "seconds": s, "conn_per_s": x, "errors": {"<phase>: <detail>": n, ...}}
 * "ok" counts connections that got CONNACK 0 and wrote DISCONNECT; every other attempt is "failed"
 * and counted under its reason in "errors". "seconds" runs from the first connect to the end of the
 * last connection (the ones in flight when --seconds is over are completed, as loadgen.py does).
 * Exit status: 0 when the run took place (read "failed"), 1 on a setup error (unreadable
 * certificate, key, CA), 2 on bad arguments.
 *
 * Build: gcc -O2 -Wall -Wextra -o connload connload.c -lssl -lcrypto   (OpenSSL 3)
 */

#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 1024
#define MAX_CONCURRENCY 4096
#define MAX_ERROR_KINDS 32

/* ---- options ------------------------------------------------------------------------------ */

struct client {
    const char *cert, *key, *id;
    SSL_CTX *ctx;               /* one context per client: its certificate is loaded once */
    unsigned char *connect;     /* its CONNECT packet, built once */
    size_t connect_len;
};

static struct client clients[MAX_CLIENTS];
static int n_clients;

static const char *opt_host = "127.0.0.1";
static const char *opt_port;
static const char *opt_cafile;
static const char *opt_servername = "localhost";
static int opt_concurrency;      /* 0: one per client */
static double opt_seconds = -1;  /* start new connections for this long; <0: not set */
static long opt_count = -1;      /* or until this many have been attempted; <0: not set */
static double opt_timeout = 5.0; /* per connection, from TCP connect to DISCONNECT written */
static double opt_limit = -1;    /* hard bound on the whole run; <0: --seconds + 60 */

static const char USAGE[] =
    "usage: connload --port P --cafile CA --client CERT KEY ID [--client CERT KEY ID ...]\n"
    "                (--seconds S | --count N | both) [--host H] [--servername NAME]\n"
    "                [--concurrency N] [--timeout S] [--limit S]\n"
    "  --client CERT KEY ID  a client certificate (PEM, with its chain), its key and the MQTT client id\n"
    "                        to connect with; repeat for more clients\n"
    "  --seconds S           start new connections for S seconds (those in flight then are finished)\n"
    "  --count N             or until N connections have been attempted\n"
    "  --host H              connect to H (default 127.0.0.1)\n"
    "  --servername NAME     SNI and the name the server certificate must carry (default localhost)\n"
    "  --concurrency N       connections open at once (default: one per client)\n"
    "  --timeout S           bound on one connection, connect to DISCONNECT (default 5)\n"
    "  --limit S             bound on the whole run (default --seconds + 60)\n";

static void usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("connload: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fputs(USAGE, stderr);
    exit(2);
}

static double parse_number(const char *flag, const char *text, double min, double max)
{
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || end == text || *end || value < min || value > max)
        usage("%s: expected a number in [%g, %g], got '%s'", flag, min, max, text);
    return value;
}

/* The value after the flag at argv[*i]; moves *i onto it. */
static const char *value(int argc, char **argv, int *i)
{
    if (*i + 1 >= argc)
        usage("%s needs a value", argv[*i]);
    return argv[++*i];
}

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "--help") || !strcmp(flag, "-h")) {
            fputs(USAGE, stdout);
            exit(0);
        } else if (!strcmp(flag, "--host")) {
            opt_host = value(argc, argv, &i);
        } else if (!strcmp(flag, "--port")) {
            opt_port = value(argc, argv, &i);
            parse_number(flag, opt_port, 1, 65535);
        } else if (!strcmp(flag, "--cafile")) {
            opt_cafile = value(argc, argv, &i);
        } else if (!strcmp(flag, "--servername")) {
            opt_servername = value(argc, argv, &i);
        } else if (!strcmp(flag, "--client")) {
            if (i + 3 >= argc)
                usage("--client needs CERT KEY ID");
            if (n_clients == MAX_CLIENTS)
                usage("at most %d clients", MAX_CLIENTS);
            struct client *c = &clients[n_clients++];
            c->cert = argv[i + 1];
            c->key = argv[i + 2];
            c->id = argv[i + 3];
            i += 3;
            if (!*c->id || strlen(c->id) > 65535)
                usage("client id must be 1 to 65535 bytes");
        } else if (!strcmp(flag, "--concurrency")) {
            opt_concurrency = (int)parse_number(flag, value(argc, argv, &i), 1, MAX_CONCURRENCY);
        } else if (!strcmp(flag, "--seconds")) {
            opt_seconds = parse_number(flag, value(argc, argv, &i), 0.001, 86400);
        } else if (!strcmp(flag, "--count")) {
            opt_count = (long)parse_number(flag, value(argc, argv, &i), 1, 1e12);
        } else if (!strcmp(flag, "--timeout")) {
            opt_timeout = parse_number(flag, value(argc, argv, &i), 0.001, 3600);
        } else if (!strcmp(flag, "--limit")) {
            opt_limit = parse_number(flag, value(argc, argv, &i), 0.001, 86400 * 2);
        } else {
            usage("unknown argument '%s'", flag);
        }
    }
    if (!opt_port || !opt_cafile)
        usage("--port and --cafile are required");
    if (!n_clients)
        usage("at least one --client CERT KEY ID is required");
    if (opt_seconds < 0 && opt_count < 0)
        usage("--seconds or --count is required");
    if (!opt_concurrency)
        opt_concurrency = n_clients;
    if (opt_limit < 0)
        opt_limit = (opt_seconds > 0 ? opt_seconds : 0) + 60;
    if (opt_concurrency > n_clients)
        fprintf(stderr, "connload: warning: %d connections over %d client ids: some ids will be connected "
                        "twice at once, and the broker may take sessions over\n", opt_concurrency, n_clients);
}

/* ---- error accounting --------------------------------------------------------------------- */

/* Failures by reason, "<phase>: <detail>"; details come from errno, OpenSSL or the CONNACK. */
static struct { char key[160]; long count; } errors[MAX_ERROR_KINDS];
static int n_error_kinds;
static long n_ok, n_failed;

static void count_error(const char *key)
{
    n_failed++;
    for (int i = 0; i < n_error_kinds; i++)
        if (!strcmp(errors[i].key, key)) {
            errors[i].count++;
            return;
        }
    /* the table is bounded: the last entry collects whatever does not fit */
    int i = n_error_kinds < MAX_ERROR_KINDS ? n_error_kinds++ : MAX_ERROR_KINDS - 1;
    if (i == MAX_ERROR_KINDS - 1)
        snprintf(errors[i].key, sizeof errors[i].key, "other");
    else
        snprintf(errors[i].key, sizeof errors[i].key, "%s", key);
    errors[i].count++;
}

static void print_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

/* ---- MQTT packets ------------------------------------------------------------------------- */

/* CONNECT exactly as loadgen.connect_packet(): "MQTT", level 4, clean session, keep-alive 60. */
static void build_connect(struct client *c)
{
    size_t id_len = strlen(c->id);
    size_t body = 2 + 4 + 1 + 1 + 2 + 2 + id_len;
    c->connect = malloc(1 + 4 + body); /* fixed header: type byte, remaining length (at most 4 bytes) */
    if (!c->connect) {
        perror("connload: malloc");
        exit(1);
    }
    unsigned char *p = c->connect;
    *p++ = 0x10;
    for (size_t n = body;;) { /* remaining length, 7 bits a byte, continuation bit */
        unsigned char byte = n % 128;
        n /= 128;
        *p++ = byte | (n ? 0x80 : 0);
        if (!n)
            break;
    }
    const unsigned char head[] = {0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60};
    memcpy(p, head, sizeof head);
    p += sizeof head;
    *p++ = (unsigned char)(id_len >> 8);
    *p++ = (unsigned char)(id_len & 0xff);
    memcpy(p, c->id, id_len);
    p += id_len;
    c->connect_len = (size_t)(p - c->connect);
}

static const unsigned char DISCONNECT[] = {0xe0, 0x00};

/* ---- TLS setup ---------------------------------------------------------------------------- */

static void setup_failed(const char *what, const char *path)
{
    fprintf(stderr, "connload: %s %s\n", what, path);
    ERR_print_errors_fp(stderr);
    exit(1);
}

/* As edge_runtime.tls.client_tls_context(): TLS 1.3 only, verify the server, present our cert. */
static SSL_CTX *client_context(const struct client *c)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        setup_failed("SSL_CTX_new", "");
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    /* each connection must cost a full handshake, as loadgen's do: no session cache, no resumption */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (SSL_CTX_load_verify_locations(ctx, opt_cafile, NULL) != 1)
        setup_failed("cannot load CA file", opt_cafile);
    if (SSL_CTX_use_certificate_chain_file(ctx, c->cert) != 1)
        setup_failed("cannot load certificate", c->cert);
    if (SSL_CTX_use_PrivateKey_file(ctx, c->key, SSL_FILETYPE_PEM) != 1)
        setup_failed("cannot load key", c->key);
    if (SSL_CTX_check_private_key(ctx) != 1)
        setup_failed("key does not match certificate", c->cert);
    return ctx;
}

/* ---- connections -------------------------------------------------------------------------- */

enum state { IDLE, TCP_CONNECTING, HANDSHAKE, SEND_CONNECT, WAIT_CONNACK, SEND_DISCONNECT };
static const char *const phase_name[] = {"idle", "connect", "handshake", "send_connect", "connack",
                                         "disconnect"};

struct conn {
    enum state state;
    int fd;
    SSL *ssl;
    struct client *client;
    double deadline;
    uint32_t events;            /* what epoll currently waits for on fd */
    unsigned char in[8];        /* the CONNACK: 0x20, length 2, flags, return code */
    size_t in_len;
};

static struct conn *conns;
static int epfd;
static struct addrinfo *target;
static long n_started;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void close_conn(struct conn *c)
{
    if (c->ssl)
        SSL_free(c->ssl); /* no SSL_shutdown: no close_notify, see the top of this file */
    if (c->fd >= 0)
        close(c->fd);     /* closing the descriptor also removes it from the epoll set */
    c->ssl = NULL;
    c->fd = -1;
    c->state = IDLE;
}

static void fail(struct conn *c, const char *detail)
{
    char key[160];
    snprintf(key, sizeof key, "%s: %s", phase_name[c->state], detail);
    count_error(key);
    close_conn(c);
}

static void wait_for(struct conn *c, uint32_t events)
{
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
        fail(c, strerror(errno));
        return;
    }
    c->events = events;
}

/*
 * A TLS call did not complete: wait for what it wants, or record why it failed. Returns 1 when the
 * connection is still going (waiting), 0 when it has been failed and closed.
 */
static int tls_blocked(struct conn *c, int ret)
{
    int err = SSL_get_error(c->ssl, ret);
    if (err == SSL_ERROR_WANT_READ) {
        wait_for(c, EPOLLIN);
        return c->state != IDLE;
    }
    if (err == SSL_ERROR_WANT_WRITE) {
        wait_for(c, EPOLLOUT);
        return c->state != IDLE;
    }
    char detail[128];
    long verify = SSL_get_verify_result(c->ssl);
    unsigned long e = ERR_peek_last_error();
    if (verify != X509_V_OK)
        snprintf(detail, sizeof detail, "server certificate: %s", X509_verify_cert_error_string(verify));
    else if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && !e && !errno))
        snprintf(detail, sizeof detail, "closed by the broker");
    else if (err == SSL_ERROR_SYSCALL && !e)
        snprintf(detail, sizeof detail, "%s", strerror(errno));
    else if (e && ERR_reason_error_string(e))
        snprintf(detail, sizeof detail, "%s", ERR_reason_error_string(e));
    else
        snprintf(detail, sizeof detail, "TLS error %d", err);
    ERR_clear_error();
    fail(c, detail);
    return 0;
}

static void start_conn(struct conn *c, struct client *client)
{
    n_started++;
    c->client = client;
    c->state = TCP_CONNECTING;
    c->in_len = 0;
    c->deadline = now() + opt_timeout;
    c->fd = socket(target->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(c, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->events = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        fail(c, strerror(errno));
        return;
    }
    if (connect(c->fd, target->ai_addr, target->ai_addrlen) != 0 && errno != EINPROGRESS)
        fail(c, strerror(errno));
    /* else: writable once connected (or failed); step() reads SO_ERROR then */
}

/* Advance one connection as far as it can go without blocking. */
static void step(struct conn *c)
{
    int ret;
    switch (c->state) {
    case IDLE:
        return;
    case TCP_CONNECTING: {
        int soerr = 0;
        socklen_t len = sizeof soerr;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0)
            soerr = errno;
        if (soerr) {
            fail(c, strerror(soerr));
            return;
        }
        c->ssl = SSL_new(c->client->ctx);
        if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)
            /* SNI, and the name the server certificate must carry, as loadgen's server_hostname */
            || !SSL_set_tlsext_host_name(c->ssl, opt_servername) || !SSL_set1_host(c->ssl, opt_servername)) {
            fail(c, "cannot set up the TLS connection");
            return;
        }
        c->state = HANDSHAKE;
    }
        /* fall through */
    case HANDSHAKE:
        ERR_clear_error();
        errno = 0;
        ret = SSL_connect(c->ssl);
        if (ret != 1) {
            tls_blocked(c, ret);
            return;
        }
        c->state = SEND_CONNECT;
        /* fall through */
    case SEND_CONNECT:
        ERR_clear_error();
        errno = 0;
        /* a retried SSL_write must pass the same buffer and length: the packet is per client, fixed */
        ret = SSL_write(c->ssl, c->client->connect, (int)c->client->connect_len);
        if (ret <= 0) {
            tls_blocked(c, ret);
            return;
        }
        c->state = WAIT_CONNACK;
        wait_for(c, EPOLLIN);
        if (c->state == IDLE)
            return;
        /* fall through */
    case WAIT_CONNACK:
        /* TLS 1.3 session tickets may arrive before the CONNACK: SSL_read skips them (WANT_READ) */
        while (c->in_len < 4) {
            ERR_clear_error();
            errno = 0;
            ret = SSL_read(c->ssl, c->in + c->in_len, (int)(4 - c->in_len));
            if (ret <= 0) {
                tls_blocked(c, ret);
                return;
            }
            c->in_len += (size_t)ret;
            if (c->in_len >= 2 && (c->in[0] != 0x20 || c->in[1] != 2)) {
                char detail[64];
                snprintf(detail, sizeof detail, "not a CONNACK (0x%02x 0x%02x)", c->in[0], c->in[1]);
                fail(c, detail);
                return;
            }
        }
        if (c->in[3] != 0) {
            char detail[64];
            snprintf(detail, sizeof detail, "refused, return code %d", c->in[3]);
            fail(c, detail);
            return;
        }
        c->state = SEND_DISCONNECT;
        /* fall through */
    case SEND_DISCONNECT:
        ERR_clear_error();
        errno = 0;
        ret = SSL_write(c->ssl, DISCONNECT, sizeof DISCONNECT);
        if (ret <= 0) {
            tls_blocked(c, ret);
            return;
        }
        n_ok++;
        close_conn(c);
        return;
    }
}

/* ---- main loop ---------------------------------------------------------------------------- */

static void print_result(double seconds)
{
    printf("{\"ok\": %ld, \"failed\": %ld, \"seconds\": %.6f, \"conn_per_s\": %.3f, \"errors\": {",
           n_ok, n_failed, seconds, seconds > 0 ? (double)n_ok / seconds : 0.0);
    for (int i = 0; i < n_error_kinds; i++) {
        if (i)
            fputs(", ", stdout);
        print_json_string(errors[i].key);
        printf(": %ld", errors[i].count);
    }
    puts("}}");
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN); /* a broker closing on us is a counted failure, not a fatal signal */

    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int gai = getaddrinfo(opt_host, opt_port, &hints, &target);
    if (gai != 0)
        usage("cannot resolve %s:%s: %s", opt_host, opt_port, gai_strerror(gai));
    for (int i = 0; i < n_clients; i++) {
        clients[i].ctx = client_context(&clients[i]);
        build_connect(&clients[i]);
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)opt_concurrency, sizeof *conns);
    if (epfd < 0 || !conns) {
        perror("connload: setup");
        return 1;
    }
    for (int i = 0; i < opt_concurrency; i++) {
        conns[i].fd = -1;
        conns[i].state = IDLE;
    }

    double started = now();
    double stop_starting = opt_seconds > 0 ? started + opt_seconds : started + opt_limit;
    double hard_end = started + opt_limit;
    struct epoll_event events[64];
    for (;;) {
        double t = now();
        /* refill idle slots while there is time and count left */
        int active = 0;
        for (int i = 0; i < opt_concurrency; i++) {
            struct conn *c = &conns[i];
            if (c->state == IDLE && t < stop_starting && (opt_count < 0 || n_started < opt_count)) {
                start_conn(c, &clients[i % n_clients]); /* step() goes on once epoll says writable */
            }
            active += c->state != IDLE;
        }
        if (!active) {
            if (t >= stop_starting || (opt_count >= 0 && n_started >= opt_count))
                break;
            continue; /* every slot failed at once: start again */
        }
        if (t >= hard_end)
            break;
        /* sleep until an event, the next per-connection deadline or the end of the run */
        double wake = hard_end;
        for (int i = 0; i < opt_concurrency; i++)
            if (conns[i].state != IDLE && conns[i].deadline < wake)
                wake = conns[i].deadline;
        int wait_ms = (int)((wake - t) * 1000) + 1;
        int n = epoll_wait(epfd, events, 64, wait_ms);
        if (n < 0 && errno != EINTR) {
            perror("connload: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++)
            step(events[i].data.ptr);
        t = now();
        for (int i = 0; i < opt_concurrency; i++)
            if (conns[i].state != IDLE && t >= conns[i].deadline)
                fail(&conns[i], "timed out");
    }

    /* the run's hard limit: connections still open are failures, never dropped from the count */
    double ended = now();
    for (int i = 0; i < opt_concurrency; i++)
        if (conns[i].state != IDLE)
            fail(&conns[i], "cut by --limit");
    print_result(ended - started);

    for (int i = 0; i < n_clients; i++) {
        SSL_CTX_free(clients[i].ctx);
        free(clients[i].connect);
    }
    free(conns);
    freeaddrinfo(target);
    close(epfd);
    return 0;
}
