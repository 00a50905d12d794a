// Fuzz target (b): argument validation of the whole C ABI. Every function
// is called with arguments drawn from tables of valid and hostile values:
// NULL, destroyed and garbage handles, negative, closed and wrong-kind fds,
// zero and huge lengths, bad sizes of versioned structs, unknown flags.
//
// Oracles: nothing crashes (ASan/UBSan watch the engine's own memory
// accesses: caller buffers are heap blocks of exactly the size the call
// claims, so any over-read or over-write is caught); bad handles give
// -EBADF; results are 0/positive or a -errno; the completion promise holds
// for whatever was accepted (the same tracker as fuzz_ops).
#include <sys/mman.h>
#include <sys/socket.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

#include "harness.h"

using namespace kfuzz;

namespace {

// A 4 KiB buffer followed by an inaccessible page: the kernel faults
// instead of writing beyond it when a length exceeds the buffer.
struct Guarded {
  static constexpr size_t kSize = 4096;
  char *p = nullptr;
  Guarded() {
    void *m =
        ::mmap(nullptr, 2 * kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) std::abort();
    p = static_cast<char *>(m);
    ::mprotect(p + kSize, kSize, PROT_NONE);
    std::memset(p, 'g', kSize);
  }
};

Guarded &Buf() {
  static Guarded g;
  return g;
}

// A handle that was destroyed, and one that never was a loop. Made once:
// if the allocator hands the destroyed address out again the dead handle
// is not used.
kloop_t *DeadHandle() {
  static kloop_t *dead = [] {
    kloop_t *l = nullptr;
    if (kloop_create(nullptr, &l) != 0) return static_cast<kloop_t *>(nullptr);
    kloop_destroy(l);
    return l;
  }();
  return dead;
}

kloop_t *GarbageHandle() {
  alignas(64) static unsigned char junk[1024];
  static bool init = [] {
    std::memset(junk, 0xA7, sizeof junk);
    return true;
  }();
  (void)init;
  return reinterpret_cast<kloop_t *>(junk);
}

const uint32_t kLens[] = {0, 1, 16, 100, 4096, 4097, 65536, 0x7fffffff, 0x80000000u, UINT32_MAX};
const uint32_t kAddrLens[] = {0, 1, 2, 16, 28, 110, 127, 128, 129, 4096, UINT32_MAX};
const uint64_t kOffsets[] = {0,          1,        4096, KLOOP_OFFSET_CURRENT, UINT64_MAX - 1,
                             1ull << 62, INT64_MAX};
const uint64_t kTimeouts[] = {
    0, 1, 1000, 100'000, 1'000'000, INT64_MAX, (uint64_t)INT64_MAX + 1, UINT64_MAX};
const uint32_t kFlags[] = {0, KLOOP_OP_MULTISHOT, 2, 0x80000000u, UINT32_MAX};
const uint32_t kStreamFlags[] = {0,
                                 KLOOP_STREAM_FILE,
                                 KLOOP_STREAM_CLOSE_FD,
                                 KLOOP_STREAM_PAUSED,
                                 KLOOP_STREAM_NO_READ,
                                 KLOOP_STREAM_PAUSED | KLOOP_STREAM_NO_READ,
                                 1u << 4,
                                 UINT32_MAX};
const int kPids[] = {0, -1, 1, INT_MAX, INT_MIN, -2};
const int kHows[] = {SHUT_RD, SHUT_WR, SHUT_RDWR, 3, -1, INT_MAX};
const uint32_t kEvents[] = {0, POLLIN, POLLOUT, POLLIN | POLLOUT, 0xffff, UINT32_MAX};
const uint32_t kMsgFlags[] = {0, MSG_DONTWAIT, MSG_PEEK, MSG_TRUNC, MSG_WAITALL, UINT32_MAX};

class Abi {
 public:
  Abi(Reader &in, kloop_t *live) : in_(in), live_(live), t_(live) {}

  kloop_t *Handle() {
    uint8_t b = in_.u8();
    if (b < 200) return live_;
    switch (b % 3) {
      case 0:
        return nullptr;
      case 1:
        return DeadHandle() != live_ ? DeadHandle() : nullptr;
      default:
        return GarbageHandle();
    }
  }
  int Fd() {
    uint8_t b = in_.u8();
    switch (b % 12) {
      case 8:
        return -1;
      case 9:
        return INT_MIN;
      case 10:
        return bad_fd_;
      case 11:
        return -(b >> 4) - 2;
      default:
        return fds_.pick(b);
    }
  }
  // A buffer and a length: NULL or the guarded buffer; the length may
  // exceed the buffer (the kernel then faults at the guard page).
  std::pair<char *, uint32_t> BufLen() {
    uint8_t b = in_.u8();
    uint32_t len = kLens[b % (sizeof kLens / sizeof kLens[0])];
    char *p = (b & 0x80) ? nullptr : Buf().p;
    return {p, len};
  }

  // Checks for a call that takes a handle: a bad one must give -EBADF; a
  // good one may not give an out-of-range result.
  void Check(const char *what, kloop_t *h, int64_t rc) {
    if (h != live_) {
      if (rc != -EBADF) Fail("%s on a bad handle returned %lld", what, static_cast<long long>(rc));
      return;
    }
    if (rc < -4095) Fail("%s returned %lld", what, static_cast<long long>(rc));
  }

  void Submit(const char *what, kloop_t *h, uint64_t tok, int rc, Live &&l = {}) {
    Check(what, h, rc);
    if (h == live_) t_.Submitted(what, tok, rc, std::move(l));
  }

  void Step() {
    uint8_t op = in_.u8();
    uint64_t tok = TokenOf(in_.u8());
    switch (op % 36) {
      case 0: {
        kloop_t *h = Handle();
        Submit("nop", h, tok, kloop_submit_nop(h, tok));
        break;
      }
      case 1: {
        kloop_t *h = Handle();
        uint64_t ns = in_.pick(kTimeouts);
        Submit("timeout", h, tok, kloop_submit_timeout(h, tok, ns));
        break;
      }
      case 2: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [p, len] = BufLen();
        Submit("recv", h, tok, kloop_submit_recv(h, tok, fd, p, len, in_.pick(kMsgFlags)));
        break;
      }
      case 3: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [p, len] = BufLen();
        Submit("send", h, tok, kloop_submit_send(h, tok, fd, p, len, in_.pick(kMsgFlags)));
        break;
      }
      case 4: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [p, len] = BufLen();
        Submit("recvmsg", h, tok, kloop_submit_recvmsg(h, tok, fd, p, len, in_.pick(kMsgFlags)));
        break;
      }
      case 5: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [p, len] = BufLen();
        auto [addr, alen] = Address();
        Submit("sendmsg", h, tok,
               kloop_submit_sendmsg(h, tok, fd, p, len, addr.get(), alen, in_.pick(kMsgFlags)));
        break;
      }
      case 6: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [p, len] = BufLen();
        Submit("read", h, tok, kloop_submit_read(h, tok, fd, p, len, in_.pick(kOffsets)));
        break;
      }
      case 7: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [p, len] = BufLen();
        Submit("write", h, tok, kloop_submit_write(h, tok, fd, p, len, in_.pick(kOffsets)));
        break;
      }
      case 8: {
        kloop_t *h = Handle();
        int fd = Fd();
        uint32_t ev = in_.pick(kEvents);
        uint32_t fl = in_.pick(kFlags);
        Live l;
        l.multishot = fl & KLOOP_OP_MULTISHOT;
        Submit("poll", h, tok, kloop_submit_poll(h, tok, fd, ev, fl), std::move(l));
        break;
      }
      case 9: {
        kloop_t *h = Handle();
        int fd = Fd();
        uint32_t fl = in_.pick(kFlags);
        Live l;
        l.multishot = fl & KLOOP_OP_MULTISHOT;
        l.accept = true;
        Submit("accept", h, tok, kloop_submit_accept(h, tok, fd, fl), std::move(l));
        break;
      }
      case 10: {
        kloop_t *h = Handle();
        int fd = Fd();
        auto [addr, alen] = Address();
        Submit("connect", h, tok, kloop_submit_connect(h, tok, fd, addr.get(), alen));
        break;
      }
      case 11: {
        kloop_t *h = Handle();
        int fd = Fd();
        Submit("shutdown", h, tok, kloop_submit_shutdown(h, tok, fd, in_.pick(kHows)));
        break;
      }
      case 12: {
        // close: only of a duplicate, never of the harness' own fds.
        kloop_t *h = Handle();
        int src = Fd();
        int fd = src >= 0 ? ::fcntl(src, F_DUPFD_CLOEXEC, 0) : src;
        if (src >= 0 && fd < 0) fd = src == bad_fd_ ? bad_fd_ : -1;
        int rc = kloop_submit_close(h, tok, fd);
        Live l;
        if (rc != 0 && fd >= 0 && fd != bad_fd_) l.owned_fd = fd;
        Check("close", h, rc);
        if (h == live_) {
          t_.Submitted("close", tok, rc, std::move(l));
        } else if (l.owned_fd >= 0) {
          ::close(l.owned_fd);
        }
        break;
      }
      case 13: {
        kloop_t *h = Handle();
        int fin = Fd(), fout = Fd();
        uint64_t oi = in_.pick(kOffsets), oo = in_.pick(kOffsets);
        uint32_t len = in_.pick(kLens);
        Submit("splice", h, tok,
               kloop_submit_splice(h, tok, fin, oi, fout, oo, len, in_.u8() & 0xf));
        break;
      }
      case 14: {
        kloop_t *h = Handle();
        int pid = in_.pick(kPids);
        Submit("child_exit", h, tok, kloop_submit_child_exit(h, tok, pid));
        break;
      }
      case 15: {
        kloop_t *h = Handle();
        int rc = kloop_cancel(h, tok);
        Check("cancel", h, rc);
        if (h == live_ && !t_.IsLive(tok) && rc != -ENOENT)
          Fail("cancel of free token returned %d", rc);
        break;
      }
      case 16: {
        kloop_t *h = Handle();
        int fd = Fd();
        int rc = kloop_cancel_fd(h, fd);
        Check("cancel_fd", h, rc);
        // The header lists only -EBADF (handle); the engine also refuses a
        // negative fd with -EINVAL, which is harmless.
        if (h == live_ && rc < 0 && !(fd < 0 && rc == -EINVAL))
          Fail("cancel_fd(%d) returned %d", fd, rc);
        break;
      }
      case 17: {
        // kloop_poll with hostile out/max; never an infinite wait.
        kloop_t *h = Handle();
        uint8_t b = in_.u8();
        if (h == live_ && (b & 3) != 0) {
          t_.Poll(1 + (b >> 3), (b & 4) ? 100'000 : 0);
          break;
        }
        kloop_completion one;
        kloop_completion *out = (b & 1) ? &one : nullptr;
        uint32_t max = (b & 2) ? 1 : 0;
        int rc = kloop_poll(h, out, max, 0);
        if (h == live_ && rc != -EINVAL)
          Fail("kloop_poll(out %p, max %u) returned %d", (void *)out, max, rc);
        if (h != live_ && rc != -EBADF && rc != -EINVAL)
          Fail("kloop_poll on a bad handle returned %d", rc);
        break;
      }
      case 18: {
        kloop_t *h = Handle();
        int fd = Fd();
        uint32_t fl = in_.pick(kStreamFlags);
        int dup = fd >= 0 && fd != bad_fd_ ? ::fcntl(fd, F_DUPFD_CLOEXEC, 0) : fd;
        int rc = kloop_stream_attach(h, tok, dup, fl);
        Check("stream_attach", h, rc);
        Live l;
        l.stream = true;
        bool mine = dup >= 0 && dup != bad_fd_;
        if (mine && (rc != 0 || !(fl & KLOOP_STREAM_CLOSE_FD))) l.owned_fd = dup;
        if (h == live_) {
          t_.Submitted("stream_attach", tok, rc, std::move(l));
        } else if (l.owned_fd >= 0) {
          ::close(l.owned_fd);
        }
        break;
      }
      case 19: {
        kloop_t *h = Handle();
        uint8_t b = in_.u8();
        // Lengths within the buffer, or ones no int64 result can report.
        static const size_t lens[] = {0, 1, 100, Guarded::kSize, SIZE_MAX, (size_t)INT64_MAX + 1};
        size_t len = lens[b % 6];
        const char *p = (b & 0x80) ? nullptr : Buf().p;
        int64_t rc = kloop_stream_write(h, tok, p, len);
        Check("stream_write", h, rc);
        if (h == live_) {
          t_.StreamCall("stream_write", tok, rc, (p || len == 0) && len <= (size_t)INT64_MAX);
          if (len > (size_t)INT64_MAX && rc >= 0)
            Fail("stream_write of %zu bytes returned %lld", len, (long long)rc);
          if (!p && len > 0 && t_.IsStream(tok) && rc != -EINVAL)
            Fail("stream_write(NULL, %zu) returned %lld", len, (long long)rc);
        }
        break;
      }
      case 20:
      case 21:
      case 22:
      case 23:
      case 24:
      case 25: {
        kloop_t *h = Handle();
        int64_t rc = 0;
        const char *name = "";
        switch (op % 36) {
          case 20:
            rc = kloop_stream_pause(h, tok);
            name = "stream_pause";
            break;
          case 21:
            rc = kloop_stream_resume(h, tok);
            name = "stream_resume";
            break;
          case 22:
            rc = kloop_stream_shutdown(h, tok);
            name = "stream_shutdown";
            break;
          case 23:
            rc = kloop_stream_close(h, tok);
            name = "stream_close";
            break;
          case 24:
            rc = kloop_stream_abort(h, tok);
            name = "stream_abort";
            break;
          default:
            rc = kloop_stream_write_size(h, tok);
            name = "stream_write_size";
            break;
        }
        Check(name, h, rc);
        if (h == live_) t_.StreamCall(name, tok, rc);
        break;
      }
      case 26: {
        kloop_t *h = Handle();
        uint64_t hi = in_.u64() >> (in_.u8() & 63), lo = in_.u64() >> (in_.u8() & 63);
        int rc = kloop_stream_set_limits(h, tok, hi, lo);
        Check("stream_set_limits", h, rc);
        if (h == live_) t_.StreamCall("stream_set_limits", tok, rc, lo <= hi);
        break;
      }
      case 27:
      case 28: {
        // Versioned structs with every size: a heap block of exactly the
        // announced size, so writing more than `size` bytes is caught.
        kloop_t *h = Handle();
        uint8_t b = in_.u8();
        bool caps = op % 36 == 27;
        size_t full = caps ? sizeof(kloop_caps) : sizeof(kloop_stats);
        size_t min_sz = caps ? offsetof(kloop_caps, reserved) : offsetof(kloop_stats, reserved);
        const size_t sizes[] = {4, 8, min_sz - 1, min_sz, full - 1, full, full + 64};
        size_t sz = sizes[b % 7];
        std::unique_ptr<unsigned char[]> mem(new unsigned char[sz]);
        std::memset(mem.get(), 0xCC, sz);
        uint32_t s32 = static_cast<uint32_t>(sz);
        std::memcpy(mem.get(), &s32, 4);
        int rc;
        if (b & 0x80) {
          rc = caps ? kloop_get_caps(h, nullptr) : kloop_get_stats(h, nullptr);
          Check("get_caps/stats(NULL)", h, rc);
          if (h == live_ && rc != -EINVAL) Fail("get_caps/stats(NULL) returned %d", rc);
        } else {
          rc = caps ? kloop_get_caps(h, reinterpret_cast<kloop_caps *>(mem.get()))
                    : kloop_get_stats(h, reinterpret_cast<kloop_stats *>(mem.get()));
          Check("get_caps/stats", h, rc);
          // Below the 0.1 fields: refused. A full struct: accepted. In
          // between (a caller without the reserved tail): either, but never
          // a write beyond `size` bytes (ASan).
          if (h == live_ && sz < min_sz && rc != -EINVAL)
            Fail("get_caps/stats with size %zu returned %d", sz, rc);
          if (h == live_ && sz >= full && rc != 0)
            Fail("get_caps/stats with size %zu returned %d", sz, rc);
        }
        if (b & 0x40) {
          rc = kloop_probe(caps ? reinterpret_cast<kloop_caps *>(mem.get()) : nullptr);
          if (!caps && rc != -EINVAL) Fail("kloop_probe(NULL) returned %d", rc);
        }
        break;
      }
      case 29: {
        kloop_t *h = Handle();
        uint8_t b = in_.u8();
        uint64_t base = 0, size = 0;
        int rc = kloop_buffer_arena(h, (b & 1) ? &base : nullptr, (b & 2) ? &size : nullptr);
        Check("buffer_arena", h, rc);
        if (h == live_ && ((b & 3) == 3) != (rc == 0)) Fail("buffer_arena returned %d", rc);
        break;
      }
      case 30: {
        kloop_t *h = Handle();
        Check("wake", h, kloop_wake(h));
        break;
      }
      case 31: {
        kloop_t *h = Handle();
        int rc = kloop_ring_fd(h);
        Check("ring_fd", h, rc);
        break;
      }
      case 32: {
        const char *s = kloop_strerror(static_cast<int>(in_.u32()));
        if (!s) Fail("kloop_strerror returned NULL");
        volatile size_t n = std::strlen(s);
        (void)n;
        break;
      }
      case 33:
        Config();
        break;
      case 34: {
        // Operations on a bad handle never change the live loop.
        kloop_t *h = in_.u8() & 1 ? nullptr : GarbageHandle();
        if (kloop_destroy(h) != -EBADF) Fail("kloop_destroy of a bad handle did not give -EBADF");
        break;
      }
      default: {
        // Let the peer side produce data and readiness.
        int fd = fds_.pick(in_.u8());
        (void)!::write(fd, Buf().p, in_.u16() % Guarded::kSize);
        break;
      }
    }
  }

  // kloop_create with hostile configs of every size.
  void Config() {
    uint8_t b = in_.u8();
    const size_t sizes[] = {4,
                            8,
                            offsetof(kloop_config, reserved) - 1,
                            offsetof(kloop_config, reserved),
                            sizeof(kloop_config),
                            sizeof(kloop_config) + 32};
    size_t sz = sizes[b % 6];
    std::unique_ptr<unsigned char[]> mem(new unsigned char[sz]);
    kloop_config full;
    kloop_config_init(&full);
    static const uint32_t sq[] = {0, 1, 2, 8, 32768, 32769, UINT32_MAX};
    static const uint32_t cq[] = {0, 1, 2, 16, 65536, UINT32_MAX};
    static const uint32_t bsize[] = {0, 255, 256, 4096, 65536, 1u << 20, (1u << 20) + 1};
    static const uint32_t bcount[] = {0, 1, 3, 4, 16, 32768, 65536};
    full.sq_entries = in_.pick(sq);
    full.cq_entries = in_.pick(cq);
    full.buf_size = in_.pick(bsize);
    full.buf_count = in_.pick(bcount);
    full.flags = (b & 0x40) ? in_.u32() : (in_.u8() & KLOOP_CONFIG_NO_DEFER_TASKRUN);
    full.disable = in_.u64();
    // Keep valid configs small: memory, not validation, would be tested.
    if (static_cast<uint64_t>(full.buf_size) * full.buf_count > (8u << 20)) full.buf_count = 4;
    if (full.sq_entries > 64 && full.sq_entries <= 32768 && (b & 0x20) == 0) full.sq_entries = 64;
    if (full.flags & KLOOP_CONFIG_SQPOLL) full.flags &= ~KLOOP_CONFIG_SQPOLL;  // costs a core
    std::memset(mem.get(), 0, sz);
    std::memcpy(mem.get(), &full, sz < sizeof full ? sz : sizeof full);
    uint32_t s32 = static_cast<uint32_t>(sz);
    std::memcpy(mem.get(), &s32, 4);
    kloop_t *sentinel = GarbageHandle();
    kloop_t *out = sentinel;
    int rc = kloop_create(reinterpret_cast<kloop_config *>(mem.get()), (b & 0x80) ? nullptr : &out);
    if (b & 0x80) {
      if (rc != -EINVAL) Fail("kloop_create(out NULL) returned %d", rc);
      return;
    }
    if (rc == 0 && (full.flags & ~(KLOOP_CONFIG_SQPOLL | KLOOP_CONFIG_NO_DEFER_TASKRUN)) &&
        sz >= offsetof(kloop_config, disable))
      Fail("kloop_create accepted unknown flags %#x", full.flags);
    if (rc != 0) {
      if (out != sentinel) Fail("kloop_create failed (%d) but wrote *out", rc);
      if (rc > 0 || rc < -4095) Fail("kloop_create returned %d", rc);
      return;
    }
    if (!out || out == sentinel) Fail("kloop_create succeeded without a handle");
    kloop_caps c{};
    c.size = sizeof c;
    if (kloop_get_caps(out, &c) != 0) Fail("get_caps of a new loop failed");
    if (c.enabled & full.disable) Fail("disabled capability enabled");
    if (kloop_submit_nop(out, 1) != 0) Fail("nop on a new loop failed");
    kloop_completion rec;
    int64_t end = NowNs() + 2'000'000'000LL;
    int n = 0;
    while (n == 0 && NowNs() < end) n = kloop_poll(out, &rec, 1, 1'000'000);
    if (n != 1 || rec.token != 1) Fail("nop on a new loop did not complete (%d)", n);
    if (kloop_destroy(out) != 0) Fail("destroy of a new loop failed");
  }

  void Finish() { t_.Finish(); }

 private:
  // An address buffer of exactly 128 bytes with fuzzed content and a length
  // that may exceed it: the engine must refuse lengths above 128 without
  // reading, which ASan checks.
  std::pair<std::unique_ptr<unsigned char[]>, uint32_t> Address() {
    uint8_t b = in_.u8();
    uint32_t alen = kAddrLens[b % (sizeof kAddrLens / sizeof kAddrLens[0])];
    if (b & 0x80) return {nullptr, alen};
    std::unique_ptr<unsigned char[]> a(new unsigned char[128]);
    for (int i = 0; i < 128; ++i) a[i] = in_.u8();
    // Mostly a family the kernel knows.
    static const sa_family_t fam[] = {AF_UNIX, AF_INET, AF_INET6, AF_UNSPEC, 0xffff};
    sa_family_t f = fam[a[2] % 5];
    std::memcpy(a.get(), &f, sizeof f);
    if (f == AF_UNIX && (a[3] & 1) && alen >= fds_.listen_len && alen <= 128)
      std::memcpy(a.get(), &fds_.listen_addr, fds_.listen_len);
    return {std::move(a), alen};
  }

  Reader &in_;
  kloop_t *live_;
  Fds fds_;
  Tracker t_;
  int bad_fd_ = 1000;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  IgnoreSigpipe();
  DeadHandle();  // before the live loop, so that its address is not reused
  std::set<int> before = OpenFds();
  {
    kloop_t *live = nullptr;
    if (kloop_create(nullptr, &live) != 0) Fail("kloop_create(NULL) failed");
    Reader in(data, size);
    {
      Abi abi(in, live);
      for (int i = 0; i < 200 && !in.empty(); ++i) abi.Step();
      abi.Finish();
    }
    if (kloop_destroy(live) != 0) Fail("kloop_destroy failed");
  }
  CloseNewFds(before);
  return 0;
}
