/*
 * loadgen - closed-loop echo load generator for kloop's benchmarks.
 *
 * N connections each send a message of S bytes and wait until all S bytes
 * have come back before sending the next one (closed loop). With
 * --pipeline D each connection keeps D messages outstanding instead of one.
 * The measured phase follows a warm-up; the result is requests per second,
 * a latency histogram (log buckets, ~1.5 % resolution) and, when the server's
 * pid is given, the server's CPU time per request and its RSS, read from
 * /proc at the exact edges of the measured phase.
 *
 * Two engines:
 *   uring (default): io_uring, every connection's send and multishot recv
 *     (provided-buffer ring) queued and submitted together, one
 *     io_uring_enter per loop iteration, DEFER_TASKRUN where available.
 *   epoll: nonblocking sockets, level-triggered epoll, one recv and one send
 *     per message; the classic client, kept for comparison.
 *
 * The load generator runs on one core and shares the machine with the server,
 * so it is written to spend as little CPU per request as it can: no
 * allocation on the data path, one clock read per batch of completions.
 *
 * --tls (built with OpenSSL): every connection does one TLS handshake
 * (blocking, before the warm-up), then the same closed-loop echo runs over
 * TLS records. With the uring engine OpenSSL works on memory BIOs: received
 * ciphertext is fed to it and encrypted output is sent with io_uring, so the
 * data path keeps one io_uring_enter per loop iteration. With the epoll
 * engine OpenSSL reads and writes the nonblocking socket itself.
 *
 * --udp: the same closed loop over connected UDP sockets, one datagram of S
 * bytes per message (pipeline 1 only: a lost datagram would otherwise be
 * indistinguishable from a late one).
 *
 * --lines L: every message is L lines (its bytes end in '\n' at L evenly
 * spaced places), for servers that read requests with readline().
 *
 * --churn: connect/accept/close churn. Each of the N connection slots
 * connects, sends one message, reads the echo until the server closes the
 * connection, closes its socket and starts over (epoll, nonblocking
 * connect). A "request" is one such connection; its latency runs from
 * socket() to the server's FIN. The server closes first, so TIME_WAIT stays
 * on the server's side and the client's ports are free for reuse at once.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <liburing.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

/* ------------------------------------------------------------------------ */
/* Latency histogram: 64 linear sub-buckets per power of two.              */
/* ------------------------------------------------------------------------ */

#define HIST_SUB_BITS 6u
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BLOCKS 44u /* values up to 2^49 ns, far beyond any run */
#define HIST_LEN (HIST_BLOCKS * HIST_SUB)

struct hist {
  uint64_t counts[HIST_LEN];
  uint64_t n;
  uint64_t sum;
  uint64_t min;
  uint64_t max;
};

static unsigned hist_index(uint64_t v) {
  if (v < HIST_SUB) return (unsigned)v;
  unsigned e = 63u - (unsigned)__builtin_clzll(v);
  unsigned shift = e - HIST_SUB_BITS;
  uint64_t idx = (uint64_t)(shift + 1u) * HIST_SUB + ((v >> shift) - HIST_SUB);
  return idx >= HIST_LEN ? HIST_LEN - 1u : (unsigned)idx;
}

/* Midpoint of the range of values that fall into bucket idx. */
static uint64_t hist_value(unsigned idx) {
  unsigned block = idx >> HIST_SUB_BITS;
  if (block == 0) return idx;
  unsigned shift = block - 1u;
  uint64_t top = (uint64_t)(idx & (HIST_SUB - 1u)) + HIST_SUB;
  return (top << shift) + ((1ull << shift) >> 1);
}

static void hist_reset(struct hist *h) {
  memset(h, 0, sizeof(*h));
  h->min = UINT64_MAX;
}

static inline void hist_record(struct hist *h, uint64_t v) {
  h->counts[hist_index(v)]++;
  h->n++;
  h->sum += v;
  if (v < h->min) h->min = v;
  if (v > h->max) h->max = v;
}

static uint64_t hist_quantile(const struct hist *h, double q) {
  if (h->n == 0) return 0;
  uint64_t target = (uint64_t)ceil(q * (double)h->n);
  if (target < 1) target = 1;
  uint64_t seen = 0;
  for (unsigned i = 0; i < HIST_LEN; i++) {
    seen += h->counts[i];
    if (seen >= target) {
      uint64_t v = hist_value(i);
      if (v < h->min) v = h->min;
      if (v > h->max) v = h->max;
      return v;
    }
  }
  return h->max;
}

/* ------------------------------------------------------------------------ */
/* Options and global state                                                 */
/* ------------------------------------------------------------------------ */

enum engine { ENGINE_URING, ENGINE_EPOLL };
enum phase { PHASE_WARMUP, PHASE_MEASURE, PHASE_DRAIN, PHASE_DONE };

struct options {
  const char *host;
  const char *port;
  const char *unix_path;
  unsigned conns;
  uint64_t size;
  unsigned depth;
  double duration;
  double warmup;
  uint64_t requests; /* 0: run for `duration` */
  enum engine engine;
  bool multishot;
  unsigned buf_size;
  unsigned buf_count;
  int server_pid;
  int cpu;
  bool verify;
  bool json;
  const char *label;
  double idle; /* >= 0: idle-connection memory mode, hold for this long */
  bool tls;
  const char *tls_version; /* "1.2", "1.3" or NULL (negotiate) */
  const char *tls_ciphers; /* TLS 1.2 cipher list */
  const char *tls_suites;  /* TLS 1.3 cipher suites */
  const char *tls_sni;
  bool udp;       /* connected UDP sockets, one datagram per message */
  unsigned lines; /* > 0: messages are this many '\n'-terminated lines */
  bool churn;     /* one message per connection, server closes */
};

struct conn {
  int fd;
  bool dead;
  bool send_busy;   /* uring: a send is in flight */
  bool recv_armed;  /* uring: a recv is in flight */
  bool want_out;    /* epoll: EPOLLOUT registered */
  uint32_t ts_head; /* ring of send timestamps of outstanding messages */
  uint32_t ts_count;
  uint64_t to_send;    /* bytes queued and not yet accepted by the kernel */
  uint64_t sent_total; /* bytes accepted by the kernel */
  uint64_t rx_total;   /* bytes received */
  uint64_t rx_partial; /* bytes of the current message received so far */
  uint64_t *ts;
  char *rbuf; /* uring single-shot recv buffer */
#ifdef LOADGEN_TLS
  SSL *ssl;
  BIO *rbio, *wbio; /* uring: memory BIOs (ciphertext in, ciphertext out) */
  char *tx;         /* uring: ciphertext being sent */
  size_t tx_len, tx_off, tx_cap;
#endif
};

struct proc_sample {
  bool ok;
  double user_s;
  double sys_s;
  long rss_kb;
  long hwm_kb;
};

