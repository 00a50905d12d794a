// Every extern "C" entry point of kloop.h. This file validates arguments,
// resolves handles and forwards to the engine; nothing else crosses the ABI.
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>

#include <climits>
#include <new>

#include "engine.h"
#include "kloop.h"
#include "probe.h"

// A handle is a small shell that is never returned to the allocator: after
// kloop_destroy() its magic says "dead", so a stale handle is answered with
// -EBADF instead of touching freed memory. Shells are reused by later loops.
struct kloop {
  uint32_t magic;
  kl::Engine *eng;
  kloop *next_free;
};

namespace {

constexpr uint32_t kMagicLive = 0x6b6c6f6fu;  // "kloo"
constexpr uint32_t kMagicDead = 0xdeadbeefu;

pthread_mutex_t g_shell_mu = PTHREAD_MUTEX_INITIALIZER;
kloop *g_free_shells = nullptr;

void on_fork_child() { kl::g_fork_generation.fetch_add(1, std::memory_order_relaxed); }

pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

void install_atfork() { pthread_atfork(nullptr, nullptr, on_fork_child); }

constexpr uint32_t kConfigMinSize = offsetof(kloop_config, reserved);
constexpr uint32_t kCapsMinSize = offsetof(kloop_caps, reserved);
constexpr uint32_t kStatsMinSize = offsetof(kloop_stats, reserved);

constexpr uint32_t kStreamFlags =
    KLOOP_STREAM_FILE | KLOOP_STREAM_CLOSE_FD | KLOOP_STREAM_PAUSED | KLOOP_STREAM_NO_READ;

// Resolve a handle for the owning thread: live and not inherited by fork.
inline int resolve(kloop_t *loop, kl::Engine **eng) {
  if (!loop || loop->magic != kMagicLive) return -EBADF;
  if (loop->eng->forked()) return -EBADFD;
  *eng = loop->eng;
  return 0;
}

inline bool len_ok(const void *buf, uint32_t len) {
  if (len > static_cast<uint32_t>(INT_MAX)) return false;
  return buf != nullptr || len == 0;
}

// Structs that may grow are copied up to the size the caller declared, so
// a binary built against an older header never has memory written past
// its struct.
template <typename T>
void copy_sized(T *dst, const T &src) {
  uint32_t n = dst->size < sizeof(T) ? dst->size : static_cast<uint32_t>(sizeof(T));
  uint32_t keep = dst->size;
  memcpy(dst, &src, n);
  dst->size = keep;
}

// The operations on one caller-pinned buffer share their validation and
// argument packing; only the kind and the meaning of `extra` differ
// (msg_flags for recv/send, the offset for read/write).
int submit_buffer_op(kl::Engine *eng, kl::OpKind kind, uint64_t token, int fd, const void *buf,
                     uint32_t len, uint32_t msg_flags, uint64_t offset) {
  if (fd < 0 || !len_ok(buf, len)) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  a.buf = const_cast<void *>(buf);
  a.len = len;
  a.flags = msg_flags;
  a.off = offset;
  return eng->submit_op(kind, token, a);
}

}  // namespace

#define KLOOP_RESOLVE()            \
  kl::Engine *eng = nullptr;       \
  {                                \
    int rc_ = resolve(loop, &eng); \
    if (rc_ < 0) return rc_;       \
  }

