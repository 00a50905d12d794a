// What the running kernel's io_uring offers. Opcode support comes from
// IORING_REGISTER_PROBE; setup flags and buffer-ring flags are tried on a
// scratch ring, because the kernel answers -EINVAL for what it lacks.
#include "probe.h"

#include <errno.h>
#include <liburing.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <pthread.h>

#include "compat.h"
#include "kloop.h"

namespace kl {

namespace {

pthread_mutex_t g_probe_mu = PTHREAD_MUTEX_INITIALIZER;
bool g_probe_done = false;
ProbeResult g_probe;

// Whether the kernel can do TLS: the TCP upper-layer protocol "tls" is
// registered, or its module is there for setsockopt(TCP_ULP) to load.
bool has_tls_ulp() {
  char buf[256];
  if (FILE *f = fopen("/proc/sys/net/ipv4/tcp_available_ulp", "re")) {
    bool found = false;
    if (fgets(buf, sizeof buf, f)) {
      for (char *save = nullptr, *tok = strtok_r(buf, " \n", &save); tok;
           tok = strtok_r(nullptr, " \n", &save))
        found |= strcmp(tok, "tls") == 0;
    }
    (void)fclose(f);  // read-only: nothing to lose
    if (found) return true;
  }
  utsname u{};
  if (uname(&u) != 0) return false;
  char path[sizeof u.release + 64];
  (void)snprintf(path, sizeof path, "/lib/modules/%s/modules.dep", u.release);
  FILE *f = fopen(path, "re");
  if (!f) return false;
  bool found = false;
  char line[1024];
  while (!found && fgets(line, sizeof line, f))
    found = strncmp(line, "kernel/net/tls/tls.ko", 21) == 0;
  (void)fclose(f);
  return found;
}

bool try_setup(unsigned flags) {
  io_uring ring;
  io_uring_params p{};
  p.flags = flags;
  if (io_uring_queue_init_params(2, &ring, &p) < 0) return false;
  io_uring_queue_exit(&ring);
  return true;
}

bool try_buf_ring(io_uring *ring, uint16_t reg_flags) {
  const unsigned entries = 8;
  size_t size = sizeof(io_uring_buf) * entries;
  void *mem = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return false;
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<uint64_t>(mem);
  reg.ring_entries = entries;
  reg.bgid = 7;
  reg.pad = reg_flags;  // "flags" in newer kernel headers
  bool ok = io_uring_register_buf_ring(ring, &reg, 0) == 0;
  if (ok) io_uring_unregister_buf_ring(ring, 7);
  munmap(mem, size);
  return ok;
}

int do_probe(ProbeResult *r) {
  io_uring ring;
  io_uring_params p{};
  int rc = io_uring_queue_init_params(4, &ring, &p);
  if (rc < 0) return rc;
  r->features = p.features;
  io_uring_probe *pr = io_uring_get_probe_ring(&ring);
  if (pr) {
    for (unsigned i = 0; i <= pr->last_op && i < 256; ++i)
      r->opcodes[i] = (pr->ops[i].flags & IO_URING_OP_SUPPORTED) ? 1 : 0;
    io_uring_free_probe(pr);
  }
  uint64_t c = 0;
  auto op = [&](unsigned code) { return code < 256 && r->opcodes[code]; };
  // Opcodes stand in for the kernel versions that brought a flag.
  if (op(IORING_OP_SOCKET)) c |= KLOOP_CAP_MULTISHOT_ACCEPT | KLOOP_CAP_SOCKET_OP;  // 5.19
  if (op(IORING_OP_SEND_ZC)) c |= KLOOP_CAP_MULTISHOT_RECV | KLOOP_CAP_SEND_ZC;     // 6.0
  if (op(IORING_OP_MKDIRAT)) c |= KLOOP_CAP_MULTISHOT_POLL;                         // 5.15 >= 5.13
  if (op(IORING_OP_SPLICE)) c |= KLOOP_CAP_SPLICE;
  if (op(compat::kOpWaitid)) c |= KLOOP_CAP_WAITID;
  if (op(compat::kOpBind) && op(compat::kOpListen)) c |= KLOOP_CAP_BIND_LISTEN;
  if (p.features & IORING_FEAT_EXT_ARG) c |= KLOOP_CAP_EXT_ARG;
  if (p.features & IORING_FEAT_NODROP) c |= KLOOP_CAP_NODROP;
  if (p.features & compat::kFeatRecvsendBundle) c |= KLOOP_CAP_RECV_BUNDLE;
  if (try_buf_ring(&ring, 0)) {
    c |= KLOOP_CAP_BUF_RING;
    if (try_buf_ring(&ring, compat::kPbufRingInc)) c |= KLOOP_CAP_BUF_RING_INC;
  } else {
    c &= ~(KLOOP_CAP_MULTISHOT_RECV | KLOOP_CAP_RECV_BUNDLE);
  }
  if (io_uring_register_ring_fd(&ring) == 1) {
    c |= KLOOP_CAP_REG_RING_FD;
    io_uring_unregister_ring_fd(&ring);
  }
  io_uring_queue_exit(&ring);
  if (try_setup(IORING_SETUP_SINGLE_ISSUER)) {
    c |= KLOOP_CAP_SINGLE_ISSUER;
    if (try_setup(IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN))
      c |= KLOOP_CAP_DEFER_TASKRUN;
  }
  int pfd = compat::pidfd_open(getpid());
  if (pfd >= 0) {
    c |= KLOOP_CAP_PIDFD;
    close(pfd);
  }
  if (has_tls_ulp()) c |= KLOOP_CAP_KTLS;
  r->caps = c;
  return 0;
}

}  // namespace

int probe_kernel(ProbeResult *out) {
  pthread_mutex_lock(&g_probe_mu);
  int rc = 0;
  if (!g_probe_done) {
    ProbeResult r;
    rc = do_probe(&r);
    if (rc == 0) {
      g_probe = r;
      g_probe_done = true;
    }
  }
  if (rc == 0) *out = g_probe;
  pthread_mutex_unlock(&g_probe_mu);
  return rc;
}

}  // namespace kl