static struct options opt;
static struct conn *conns;
static struct hist hist;
static char *sendbuf;
static size_t sendbuf_len;
static enum phase phase;
static uint64_t t_start, t_measure, t_measure_end, t_end_deadline;
static uint64_t measured;      /* responses completed in the measured phase */
static uint64_t last_progress; /* time of the last completed response */
static bool stalled;
static uint64_t warm_requests; /* responses completed during warm-up */
static uint64_t verify_errors;
static unsigned dead_conns;
static int first_error;
static struct proc_sample srv0, srv1;
static struct rusage ru0, ru1;
static volatile sig_atomic_t interrupted;
#define STALL_NS 10000000000ull

static void die(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("loadgen: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(2);
}

static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void on_signal(int sig) {
  (void)sig;
  interrupted = 1;
}

/* ------------------------------------------------------------------------ */
/* Server process sampling                                                  */
/* ------------------------------------------------------------------------ */

static struct proc_sample sample_proc(int pid) {
  struct proc_sample s = {0};
  if (pid <= 0) return s;
  char path[64], buf[4096];
  snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return s;
  ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return s;
  buf[n] = 0;
  char *p = strrchr(buf, ')');
  if (!p) return s;
  /* Fields after "comm)": state is field 3; utime 14, stime 15. */
  unsigned long long utime = 0, stime = 0;
  int field = 2;
  for (char *tok = strtok(p + 1, " "); tok; tok = strtok(NULL, " ")) {
    field++;
    if (field == 14) utime = strtoull(tok, NULL, 10);
    if (field == 15) {
      stime = strtoull(tok, NULL, 10);
      break;
    }
  }
  double hz = (double)sysconf(_SC_CLK_TCK);
  s.user_s = (double)utime / hz;
  s.sys_s = (double)stime / hz;
  snprintf(path, sizeof(path), "/proc/%d/status", pid);
  FILE *f = fopen(path, "re");
  if (f) {
    char line[256];
    while (fgets(line, sizeof(line), f)) {
      if (!strncmp(line, "VmRSS:", 6)) s.rss_kb = strtol(line + 6, NULL, 10);
      if (!strncmp(line, "VmHWM:", 6)) s.hwm_kb = strtol(line + 6, NULL, 10);
    }
    fclose(f);
  }
  s.ok = true;
  return s;
}

/* ------------------------------------------------------------------------ */
/* Connection setup                                                         */
/* ------------------------------------------------------------------------ */

static struct sockaddr_storage target;
static socklen_t target_len;
static char target_name[300];

static void resolve_target(void) {
  if (opt.unix_path) {
    struct sockaddr_un *un = (struct sockaddr_un *)&target;
    if (strlen(opt.unix_path) >= sizeof(un->sun_path)) die("unix path too long");
    un->sun_family = AF_UNIX;
    strcpy(un->sun_path, opt.unix_path);
    target_len = sizeof(*un);
    snprintf(target_name, sizeof(target_name), "unix:%s", opt.unix_path);
    return;
  }
  struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_protocol = IPPROTO_TCP};
  struct addrinfo *res = NULL;
  int rc = getaddrinfo(opt.host, opt.port, &hints, &res);
  if (rc != 0 || !res) die("cannot resolve %s:%s: %s", opt.host, opt.port, gai_strerror(rc));
  memcpy(&target, res->ai_addr, res->ai_addrlen);
  target_len = res->ai_addrlen;
  freeaddrinfo(res);
  snprintf(target_name, sizeof(target_name), "%s:%s", opt.host, opt.port);
}

static int open_conn(bool nonblock) {
  int fd = socket(target.ss_family, (opt.udp ? SOCK_DGRAM : SOCK_STREAM) | SOCK_CLOEXEC, 0);
  if (fd < 0) die("socket: %s", strerror(errno));
  if (target.ss_family != AF_UNIX && !opt.udp) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  for (int attempt = 0;; attempt++) {
    if (connect(fd, (struct sockaddr *)&target, target_len) == 0) break;
    if ((errno == ECONNREFUSED || errno == EAGAIN) && attempt < 50) {
      usleep(100000);
      continue;
    }
    die("connect %s: %s", target_name, strerror(errno));
  }
  if (nonblock) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

/* ------------------------------------------------------------------------ */
/* TLS client (OpenSSL)                                                     */
/* ------------------------------------------------------------------------ */

#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;
static char *tls_plain; /* decrypted bytes; consumed before the next SSL_read */
#define TLS_PLAIN_LEN 65536
static char tls_version_used[32];
static char tls_cipher_used[96];
static char tls_error[160];

static const char *tls_errstr(void) {
  unsigned long e = ERR_get_error();
  ERR_clear_error();
  return e ? ERR_error_string(e, NULL) : "no OpenSSL error queued";
}

static void tls_setup(void) {
  tls_ctx = SSL_CTX_new(TLS_client_method());
  if (!tls_ctx) die("SSL_CTX_new: %s", tls_errstr());
  /* A benchmark client: the server's test certificate is not verified. */
  SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
  SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (opt.tls_version) {
    int v;
    if (!strcmp(opt.tls_version, "1.2"))
      v = TLS1_2_VERSION;
    else if (!strcmp(opt.tls_version, "1.3"))
      v = TLS1_3_VERSION;
    else
      die("unknown TLS version %s (1.2, 1.3)", opt.tls_version);
    SSL_CTX_set_min_proto_version(tls_ctx, v);
    SSL_CTX_set_max_proto_version(tls_ctx, v);
  }
  if (opt.tls_ciphers && SSL_CTX_set_cipher_list(tls_ctx, opt.tls_ciphers) != 1)
    die("cipher list %s: %s", opt.tls_ciphers, tls_errstr());
  if (opt.tls_suites && SSL_CTX_set_ciphersuites(tls_ctx, opt.tls_suites) != 1)
    die("cipher suites %s: %s", opt.tls_suites, tls_errstr());
  tls_plain = malloc(TLS_PLAIN_LEN);
  if (!tls_plain) die("out of memory");
}

/* Blocking handshake on c->fd, then hand the connection to the engine:
 * memory BIOs for io_uring, the (now nonblocking) socket for epoll. */
static void tls_connect(struct conn *c) {
  c->ssl = SSL_new(tls_ctx);
  if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) die("SSL_new: %s", tls_errstr());
  SSL_set_tlsext_host_name(c->ssl, opt.tls_sni);
  if (SSL_connect(c->ssl) != 1) die("TLS handshake with %s: %s", target_name, tls_errstr());
  if (!tls_version_used[0]) {
    snprintf(tls_version_used, sizeof(tls_version_used), "%s", SSL_get_version(c->ssl));
    snprintf(tls_cipher_used, sizeof(tls_cipher_used), "%s", SSL_get_cipher_name(c->ssl));
  }
  if (opt.engine == ENGINE_URING) {
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    if (!c->rbio || !c->wbio) die("BIO_new: %s", tls_errstr());
    BIO_set_mem_eof_return(c->rbio, -1); /* empty means "wait", not EOF */
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    c->tx_cap = 65536;
    c->tx = malloc(c->tx_cap);
    if (!c->tx) die("out of memory");
  } else {
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
  }
}