extern "C" {

uint32_t kloop_version(void) { return KLOOP_VERSION; }

const char *kloop_strerror(int err) {
  if (err == 0) return "Success";
  // Widen before negating: -INT_MIN does not fit an int.
  long long e = err < 0 ? -static_cast<long long>(err) : err;
  if (e >= 4096) return "Unknown error";
  const char *d = strerrordesc_np(static_cast<int>(e));  // static strings, thread-safe
  return d ? d : "Unknown error";
}

int kloop_probe(struct kloop_caps *caps) {
  if (!caps || caps->size < kCapsMinSize) return -EINVAL;
  kl::ProbeResult r;
  int rc = kl::probe_kernel(&r);
  if (rc < 0) return rc;
  kloop_caps full{};
  full.size = sizeof(full);
  full.features = r.features;
  full.kernel = r.caps;
  full.enabled = r.caps;
  memcpy(full.opcodes, r.opcodes, sizeof(full.opcodes));
  copy_sized(caps, full);
  return 0;
}

int kloop_config_init(struct kloop_config *cfg) {
  if (!cfg) return -EINVAL;
  memset(cfg, 0, sizeof(*cfg));
  cfg->size = sizeof(*cfg);
  cfg->sq_entries = 256;
  cfg->cq_entries = 1024;
  cfg->flags = 0;
  cfg->disable = 0;
  cfg->buf_size = 65536;
  cfg->buf_count = 256;
  cfg->sqpoll_idle_ms = 1000;
  return 0;
}

int kloop_create(const struct kloop_config *cfg_in, kloop_t **out) {
  if (!out) return -EINVAL;
  kloop_config cfg;
  kloop_config_init(&cfg);
  if (cfg_in) {
    if (cfg_in->size < kConfigMinSize) return -EINVAL;
    memcpy(&cfg, cfg_in, cfg_in->size < sizeof(cfg) ? cfg_in->size : sizeof(cfg));
    cfg.size = sizeof(cfg);
  }
  if (cfg.sq_entries == 0 || cfg.sq_entries > 32768) return -EINVAL;
  if (cfg.cq_entries == 0) cfg.cq_entries = cfg.sq_entries * 4;
  if (cfg.cq_entries < cfg.sq_entries || cfg.cq_entries > 65536) return -EINVAL;
  if (cfg.flags & ~(KLOOP_CONFIG_SQPOLL | KLOOP_CONFIG_NO_DEFER_TASKRUN |
                    KLOOP_CONFIG_NO_SEND_GATHER | KLOOP_CONFIG_NO_DIRECT_SEND |
                    KLOOP_CONFIG_NO_TLS_SEAL | KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT))
    return -EINVAL;
  if (cfg.buf_size < 256 || cfg.buf_size > (1u << 20)) return -EINVAL;
  if (cfg.buf_count == 0 || cfg.buf_count > 32768 || (cfg.buf_count & (cfg.buf_count - 1)))
    return -EINVAL;
  if (cfg.sqpoll_idle_ms == 0) cfg.sqpoll_idle_ms = 1000;

  pthread_once(&g_atfork_once, install_atfork);

  auto *eng = new (std::nothrow) kl::Engine;
  if (!eng) return -ENOMEM;
  int rc = eng->init(cfg);
  if (rc < 0) {
    // init() released what it had taken on failure
    delete eng;
    return rc;
  }
  kloop *shell;
  pthread_mutex_lock(&g_shell_mu);
  shell = g_free_shells;
  if (shell) g_free_shells = shell->next_free;
  pthread_mutex_unlock(&g_shell_mu);
  if (!shell) shell = new (std::nothrow) kloop;
  if (!shell) {
    eng->destroy();
    delete eng;
    return -ENOMEM;
  }
  shell->eng = eng;
  shell->next_free = nullptr;
  shell->magic = kMagicLive;
  *out = shell;
  return 0;
}

int kloop_destroy(kloop_t *loop) {
  if (!loop || loop->magic != kMagicLive) return -EBADF;
  kl::Engine *eng = loop->eng;
  loop->magic = kMagicDead;
  loop->eng = nullptr;
  eng->destroy();
  delete eng;
  pthread_mutex_lock(&g_shell_mu);
  loop->next_free = g_free_shells;
  g_free_shells = loop;
  pthread_mutex_unlock(&g_shell_mu);
  return 0;
}

int kloop_get_caps(kloop_t *loop, struct kloop_caps *caps) {
  KLOOP_RESOLVE();
  if (!caps || caps->size < kCapsMinSize) return -EINVAL;
  kloop_caps full{};
  full.size = sizeof(full);
  eng->caps(&full);
  copy_sized(caps, full);
  return 0;
}

int kloop_ring_fd(kloop_t *loop) {
  KLOOP_RESOLVE();
  return eng->ring_fd();
}

int kloop_get_stats(kloop_t *loop, struct kloop_stats *stats) {
  KLOOP_RESOLVE();
  if (!stats || stats->size < kStatsMinSize) return -EINVAL;
  kloop_stats full{};
  eng->stats(&full);
  copy_sized(stats, full);
  return 0;
}

int kloop_buffer_arena(kloop_t *loop, uint64_t *base, uint64_t *size) {
  KLOOP_RESOLVE();
  if (!base || !size) return -EINVAL;
  eng->arena(base, size);
  return 0;
}

int kloop_poll(kloop_t *loop, struct kloop_completion *out, uint32_t max, int64_t timeout_ns) {
  KLOOP_RESOLVE();
  if (!out || max == 0) return -EINVAL;
  return eng->poll(out, max, timeout_ns);
}

int kloop_wake(kloop_t *loop) {
  // Any thread, async-signal-safe: no lock, no allocation.
  if (!loop || loop->magic != kMagicLive) return -EBADF;
  kl::Engine *eng = loop->eng;
  if (!eng || eng->forked()) return -EBADFD;
  return eng->wake();
}

// ---------------------------------------------------------------------------
// Operations

int kloop_submit_nop(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  kl::Op a;
  return eng->submit_op(kl::OpKind::Nop, token, a);
}

int kloop_submit_accept(kloop_t *loop, uint64_t token, int fd, uint32_t flags) {
  KLOOP_RESOLVE();
  if (fd < 0 || (flags & ~(KLOOP_OP_MULTISHOT | KLOOP_ACCEPT_KERNEL_MULTISHOT))) return -EINVAL;
  if ((flags & KLOOP_ACCEPT_KERNEL_MULTISHOT) && !(flags & KLOOP_OP_MULTISHOT)) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  if (flags & KLOOP_OP_MULTISHOT) a.state = kl::kOpMultishot;
  if (flags & KLOOP_ACCEPT_KERNEL_MULTISHOT) a.state |= kl::kOpEdge;
  return eng->submit_op(kl::OpKind::Accept, token, a);
}

int kloop_submit_connect(kloop_t *loop, uint64_t token, int fd, const void *addr,
                         uint32_t addrlen) {
  KLOOP_RESOLVE();
  if (fd < 0 || !addr || addrlen == 0 || addrlen > sizeof(sockaddr_storage)) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  memcpy(&a.net.addr, addr, addrlen);
  a.addrlen = addrlen;
  return eng->submit_op(kl::OpKind::Connect, token, a);
}

int kloop_submit_recv(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                      uint32_t msg_flags) {
  KLOOP_RESOLVE();
  return submit_buffer_op(eng, kl::OpKind::Recv, token, fd, buf, len, msg_flags, 0);
}

int kloop_submit_send(kloop_t *loop, uint64_t token, int fd, const void *buf, uint32_t len,
                      uint32_t msg_flags) {
  KLOOP_RESOLVE();
  return submit_buffer_op(eng, kl::OpKind::Send, token, fd, buf, len, msg_flags, 0);
}

int kloop_submit_recvmsg(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                         uint32_t msg_flags) {
  KLOOP_RESOLVE();
  return submit_buffer_op(eng, kl::OpKind::RecvMsg, token, fd, buf, len, msg_flags, 0);
}

int kloop_submit_sendmsg(kloop_t *loop, uint64_t token, int fd, const void *buf, uint32_t len,
                         const void *addr, uint32_t addrlen, uint32_t msg_flags) {
  KLOOP_RESOLVE();
  if (fd < 0 || !len_ok(buf, len)) return -EINVAL;
  if ((addr == nullptr) != (addrlen == 0) || addrlen > sizeof(sockaddr_storage)) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  a.buf = const_cast<void *>(buf);
  a.len = len;
  a.flags = msg_flags;
  if (addrlen) memcpy(&a.net.addr, addr, addrlen);
  a.addrlen = addrlen;
  return eng->submit_op(kl::OpKind::SendMsg, token, a);
}

int kloop_submit_read(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                      uint64_t offset) {
  KLOOP_RESOLVE();
  if (offset != KLOOP_OFFSET_CURRENT && offset > static_cast<uint64_t>(INT64_MAX)) return -EINVAL;
  return submit_buffer_op(eng, kl::OpKind::Read, token, fd, buf, len, 0, offset);
}

int kloop_submit_write(kloop_t *loop, uint64_t token, int fd, const void *buf, uint32_t len,
                       uint64_t offset) {
  KLOOP_RESOLVE();
  if (offset != KLOOP_OFFSET_CURRENT && offset > static_cast<uint64_t>(INT64_MAX)) return -EINVAL;
  return submit_buffer_op(eng, kl::OpKind::Write, token, fd, buf, len, 0, offset);
}

int kloop_submit_poll(kloop_t *loop, uint64_t token, int fd, uint32_t events, uint32_t flags) {
  KLOOP_RESOLVE();
  if (fd < 0 || (flags & ~(KLOOP_OP_MULTISHOT | KLOOP_POLL_EDGE))) return -EINVAL;
  if ((flags & KLOOP_POLL_EDGE) && !(flags & KLOOP_OP_MULTISHOT)) return -EINVAL;
  if (events == 0 || events > 0xffff) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  a.flags = events;
  if (flags & KLOOP_OP_MULTISHOT) a.state |= kl::kOpMultishot;
  if (flags & KLOOP_POLL_EDGE) a.state |= kl::kOpEdge;
  return eng->submit_op(kl::OpKind::Poll, token, a);
}

int kloop_submit_timeout(kloop_t *loop, uint64_t token, uint64_t timeout_ns) {
  KLOOP_RESOLVE();
  if (timeout_ns > static_cast<uint64_t>(INT64_MAX)) return -EINVAL;
  kl::Op a;
  a.ts.tv_sec = static_cast<int64_t>(timeout_ns / 1000000000ull);
  a.ts.tv_nsec = static_cast<long long>(timeout_ns % 1000000000ull);
  return eng->submit_op(kl::OpKind::Timeout, token, a);
}

int kloop_submit_shutdown(kloop_t *loop, uint64_t token, int fd, int how) {
  KLOOP_RESOLVE();
  if (fd < 0 || (how != SHUT_RD && how != SHUT_WR && how != SHUT_RDWR)) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  a.flags = static_cast<uint32_t>(how);
  return eng->submit_op(kl::OpKind::Shutdown, token, a);
}

int kloop_submit_close(kloop_t *loop, uint64_t token, int fd) {
  KLOOP_RESOLVE();
  if (fd < 0) return -EINVAL;
  kl::Op a;
  a.fd = fd;
  return eng->submit_op(kl::OpKind::Close, token, a);
}

int kloop_submit_splice(kloop_t *loop, uint64_t token, int fd_in, uint64_t off_in, int fd_out,
                        uint64_t off_out, uint32_t len, uint32_t flags) {
  KLOOP_RESOLVE();
  if (fd_in < 0 || fd_out < 0 || len > static_cast<uint32_t>(INT_MAX)) return -EINVAL;
  if (off_in != KLOOP_OFFSET_CURRENT && off_in > static_cast<uint64_t>(INT64_MAX)) return -EINVAL;
  if (off_out != KLOOP_OFFSET_CURRENT && off_out > static_cast<uint64_t>(INT64_MAX)) return -EINVAL;
  kl::Op a;
  a.fd = fd_in;
  a.off = off_in;
  a.fd2 = fd_out;
  a.off2 = off_out;
  a.len = len;
  a.flags = flags;
  return eng->submit_op(kl::OpKind::Splice, token, a);
}

int kloop_submit_child_exit(kloop_t *loop, uint64_t token, int pid) {
  KLOOP_RESOLVE();
  if (pid <= 0) return -EINVAL;
  kl::Op a;
  a.pid = pid;
  return eng->submit_op(kl::OpKind::ChildWaitid, token, a);
}

int kloop_cancel(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->cancel(token);
}

int kloop_cancel_now(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  int rc = eng->cancel(token);
  if (rc < 0) return rc;
  return eng->submit_now();
}

int kloop_cancel_fd(kloop_t *loop, int fd) {
  KLOOP_RESOLVE();
  if (fd < 0) return -EINVAL;
  return eng->cancel_fd(fd);
}

// ---------------------------------------------------------------------------
// Streams

int kloop_stream_attach(kloop_t *loop, uint64_t token, int fd, uint32_t flags) {
  KLOOP_RESOLVE();
  if (fd < 0 || (flags & ~kStreamFlags)) return -EINVAL;
  return eng->stream_attach(token, fd, flags);
}

int kloop_stream_pause(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->stream_pause(token, true);
}

int kloop_stream_resume(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->stream_pause(token, false);
}

int64_t kloop_stream_write(kloop_t *loop, uint64_t token, const void *buf, size_t len) {
  KLOOP_RESOLVE();
  if (!buf && len) return -EINVAL;
  if (len > (static_cast<size_t>(1) << 40)) return -EINVAL;
  return eng->stream_write(token, buf, len);
}

int64_t kloop_stream_write_ref(kloop_t *loop, uint64_t token, const void *buf, size_t len,
                               uint64_t ref) {
  KLOOP_RESOLVE();
  if (!buf || !len) return -EINVAL;
  if (len > (static_cast<size_t>(1) << 40)) return -EINVAL;
  return eng->stream_write_ref(token, buf, len, ref);
}

int kloop_stream_set_limits(kloop_t *loop, uint64_t token, uint64_t high, uint64_t low) {
  KLOOP_RESOLVE();
  return eng->stream_set_limits(token, high, low);
}

int64_t kloop_stream_write_size(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->stream_write_size(token);
}

int kloop_stream_shutdown(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->stream_shutdown(token);
}

int kloop_stream_close(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->stream_close(token);
}

int kloop_stream_abort(kloop_t *loop, uint64_t token) {
  KLOOP_RESOLVE();
  return eng->stream_abort(token);
}

int kloop_stream_start_tls(kloop_t *loop, uint64_t token, void *ssl) {
  KLOOP_RESOLVE();
  if (!ssl) return -EINVAL;
  return eng->stream_start_tls(token, ssl);
}

int kloop_stream_tls_error(kloop_t *loop, uint64_t token, struct kloop_tls_error *out) {
  KLOOP_RESOLVE();
  if (!out || out->size < sizeof(kloop_tls_error)) return -EINVAL;
  return eng->stream_tls_error(token, out);
}

}  // extern "C"