/* After SSL_read/SSL_write returned n <= 0: true if the connection lives on. */
static bool tls_retry(struct conn *c, int n) {
  int err = SSL_get_error(c->ssl, n);
  if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return true;
  if (!tls_error[0])
    snprintf(tls_error, sizeof(tls_error), "%s",
             err == SSL_ERROR_ZERO_RETURN ? "close_notify from the server"
             : err == SSL_ERROR_SYSCALL   ? strerror(errno ? errno : ECONNRESET)
                                          : tls_errstr());
  return false;
}

static void conn_fail(struct conn *c, int err);
static void on_received(struct conn *c, const char *data, size_t n, uint64_t now);

/* Decrypt every complete record OpenSSL can read now. */
static void tls_read_all(struct conn *c, uint64_t now) {
  for (;;) {
    int n = SSL_read(c->ssl, tls_plain, TLS_PLAIN_LEN);
    if (n > 0) {
      on_received(c, tls_plain, (size_t)n, now);
      if (c->dead) return;
      continue;
    }
    if (!tls_retry(c, n)) conn_fail(c, EPROTO);
    return;
  }
}

/* Encrypt all queued plaintext into the write BIO (uring engine). */
static bool tls_encrypt_queued(struct conn *c) {
  while (c->to_send > 0) {
    size_t pos = (size_t)(c->sent_total % opt.size);
    uint64_t len = c->to_send;
    if (len > sendbuf_len - pos) len = sendbuf_len - pos;
    if (len > (1u << 30)) len = 1u << 30;
    int n = SSL_write(c->ssl, sendbuf + pos, (int)len);
    if (n <= 0) {
      if (!tls_retry(c, n)) conn_fail(c, EPROTO);
      return false;
    }
    c->to_send -= (uint64_t)n;
    c->sent_total += (uint64_t)n;
  }
  return true;
}
#endif

/* ------------------------------------------------------------------------ */
/* Engine-independent request bookkeeping                                   */
/* ------------------------------------------------------------------------ */

static void conn_fail(struct conn *c, int err) {
  if (c->dead) return;
  c->dead = true;
  dead_conns++;
  if (!first_error) first_error = err ? err : ECONNRESET;
}

static inline void queue_message(struct conn *c, uint64_t now) {
  c->ts[(c->ts_head + c->ts_count) % opt.depth] = now;
  c->ts_count++;
  c->to_send += opt.size;
}

static void verify_chunk(const struct conn *c, const char *data, size_t n) {
  uint64_t off = c->rx_total;
  while (n > 0) {
    size_t pos = (size_t)(off % opt.size);
    size_t chunk = opt.size - pos;
    if (chunk > n) chunk = n;
    if (memcmp(data, sendbuf + pos, chunk) != 0) verify_errors++;
    data += chunk;
    n -= chunk;
    off += chunk;
  }
}

/* One response completed: its latency (sent at t0), the request counter,
 * and the end of a run of -n requests. */
static void count_response(uint64_t t0, uint64_t now) {
  last_progress = now;
  if (phase == PHASE_MEASURE) {
    hist_record(&hist, now - t0);
    measured++;
    if (opt.requests && measured >= opt.requests) {
      phase = PHASE_DRAIN;
      t_measure_end = now;
      srv1 = sample_proc(opt.server_pid);
      getrusage(RUSAGE_SELF, &ru1);
    }
  } else if (phase == PHASE_WARMUP) {
    warm_requests++;
  }
}

/* Account n received bytes; completes messages, queues the next ones. */
static void on_received(struct conn *c, const char *data, size_t n, uint64_t now) {
  if (opt.verify) verify_chunk(c, data, n);
  c->rx_total += n;
  c->rx_partial += n;
  while (c->rx_partial >= opt.size) {
    c->rx_partial -= opt.size;
    if (c->ts_count == 0) { /* more bytes came back than were sent */
      verify_errors++;
      conn_fail(c, EPROTO);
      return;
    }
    uint64_t t0 = c->ts[c->ts_head];
    c->ts_head = (c->ts_head + 1) % opt.depth;
    c->ts_count--;
    count_response(t0, now);
    if (phase == PHASE_WARMUP || phase == PHASE_MEASURE) queue_message(c, now);
  }
}

/* Phase transitions driven by the clock; called once per loop iteration. */
static void tick(uint64_t now) {
  if (!last_progress) last_progress = now;
  if (phase <= PHASE_MEASURE && now - last_progress > STALL_NS) {
    stalled = true; /* no echo for STALL_NS: the server hangs; end the run */
    interrupted = 1;
  }
  if (interrupted && phase < PHASE_DRAIN) {
    if (phase == PHASE_WARMUP) t_measure = now;
    phase = PHASE_DRAIN;
    t_measure_end = now;
    srv1 = sample_proc(opt.server_pid);
    getrusage(RUSAGE_SELF, &ru1);
  }
  if (phase == PHASE_WARMUP && now >= t_start + (uint64_t)(opt.warmup * 1e9)) {
    phase = PHASE_MEASURE;
    t_measure = now;
    hist_reset(&hist);
    measured = 0;
    srv0 = sample_proc(opt.server_pid);
    getrusage(RUSAGE_SELF, &ru0);
  }
  if (phase == PHASE_MEASURE && !opt.requests &&
      now >= t_measure + (uint64_t)(opt.duration * 1e9)) {
    phase = PHASE_DRAIN;
    t_measure_end = now;
    srv1 = sample_proc(opt.server_pid);
    getrusage(RUSAGE_SELF, &ru1);
  }
  if (phase == PHASE_DRAIN) {
    if (!t_end_deadline) t_end_deadline = now + 2000000000ull;
    bool idle = true;
    for (unsigned i = 0; i < opt.conns && idle; i++)
      if (!conns[i].dead && conns[i].ts_count) idle = false;
    if (idle || now >= t_end_deadline) phase = PHASE_DONE;
  }
  if (dead_conns == opt.conns && phase < PHASE_DONE) {
    if (phase <= PHASE_MEASURE) {
      if (phase == PHASE_WARMUP) t_measure = now;
      t_measure_end = now;
      srv1 = sample_proc(opt.server_pid);
      getrusage(RUSAGE_SELF, &ru1);
    }
    phase = PHASE_DONE;
  }
}

/* ------------------------------------------------------------------------ */
/* io_uring engine                                                          */
/* ------------------------------------------------------------------------ */

enum { OP_SEND = 1, OP_RECV = 2 };
#define BGID 7

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;
static unsigned br_mask;
static unsigned br_pending; /* buffers added since the last advance */

static struct io_uring_sqe *get_sqe(void) {
  struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
  if (!sqe) {
    io_uring_submit(&ring);
    sqe = io_uring_get_sqe(&ring);
    if (!sqe) die("submission queue full");
  }
  return sqe;
}

static void uring_send(struct conn *c, unsigned idx) {
#ifdef LOADGEN_TLS
  if (opt.tls) {
    if (c->send_busy || c->dead) return;
    if (c->tx_off == c->tx_len) { /* previous ciphertext all sent: encrypt more */
      c->tx_off = c->tx_len = 0;
      if (!tls_encrypt_queued(c)) return;
      size_t pending = BIO_ctrl_pending(c->wbio);
      if (pending == 0) return;
      if (pending > c->tx_cap) {
        while (c->tx_cap < pending) c->tx_cap *= 2;
        free(c->tx);
        c->tx = malloc(c->tx_cap);
        if (!c->tx) die("out of memory");
      }
      int n = BIO_read(c->wbio, c->tx, (int)pending);
      if (n <= 0) return;
      c->tx_len = (size_t)n;
    }
    struct io_uring_sqe *sqe = get_sqe();
    io_uring_prep_send(sqe, c->fd, c->tx + c->tx_off, c->tx_len - c->tx_off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, ((uint64_t)idx << 8) | OP_SEND);
    c->send_busy = true;
    return;
  }
#endif
  if (c->send_busy || c->dead || c->to_send == 0) return;
  size_t pos = (size_t)(c->sent_total % opt.size);
  uint64_t len = c->to_send;
  if (len > sendbuf_len - pos) len = sendbuf_len - pos;
  if (len > (1u << 30)) len = 1u << 30;
  if (opt.udp) len = opt.size; /* one datagram per message */
  struct io_uring_sqe *sqe = get_sqe();
  io_uring_prep_send(sqe, c->fd, sendbuf + pos, (size_t)len, MSG_NOSIGNAL);
  io_uring_sqe_set_data64(sqe, ((uint64_t)idx << 8) | OP_SEND);
  c->send_busy = true;
}

static void uring_recv(struct conn *c, unsigned idx) {
  if (c->recv_armed || c->dead) return;
  struct io_uring_sqe *sqe = get_sqe();
  if (opt.multishot) {
    io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BGID;
  } else {
    io_uring_prep_recv(sqe, c->fd, c->rbuf, opt.buf_size, 0);
    sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
  }
  io_uring_sqe_set_data64(sqe, ((uint64_t)idx << 8) | OP_RECV);
  c->recv_armed = true;
}

static void uring_setup(void) {
  unsigned want = opt.conns * 2u + 64u;
  unsigned entries = 64;
  while (entries < want && entries < 16384) entries <<= 1;
  struct io_uring_params p;
  memset(&p, 0, sizeof(p));
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  p.cq_entries = entries * 4u;
  int rc = io_uring_queue_init_params(entries, &ring, &p);
  if (rc == -EINVAL) { /* older kernel: no DEFER_TASKRUN/SINGLE_ISSUER */
    memset(&p, 0, sizeof(p));
    p.flags = IORING_SETUP_CQSIZE;
    p.cq_entries = entries * 4u;
    rc = io_uring_queue_init_params(entries, &ring, &p);
  }
  if (rc < 0) die("io_uring_queue_init: %s (try --engine epoll)", strerror(-rc));
  io_uring_register_ring_fd(&ring);

  if (opt.multishot) {
    size_t ring_bytes = (size_t)opt.buf_count * sizeof(struct io_uring_buf);
    br = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (br == MAP_FAILED) die("mmap: %s", strerror(errno));
    bufs = malloc((size_t)opt.buf_count * opt.buf_size);
    if (!bufs) die("out of memory for receive buffers");
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {
        .ring_addr = (uintptr_t)br, .ring_entries = opt.buf_count, .bgid = BGID};
    rc = io_uring_register_buf_ring(&ring, &reg, 0);
    if (rc < 0) {
      /* Kernel without provided-buffer rings: fall back to one-shot recv. */
      munmap(br, ring_bytes);
      free(bufs);
      br = NULL;
      opt.multishot = false;
    } else {
      br_mask = (unsigned)io_uring_buf_ring_mask(opt.buf_count);
      for (unsigned i = 0; i < opt.buf_count; i++)
        io_uring_buf_ring_add(br, bufs + (size_t)i * opt.buf_size, opt.buf_size, (unsigned short)i,
                              (int)br_mask, (int)i);
      io_uring_buf_ring_advance(br, (int)opt.buf_count);
    }
  }
  if (!opt.multishot) {
    for (unsigned i = 0; i < opt.conns; i++) {
      conns[i].rbuf = malloc(opt.buf_size);
      if (!conns[i].rbuf) die("out of memory");
    }
  }
}

static void recycle_buffer(unsigned bid) {
  io_uring_buf_ring_add(br, bufs + (size_t)bid * opt.buf_size, opt.buf_size, (unsigned short)bid,
                        (int)br_mask, (int)br_pending);
  br_pending++;
}

static inline void uring_received(struct conn *c, const char *data, size_t n, uint64_t now) {
#ifdef LOADGEN_TLS
  if (opt.tls) {
    if (BIO_write(c->rbio, data, (int)n) != (int)n) die("BIO_write: %s", tls_errstr());
    tls_read_all(c, now);
    return;
  }
#endif
  on_received(c, data, n, now);
}

static void uring_handle(struct io_uring_cqe *cqe, uint64_t now) {
  uint64_t ud = io_uring_cqe_get_data64(cqe);
  unsigned idx = (unsigned)(ud >> 8);
  struct conn *c = &conns[idx];
  int res = cqe->res;
  if ((ud & 0xff) == OP_SEND) {
    c->send_busy = false;
    if (res < 0) {
      if (res != -EINTR && res != -EAGAIN) conn_fail(c, -res);
#ifdef LOADGEN_TLS
    } else if (opt.tls) {
      c->tx_off += (size_t)res;
#endif
    } else {
      c->to_send -= (uint64_t)res;
      c->sent_total += (uint64_t)res;
    }
    if (phase < PHASE_DONE) uring_send(c, idx);
    return;
  }
  /* OP_RECV */
  bool more = (cqe->flags & IORING_CQE_F_MORE) != 0;
  if (!more) c->recv_armed = false;
  if (res > 0) {
    const char *data;
    if (opt.multishot) {
      unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
      data = bufs + (size_t)bid * opt.buf_size;
      uring_received(c, data, (size_t)res, now);
      recycle_buffer(bid);
    } else {
      uring_received(c, c->rbuf, (size_t)res, now);
    }
    uring_send(c, idx);
    if (phase < PHASE_DONE) uring_recv(c, idx);
  } else if (res == 0) {
    conn_fail(c, ECONNRESET); /* the server closed the connection */
  } else if (res == -ENOBUFS || res == -EINTR || res == -EAGAIN) {
    if (phase < PHASE_DONE) uring_recv(c, idx);
  } else {
    conn_fail(c, -res);
  }
}

static void run_uring(void) {
  uring_setup();
  uint64_t now = now_ns();
  for (unsigned i = 0; i < opt.conns; i++) {
    for (unsigned d = 0; d < opt.depth; d++) queue_message(&conns[i], now);
    uring_recv(&conns[i], i);
    uring_send(&conns[i], i);
  }
  struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 100000000};
  while (phase != PHASE_DONE) {
    struct io_uring_cqe *cqe = NULL;
    int rc = io_uring_submit_and_wait_timeout(&ring, &cqe, 1, &ts, NULL);
    if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
      die("io_uring_submit_and_wait: %s", strerror(-rc));
    now = now_ns();
    unsigned head, count = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      uring_handle(cqe, now);
      count++;
    }
    if (br_pending) {
      io_uring_buf_ring_advance(br, (int)br_pending);
      br_pending = 0;
    }
    io_uring_cq_advance(&ring, count);
    tick(now);
  }
}

/* ------------------------------------------------------------------------ */
/* epoll engine                                                             */
/* ------------------------------------------------------------------------ */

static int ep;

static void epoll_want_out(struct conn *c, bool want) {
  if (c->want_out == want) return;
  struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0u), .data.ptr = c};
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
  c->want_out = want;
}

static void epoll_flush(struct conn *c) {
  while (c->to_send > 0 && !c->dead) {
    size_t pos = (size_t)(c->sent_total % opt.size);
    uint64_t len = c->to_send;
    if (len > sendbuf_len - pos) len = sendbuf_len - pos;
#ifdef LOADGEN_TLS
    if (opt.tls) {
      if (len > (1u << 30)) len = 1u << 30;
      int w = SSL_write(c->ssl, sendbuf + pos, (int)len);
      if (w <= 0) {
        if (!tls_retry(c, w)) {
          conn_fail(c, EPROTO);
          return;
        }
        break; /* wait for EPOLLOUT, then repeat the same write */
      }
      c->to_send -= (uint64_t)w;
      c->sent_total += (uint64_t)w;
      continue;
    }
#endif
    if (opt.udp) len = opt.size; /* one datagram per message */
    ssize_t n = send(c->fd, sendbuf + pos, (size_t)len, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      conn_fail(c, errno);
      return;
    }
    c->to_send -= (uint64_t)n;
    c->sent_total += (uint64_t)n;
  }
  epoll_want_out(c, c->to_send > 0);
}

/* The epoll instance of the epoll and churn modes, and their receive buffer. */
static char *epoll_start(size_t rlen) {
  ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) die("epoll_create1: %s", strerror(errno));
  char *rbuf = malloc(rlen);
  if (!rbuf) die("out of memory");
  return rbuf;
}

static void run_epoll(void) {
  size_t rlen = opt.buf_size;
  char *rbuf = epoll_start(rlen);
  uint64_t now = now_ns();
  for (unsigned i = 0; i < opt.conns; i++) {
    struct conn *c = &conns[i];
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    for (unsigned d = 0; d < opt.depth; d++) queue_message(c, now);
    epoll_flush(c);
  }
  struct epoll_event evs[256];
  while (phase != PHASE_DONE) {
    int n = epoll_wait(ep, evs, 256, 100);
    if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
    now = now_ns();
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (c->dead) continue;
      if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
#ifdef LOADGEN_TLS
        if (opt.tls) {
          tls_read_all(c, now);
          if (c->dead) {
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            continue;
          }
          if (c->to_send > 0 || (evs[i].events & EPOLLOUT)) epoll_flush(c);
          continue;
        }
#endif
        ssize_t r = recv(c->fd, rbuf, rlen, 0);
        if (r > 0) {
          on_received(c, rbuf, (size_t)r, now);
        } else if (r == 0) {
          conn_fail(c, ECONNRESET);
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          continue;
        } else if (errno != EAGAIN && errno != EINTR) {
          conn_fail(c, errno);
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          continue;
        }
      }
      if (c->to_send > 0 || (evs[i].events & EPOLLOUT)) epoll_flush(c);
    }
    tick(now);
  }
}

/* ------------------------------------------------------------------------ */
/* Connection churn                                                         */
/* ------------------------------------------------------------------------ */

/* Start a new connection in slot c: nonblocking connect, EPOLLOUT when it
 * is established. c->ts[0] is the time the connection was begun. */
static void churn_open(struct conn *c, uint64_t now) {
  int fd = socket(target.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    conn_fail(c, errno);
    return;
  }
  if (target.ss_family != AF_UNIX) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  if (connect(fd, (struct sockaddr *)&target, target_len) < 0 && errno != EINPROGRESS) {
    conn_fail(c, errno);
    close(fd);
    return;
  }
  c->fd = fd;
  c->ts[0] = now;
  c->ts_head = 0;
  c->ts_count = 1;
  c->to_send = opt.size;
  c->sent_total = 0;
  c->rx_total = 0;
  c->want_out = true;
  struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

static void churn_fail(struct conn *c, int err) {
  conn_fail(c, err);
  close(c->fd);
  c->fd = -1;
  c->ts_count = 0;
}

/* Connected (or failed to): send the message, then wait for the echo. */
static void churn_writable(struct conn *c) {
  if (c->sent_total == 0) {
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      churn_fail(c, err);
      return;
    }
  }
  while (c->to_send > 0) {
    ssize_t n = send(c->fd, sendbuf + c->sent_total, (size_t)c->to_send, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return; /* EPOLLOUT again */
      churn_fail(c, errno);
      return;
    }
    c->to_send -= (uint64_t)n;
    c->sent_total += (uint64_t)n;
  }
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
  c->want_out = false;
}

/* Read the echo; at the server's FIN the connection is complete. */
static void churn_readable(struct conn *c, char *rbuf, size_t rlen, uint64_t now) {
  for (;;) {
    ssize_t r = recv(c->fd, rbuf, rlen, 0);
    if (r > 0) {
      if (opt.verify) verify_chunk(c, rbuf, (size_t)r);
      c->rx_total += (uint64_t)r;
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) return;
    if (r < 0) {
      churn_fail(c, errno);
      return;
    }
    break; /* EOF */
  }
  if (c->rx_total != opt.size) { /* the server closed before (or after) a whole echo */
    verify_errors++;
    churn_fail(c, EPROTO);
    return;
  }
  close(c->fd);
  c->fd = -1;
  c->ts_count = 0;
  count_response(c->ts[0], now);
  if (phase == PHASE_WARMUP || phase == PHASE_MEASURE) churn_open(c, now);
}

static void run_churn(void) {
  size_t rlen = opt.buf_size;
  char *rbuf = epoll_start(rlen);
  uint64_t now = now_ns();
  for (unsigned i = 0; i < opt.conns; i++) churn_open(&conns[i], now);
  struct epoll_event evs[256];
  while (phase != PHASE_DONE) {
    int n = epoll_wait(ep, evs, 256, 100);
    if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
    now = now_ns();
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (c->dead || c->fd < 0) continue;
      if (c->want_out)
        churn_writable(c);
      else
        churn_readable(c, rbuf, rlen, now);
    }
    tick(now);
  }
  free(rbuf);
}

/* ------------------------------------------------------------------------ */
/* Idle-connection memory                                                   */
/* ------------------------------------------------------------------------ */

/* Open N connections, echo one message on each (so the server has set up
 * everything a live connection needs), hold them idle, and report the
 * server's RSS growth per connection. */
static int run_idle(void) {
  struct proc_sample before = sample_proc(opt.server_pid);
  int *fds = calloc(opt.conns, sizeof(int));
  char *buf = malloc(opt.size);
  if (!fds || !buf) die("out of memory");
  for (unsigned i = 0; i < opt.conns; i++) fds[i] = open_conn(false);
  for (unsigned i = 0; i < opt.conns; i++)
    if (send(fds[i], sendbuf, opt.size, MSG_NOSIGNAL) != (ssize_t)opt.size)
      die("send: %s", strerror(errno));
  for (unsigned i = 0; i < opt.conns; i++)
    for (uint64_t got = 0; got < opt.size;) {
      ssize_t n = recv(fds[i], buf, opt.size - got, 0);
      if (n <= 0) die("recv: %s", n ? strerror(errno) : "connection closed");
      got += (uint64_t)n;
    }
  usleep((useconds_t)(opt.idle * 1e6));
  struct proc_sample after = sample_proc(opt.server_pid);
  double per = before.ok && after.ok ? (double)(after.rss_kb - before.rss_kb) / opt.conns : 0;
  if (opt.json)
    printf(
        "{\"tool\": \"loadgen\", \"format\": 1, \"mode\": \"idle\", \"target\": \"%s\", "
        "\"conns\": %u, \"size\": %llu, \"rss_kb_before\": %ld, \"rss_kb_after\": %ld, "
        "\"rss_kb_per_conn\": %.3f}\n",
        target_name, opt.conns, (unsigned long long)opt.size, before.rss_kb, after.rss_kb, per);
  else
    printf("%s: %u idle connections: server RSS %ld -> %ld kB, %.2f kB per connection\n",
           target_name, opt.conns, before.rss_kb, after.rss_kb, per);
  for (unsigned i = 0; i < opt.conns; i++) close(fds[i]);
  return before.ok && after.ok ? 0 : 1;
}

/* ------------------------------------------------------------------------ */
/* Output                                                                   */
/* ------------------------------------------------------------------------ */

static double tv_s(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec / 1e6; }

static void report(void) {
  double secs = (double)(t_measure_end - t_measure) / 1e9;
  double rps = secs > 0 ? (double)measured / secs : 0;
  double cu = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime);
  double cs = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);
  double q[5] = {0.5, 0.9, 0.99, 0.999, 1.0};
  double lat[5];
  for (int i = 0; i < 5; i++) lat[i] = (double)hist_quantile(&hist, q[i]) / 1000.0;
  double mean = hist.n ? (double)hist.sum / (double)hist.n / 1000.0 : 0;
  double min = hist.n ? (double)hist.min / 1000.0 : 0;
  bool srv = srv0.ok && srv1.ok;
  double su = srv ? srv1.user_s - srv0.user_s : 0, ss = srv ? srv1.sys_s - srv0.sys_s : 0;
  double per = measured ? 1e6 / (double)measured : 0;
  const char *engine = opt.engine == ENGINE_URING && !opt.churn ? "uring" : "epoll";
  const char *recv = opt.engine == ENGINE_EPOLL || opt.churn ? "recv"
                     : opt.multishot                         ? "multishot"
                                                             : "single";

  if (opt.json) {
    printf("{\"tool\": \"loadgen\", \"format\": 1");
    if (opt.label) printf(", \"label\": \"%s\"", opt.label);
    printf(", \"engine\": \"%s\", \"recv\": \"%s\", \"target\": \"%s\"", engine, recv, target_name);
    if (opt.churn || opt.udp) printf(", \"mode\": \"%s\"", opt.churn ? "churn" : "udp");
    if (opt.lines) printf(", \"lines\": %u", opt.lines);
    printf(", \"conns\": %u, \"size\": %llu, \"pipeline\": %u", opt.conns,
           (unsigned long long)opt.size, opt.depth);
    printf(", \"warmup_s\": %.3f, \"duration_s\": %.6f", opt.warmup, secs);
    printf(", \"requests\": %llu, \"warmup_requests\": %llu, \"rps\": %.1f",
           (unsigned long long)measured, (unsigned long long)warm_requests, rps);
    printf(", \"mb_per_s\": %.3f", rps * (double)opt.size / 1e6);
    printf(", \"dead_conns\": %u, \"first_error\": \"%s\", \"verify\": %s, \"verify_errors\": %llu",
           dead_conns, first_error ? strerror(first_error) : "", opt.verify ? "true" : "false",
           (unsigned long long)verify_errors);
    printf(", \"stalled\": %s", stalled ? "true" : "false");
#ifdef LOADGEN_TLS
    if (opt.tls)
      printf(", \"tls\": {\"version\": \"%s\", \"cipher\": \"%s\", \"error\": \"%s\"}",
             tls_version_used, tls_cipher_used, tls_error);
#endif
    printf(
        ", \"latency_us\": {\"min\": %.2f, \"mean\": %.2f, \"p50\": %.2f, \"p90\": %.2f, "
        "\"p99\": %.2f, \"p999\": %.2f, \"max\": %.2f}",
        min, mean, lat[0], lat[1], lat[2], lat[3], lat[4]);
    printf(
        ", \"client\": {\"user_s\": %.4f, \"sys_s\": %.4f, \"util\": %.4f, "
        "\"cpu_us_per_req\": %.4f}",
        cu, cs, secs > 0 ? (cu + cs) / secs : 0, (cu + cs) * per);
    if (srv)
      printf(
          ", \"server\": {\"pid\": %d, \"user_s\": %.4f, \"sys_s\": %.4f, \"util\": %.4f, "
          "\"cpu_us_per_req\": %.4f, \"user_us_per_req\": %.4f, \"sys_us_per_req\": %.4f, "
          "\"rss_kb\": %ld, \"rss_kb_start\": %ld, \"hwm_kb\": %ld}",
          opt.server_pid, su, ss, secs > 0 ? (su + ss) / secs : 0, (su + ss) * per, su * per,
          ss * per, srv1.rss_kb, srv0.rss_kb, srv1.hwm_kb);
    printf("}\n");
  } else {
    printf("%s: %u conns x %llu B, pipeline %u, %s/%s, %.2f s: %.0f req/s, %.1f MB/s each way\n",
           target_name, opt.conns, (unsigned long long)opt.size, opt.depth, engine, recv, secs, rps,
           rps * (double)opt.size / 1e6);
    printf("latency us: min %.1f p50 %.1f p90 %.1f p99 %.1f p99.9 %.1f max %.1f mean %.1f\n", min,
           lat[0], lat[1], lat[2], lat[3], lat[4], mean);
    printf("client CPU %.0f%% (%.2f us/req)\n", secs > 0 ? 100 * (cu + cs) / secs : 0,
           (cu + cs) * per);
    if (srv)
      printf("server pid %d: %.2f us/req CPU (user %.2f, sys %.2f), %.0f%% of a core, RSS %ld kB\n",
             opt.server_pid, (su + ss) * per, su * per, ss * per,
             secs > 0 ? 100 * (su + ss) / secs : 0, srv1.rss_kb);
    if (stalled) printf("stalled: no echo for %.0f s, run ended early\n", STALL_NS / 1e9);
#ifdef LOADGEN_TLS
    if (opt.tls)
      printf("TLS: %s %s%s%s\n", tls_version_used, tls_cipher_used, tls_error[0] ? ", " : "",
             tls_error);
#endif
    if (dead_conns || verify_errors)
      printf("errors: %u connections failed (%s), %llu verify errors\n", dead_conns,
             first_error ? strerror(first_error) : "-", (unsigned long long)verify_errors);
  }
  fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* main                                                                     */
/* ------------------------------------------------------------------------ */

static void usage(FILE *f) {
  fputs(
      "usage: loadgen [options]\n"
      "  -H, --host HOST        server address (default 127.0.0.1)\n"
      "  -P, --port PORT        server port (default 8000)\n"
      "  -U, --unix PATH        connect to a Unix stream socket instead\n"
      "  -c, --conns N          connections (default 10)\n"
      "  -s, --size BYTES       message size (default 1024; suffixes k, m = KiB, MiB)\n"
      "  -p, --pipeline D       messages outstanding per connection (default 1)\n"
      "  -d, --duration SEC     measured phase (default 5)\n"
      "  -w, --warmup SEC       warm-up before it (default 1)\n"
      "  -n, --requests N       measure exactly N responses instead of a duration\n"
      "  -e, --engine E         uring (default) or epoll\n"
      "      --single-recv      uring: one-shot recv per message, no buffer ring\n"
      "      --buf-size BYTES   receive buffer size (default 65536)\n"
      "      --buf-count N      uring provided buffers, power of two (default 1024)\n"
      "      --server-pid PID   sample the server's CPU time and RSS from /proc\n"
      "      --cpu N            pin the load generator to CPU N\n"
      "      --verify           check that every echoed byte is the byte sent\n"
      "      --label TEXT       copied into the JSON output\n"
      "      --idle SEC         memory mode: open the connections, echo one message on\n"
      "                         each, hold them SEC seconds, report the server's RSS\n"
      "                         growth per connection (needs --server-pid)\n"
      "      --tls              TLS client: one handshake per connection, then echo\n"
      "                         over TLS (needs a build with OpenSSL)\n"
      "      --tls-version V    1.2 or 1.3 only (default: negotiate)\n"
      "      --tls-ciphers L    TLS 1.2 cipher list (OpenSSL syntax)\n"
      "      --tls-suites L     TLS 1.3 cipher suites (OpenSSL syntax)\n"
      "      --tls-sni NAME     server name sent in the handshake (default localhost)\n"
      "      --udp              echo over connected UDP sockets, one datagram per\n"
      "                         message (size <= buf-size, pipeline 1)\n"
      "      --lines L          make every message L lines ('\\n' at L evenly spaced ends)\n"
      "      --churn            connection churn: each of the N slots connects, sends\n"
      "                         one message, reads the echo until the server closes,\n"
      "                         closes and starts over; a request = a connection\n"
      "  -j, --json             print one JSON object instead of text\n",
      f);
}

static uint64_t parse_size(const char *s) {
  char *end;
  double v = strtod(s, &end);
  if (end == s || v < 0) die("bad size: %s", s);
  if (*end == 'k' || *end == 'K')
    v *= 1024;
  else if (*end == 'm' || *end == 'M')
    v *= 1024 * 1024;
  else if (*end)
    die("bad size: %s", s);
  return (uint64_t)v;
}

int main(int argc, char **argv) {
  opt = (struct options){.host = "127.0.0.1",
                         .port = "8000",
                         .conns = 10,
                         .size = 1024,
                         .depth = 1,
                         .duration = 5,
                         .warmup = 1,
                         .engine = ENGINE_URING,
                         .multishot = true,
                         .buf_size = 65536,
                         .buf_count = 1024,
                         .cpu = -1,
                         .idle = -1,
                         .tls_sni = "localhost"};
  enum {
    O_SINGLE = 256,
    O_BUFSZ,
    O_BUFCNT,
    O_PID,
    O_CPU,
    O_VERIFY,
    O_LABEL,
    O_IDLE,
    O_TLS,
    O_TLSVER,
    O_TLSCIPH,
    O_TLSSUITE,
    O_TLSSNI,
    O_UDP,
    O_LINES,
    O_CHURN
  };
  static const struct option longopts[] = {{"host", required_argument, 0, 'H'},
                                           {"port", required_argument, 0, 'P'},
                                           {"unix", required_argument, 0, 'U'},
                                           {"conns", required_argument, 0, 'c'},
                                           {"size", required_argument, 0, 's'},
                                           {"pipeline", required_argument, 0, 'p'},
                                           {"duration", required_argument, 0, 'd'},
                                           {"warmup", required_argument, 0, 'w'},
                                           {"requests", required_argument, 0, 'n'},
                                           {"engine", required_argument, 0, 'e'},
                                           {"single-recv", no_argument, 0, O_SINGLE},
                                           {"buf-size", required_argument, 0, O_BUFSZ},
                                           {"buf-count", required_argument, 0, O_BUFCNT},
                                           {"server-pid", required_argument, 0, O_PID},
                                           {"cpu", required_argument, 0, O_CPU},
                                           {"verify", no_argument, 0, O_VERIFY},
                                           {"label", required_argument, 0, O_LABEL},
                                           {"json", no_argument, 0, 'j'},
                                           {"idle", required_argument, 0, O_IDLE},
                                           {"tls", no_argument, 0, O_TLS},
                                           {"tls-version", required_argument, 0, O_TLSVER},
                                           {"tls-ciphers", required_argument, 0, O_TLSCIPH},
                                           {"tls-suites", required_argument, 0, O_TLSSUITE},
                                           {"tls-sni", required_argument, 0, O_TLSSNI},
                                           {"udp", no_argument, 0, O_UDP},
                                           {"lines", required_argument, 0, O_LINES},
                                           {"churn", no_argument, 0, O_CHURN},
                                           {"help", no_argument, 0, 'h'},
                                           {0, 0, 0, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "H:P:U:c:s:p:d:w:n:e:jh", longopts, NULL)) != -1) {
    switch (ch) {
      case 'H':
        opt.host = optarg;
        break;
      case 'P':
        opt.port = optarg;
        break;
      case 'U':
        opt.unix_path = optarg;
        break;
      case 'c':
        opt.conns = (unsigned)strtoul(optarg, NULL, 10);
        break;
      case 's':
        opt.size = parse_size(optarg);
        break;
      case 'p':
        opt.depth = (unsigned)strtoul(optarg, NULL, 10);
        break;
      case 'd':
        opt.duration = strtod(optarg, NULL);
        break;
      case 'w':
        opt.warmup = strtod(optarg, NULL);
        break;
      case 'n':
        opt.requests = strtoull(optarg, NULL, 10);
        break;
      case 'e':
        if (!strcmp(optarg, "uring"))
          opt.engine = ENGINE_URING;
        else if (!strcmp(optarg, "epoll"))
          opt.engine = ENGINE_EPOLL;
        else
          die("unknown engine %s (uring, epoll)", optarg);
        break;
      case O_SINGLE:
        opt.multishot = false;
        break;
      case O_BUFSZ:
        opt.buf_size = (unsigned)parse_size(optarg);
        break;
      case O_BUFCNT:
        opt.buf_count = (unsigned)strtoul(optarg, NULL, 10);
        break;
      case O_PID:
        opt.server_pid = atoi(optarg);
        break;
      case O_CPU:
        opt.cpu = atoi(optarg);
        break;
      case O_VERIFY:
        opt.verify = true;
        break;
      case O_LABEL:
        opt.label = optarg;
        break;
      case O_IDLE:
        opt.idle = strtod(optarg, NULL);
        break;
      case O_TLS:
        opt.tls = true;
        break;
      case O_TLSVER:
        opt.tls_version = optarg;
        break;
      case O_TLSCIPH:
        opt.tls_ciphers = optarg;
        break;
      case O_TLSSUITE:
        opt.tls_suites = optarg;
        break;
      case O_TLSSNI:
        opt.tls_sni = optarg;
        break;
      case O_UDP:
        opt.udp = true;
        break;
      case O_LINES:
        opt.lines = (unsigned)strtoul(optarg, NULL, 10);
        break;
      case O_CHURN:
        opt.churn = true;
        break;
      case 'j':
        opt.json = true;
        break;
      case 'h':
        usage(stdout);
        return 0;
      default:
        usage(stderr);
        return 2;
    }
  }
  if (opt.conns == 0 || opt.size == 0 || opt.depth == 0)
    die("conns, size and pipeline must be >= 1");
  if (opt.buf_size < 256) die("buf-size must be >= 256");
  if (opt.buf_count == 0 || opt.buf_count > 32768 || (opt.buf_count & (opt.buf_count - 1)))
    die("buf-count must be a power of two <= 32768");
  if (opt.duration <= 0 && !opt.requests) die("duration must be > 0");
  if (opt.requests) opt.duration = 0;
#ifdef LOADGEN_TLS
  if (opt.tls && opt.idle >= 0) die("--idle does not support --tls");
#else
  if (opt.tls) die("--tls: this load generator was built without OpenSSL");
#endif
  if (opt.udp && (opt.tls || opt.churn || opt.idle >= 0 || opt.unix_path))
    die("--udp does not combine with --tls, --churn, --idle or --unix");
  if (opt.udp && opt.depth != 1) die("--udp needs pipeline 1");
  if (opt.udp && (opt.size > 65507 || opt.size > opt.buf_size))
    die("--udp: size must fit one datagram and one receive buffer (<= 65507, <= buf-size)");
  if (opt.churn && (opt.tls || opt.idle >= 0 || opt.depth != 1))
    die("--churn does not combine with --tls, --idle or a pipeline");
  if (opt.lines > opt.size) die("--lines: more lines than bytes in a message");

  if (opt.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(opt.cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0) die("sched_setaffinity: %s", strerror(errno));
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);

  /* One buffer of depth + 1 identical messages: any run of up to depth
   * messages starting anywhere inside the first message is contiguous. */
  sendbuf_len = (size_t)opt.size * (opt.depth + 1u);
  sendbuf = malloc(sendbuf_len);
  if (!sendbuf) die("out of memory for %zu-byte send buffer", sendbuf_len);
  for (size_t i = 0; i < sendbuf_len; i++) sendbuf[i] = (char)('a' + (i % opt.size) % 26);
  for (size_t m = 0; opt.lines && m <= opt.depth; m++) /* line k ends at (k+1)*S/L - 1 */
    for (unsigned k = 0; k < opt.lines; k++)
      sendbuf[m * opt.size + (k + 1u) * opt.size / opt.lines - 1u] = '\n';

  resolve_target();
  if (opt.idle >= 0) return run_idle();
  conns = calloc(opt.conns, sizeof(*conns));
  uint64_t *ts = calloc((size_t)opt.conns * opt.depth, sizeof(uint64_t));
  if (!conns || !ts) die("out of memory");
#ifdef LOADGEN_TLS
  if (opt.tls) tls_setup();
#endif
  for (unsigned i = 0; i < opt.conns; i++) {
    conns[i].ts = ts + (size_t)i * opt.depth;
    conns[i].fd = opt.churn ? -1 : open_conn(opt.engine == ENGINE_EPOLL && !opt.tls);
#ifdef LOADGEN_TLS
    if (opt.tls) tls_connect(&conns[i]);
#endif
  }

  hist_reset(&hist);
  phase = opt.warmup > 0 ? PHASE_WARMUP : PHASE_MEASURE;
  t_start = now_ns();
  if (phase == PHASE_MEASURE) {
    t_measure = t_start;
    srv0 = sample_proc(opt.server_pid);
    getrusage(RUSAGE_SELF, &ru0);
  }
  if (opt.churn)
    run_churn();
  else if (opt.engine == ENGINE_URING)
    run_uring();
  else
    run_epoll();

  for (unsigned i = 0; i < opt.conns; i++)
    if (conns[i].fd >= 0 && !opt.udp) shutdown(conns[i].fd, SHUT_RDWR);
  report();
  if (opt.engine == ENGINE_URING && !opt.churn) io_uring_queue_exit(&ring);
  for (unsigned i = 0; i < opt.conns; i++)
    if (conns[i].fd >= 0) close(conns[i].fd);
  if (verify_errors) return 3;
  if (stalled) return 4;
  if (dead_conns == opt.conns) return 1;
  return 0;
}
