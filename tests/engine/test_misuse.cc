// Misuse never crashes: bad handles, bad fds, bad tokens, bad lengths,
// destroy with work in flight, use after fork.
#include <sys/mman.h>
#include <sys/wait.h>

#include <thread>

#include "common.h"

using namespace kt;

namespace {

// Every function that takes a loop, called with otherwise valid arguments.
struct Call {
  const char *name;
  std::function<int64_t(kloop_t *)> fn;
};

struct CallArgs {
  std::pair<Fd, Fd> pipe = Pipe();
  std::pair<Fd, Fd> sock = UnixPair();
  char buf[64] = {};
  Addr addr = Loopback(AF_INET, 9);
  kloop_completion out[4];
  kloop_caps caps{};
  kloop_stats stats{};
  uint64_t base = 0, size = 0;
};

std::vector<Call> AllCalls(CallArgs &a) {
  a.caps.size = sizeof a.caps;
  a.stats.size = sizeof a.stats;
  int r = a.pipe.first, w = a.pipe.second, s = a.sock.first;
  return {
      {"get_caps", [&a](kloop_t *l) { return kloop_get_caps(l, &a.caps); }},
      {"ring_fd", [](kloop_t *l) { return kloop_ring_fd(l); }},
      {"poll", [&a](kloop_t *l) { return kloop_poll(l, a.out, 4, 0); }},
      {"buffer_arena", [&a](kloop_t *l) { return kloop_buffer_arena(l, &a.base, &a.size); }},
      {"wake", [](kloop_t *l) { return kloop_wake(l); }},
      {"submit_nop", [](kloop_t *l) { return kloop_submit_nop(l, 1); }},
      {"submit_accept", [s](kloop_t *l) { return kloop_submit_accept(l, 1, s, 0); }},
      {"submit_connect",
       [&a, s](kloop_t *l) { return kloop_submit_connect(l, 1, s, a.addr.sa(), a.addr.len); }},
      {"submit_recv", [&a, s](kloop_t *l) { return kloop_submit_recv(l, 1, s, a.buf, 8, 0); }},
      {"submit_send", [&a, s](kloop_t *l) { return kloop_submit_send(l, 1, s, a.buf, 8, 0); }},
      {"submit_recvmsg",
       [&a, s](kloop_t *l) { return kloop_submit_recvmsg(l, 1, s, a.buf, 8, 0); }},
      {"submit_sendmsg",
       [&a, s](kloop_t *l) { return kloop_submit_sendmsg(l, 1, s, a.buf, 8, nullptr, 0, 0); }},
      {"submit_read",
       [&a, r](kloop_t *l) { return kloop_submit_read(l, 1, r, a.buf, 8, KLOOP_OFFSET_CURRENT); }},
      {"submit_write",
       [&a, w](kloop_t *l) { return kloop_submit_write(l, 1, w, a.buf, 8, KLOOP_OFFSET_CURRENT); }},
      {"submit_poll", [r](kloop_t *l) { return kloop_submit_poll(l, 1, r, POLLIN, 0); }},
      {"submit_timeout", [](kloop_t *l) { return kloop_submit_timeout(l, 1, 1000); }},
      {"submit_shutdown", [s](kloop_t *l) { return kloop_submit_shutdown(l, 1, s, SHUT_WR); }},
      {"submit_close", [s](kloop_t *l) { return kloop_submit_close(l, 1, s); }},
      {"submit_splice",
       [r, s](kloop_t *l) {
         return kloop_submit_splice(l, 1, r, KLOOP_OFFSET_CURRENT, s, KLOOP_OFFSET_CURRENT, 8, 0);
       }},
      {"submit_child_exit", [](kloop_t *l) { return kloop_submit_child_exit(l, 1, ::getpid()); }},
      {"cancel", [](kloop_t *l) { return kloop_cancel(l, 1); }},
      {"cancel_fd", [s](kloop_t *l) { return kloop_cancel_fd(l, s); }},
      {"stream_attach", [s](kloop_t *l) { return kloop_stream_attach(l, 1, s, 0); }},
      {"stream_pause", [](kloop_t *l) { return kloop_stream_pause(l, 1); }},
      {"stream_resume", [](kloop_t *l) { return kloop_stream_resume(l, 1); }},
      {"stream_write", [&a](kloop_t *l) { return kloop_stream_write(l, 1, a.buf, 8); }},
      {"stream_set_limits", [](kloop_t *l) { return kloop_stream_set_limits(l, 1, 100, 10); }},
      {"stream_write_size", [](kloop_t *l) { return kloop_stream_write_size(l, 1); }},
      {"stream_shutdown", [](kloop_t *l) { return kloop_stream_shutdown(l, 1); }},
      {"stream_close", [](kloop_t *l) { return kloop_stream_close(l, 1); }},
      {"stream_abort", [](kloop_t *l) { return kloop_stream_abort(l, 1); }},
      {"get_stats", [&a](kloop_t *l) { return kloop_get_stats(l, &a.stats); }},
  };
}

TEST(MisuseHandle, NullHandleIsEbadfEverywhere) {
  CallArgs args;
  for (const Call &c : AllCalls(args)) EXPECT_EQ(c.fn(nullptr), -EBADF) << c.name;
  EXPECT_EQ(kloop_destroy(nullptr), -EBADF);
}

TEST(MisuseHandle, DestroyedHandleIsEbadfEverywhere) {
  CallArgs args;
  kloop_t *loop = nullptr;
  ASSERT_EQ(kloop_create(nullptr, &loop), 0);
  ASSERT_EQ(kloop_destroy(loop), 0);
  // No loop is created in between, so the stale pointer cannot have been
  // handed out again.
  for (const Call &c : AllCalls(args)) EXPECT_EQ(c.fn(loop), -EBADF) << c.name;
  EXPECT_EQ(kloop_destroy(loop), -EBADF);
  EXPECT_TRUE(FdOpen(args.sock.first)) << "a call on a destroyed loop closed an fd";
}

TEST(MisuseHandle, GarbageHandleIsEbadf) {
  // A pointer to memory that never was a loop.
  alignas(64) static unsigned char junk[4096];
  std::memset(junk, 0x5A, sizeof junk);
  kloop_t *loop = reinterpret_cast<kloop_t *>(junk);
  EXPECT_EQ(kloop_submit_nop(loop, 1), -EBADF);
  EXPECT_EQ(kloop_wake(loop), -EBADF);
  kloop_completion c;
  EXPECT_EQ(kloop_poll(loop, &c, 1, 0), -EBADF);
  EXPECT_EQ(kloop_destroy(loop), -EBADF);
}

class Misuse : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(d.Create(nullptr), 0);
    // An fd number that is surely not open.
    for (bad_fd = 900; FdOpen(bad_fd); ++bad_fd) {
    }
  }
  // A submit on a bad fd either fails (-EBADF) or completes with -EBADF.
  void ExpectBadFd(const char *what, int rc, uint64_t token) {
    if (rc == 0) {
      Event e = d.WaitFinal(token);
      EXPECT_EQ(e.result, -EBADF) << what << ": completion";
    } else {
      EXPECT_EQ(rc, -EBADF) << what << ": submit";
    }
  }
  Driver d;
  int bad_fd = -1;
  char buf[64] = {};
};

TEST_F(Misuse, BadFdEveryOperation) {
  Addr a = Loopback(AF_INET, 9);
  auto [r, w] = Pipe();
  int b = bad_fd;
  ExpectBadFd("accept", kloop_submit_accept(d, 1, b, 0), 1);
  ExpectBadFd("accept multishot", kloop_submit_accept(d, 2, b, KLOOP_OP_MULTISHOT), 2);
  ExpectBadFd("connect", kloop_submit_connect(d, 3, b, a.sa(), a.len), 3);
  ExpectBadFd("recv", kloop_submit_recv(d, 4, b, buf, 8, 0), 4);
  ExpectBadFd("send", kloop_submit_send(d, 5, b, buf, 8, 0), 5);
  ExpectBadFd("recvmsg", kloop_submit_recvmsg(d, 6, b, buf, 8, 0), 6);
  ExpectBadFd("sendmsg", kloop_submit_sendmsg(d, 7, b, buf, 8, a.sa(), a.len, 0), 7);
  ExpectBadFd("read", kloop_submit_read(d, 8, b, buf, 8, KLOOP_OFFSET_CURRENT), 8);
  ExpectBadFd("write", kloop_submit_write(d, 9, b, buf, 8, 0), 9);
  ExpectBadFd("poll", kloop_submit_poll(d, 10, b, POLLIN, 0), 10);
  ExpectBadFd("poll multishot", kloop_submit_poll(d, 11, b, POLLIN, KLOOP_OP_MULTISHOT), 11);
  ExpectBadFd("shutdown", kloop_submit_shutdown(d, 12, b, SHUT_WR), 12);
  ExpectBadFd("close", kloop_submit_close(d, 13, b), 13);
  ExpectBadFd("splice in",
              kloop_submit_splice(d, 14, b, KLOOP_OFFSET_CURRENT, w, KLOOP_OFFSET_CURRENT, 8, 0),
              14);
  ExpectBadFd("splice out",
              kloop_submit_splice(d, 15, r, KLOOP_OFFSET_CURRENT, b, KLOOP_OFFSET_CURRENT, 8, 0),
              15);
  EXPECT_EQ(kloop_cancel_fd(d, b), 0);
  d.Drain(10ms);
  for (uint64_t t = 1; t <= 15; ++t) EXPECT_LE(d.FinalCount(t), 1) << t;
}

TEST_F(Misuse, BadFdStream) {
  int rc = kloop_stream_attach(d, 1, bad_fd, 0);
  if (rc == 0) {
    Event e = d.WaitEvent(1, KLOOP_EVENT_ERROR);
    EXPECT_EQ(e.result, -EBADF);
    ASSERT_EQ(kloop_stream_close(d, 1), 0);
    EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  } else {
    EXPECT_EQ(rc, -EBADF);
  }
}

TEST_F(Misuse, NotASocket) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_recv(d, 1, r, buf, 8, 0), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ENOTSOCK);
  ASSERT_EQ(kloop_submit_accept(d, 2, r, 0), 0);
  EXPECT_EQ(d.WaitFinal(2).result, -ENOTSOCK);
}

TEST_F(Misuse, NegativeFdIsEinval) {
  Addr a = Loopback(AF_INET, 9);
  auto [r, w] = Pipe();
  for (int fd : {-1, -2, INT32_MIN}) {
    EXPECT_EQ(kloop_submit_accept(d, 1, fd, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_connect(d, 1, fd, a.sa(), a.len), -EINVAL);
    EXPECT_EQ(kloop_submit_recv(d, 1, fd, buf, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_send(d, 1, fd, buf, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_recvmsg(d, 1, fd, buf, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_sendmsg(d, 1, fd, buf, 8, a.sa(), a.len, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_read(d, 1, fd, buf, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_write(d, 1, fd, buf, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_poll(d, 1, fd, POLLIN, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_shutdown(d, 1, fd, SHUT_WR), -EINVAL);
    EXPECT_EQ(kloop_submit_close(d, 1, fd), -EINVAL);
    EXPECT_EQ(kloop_submit_splice(d, 1, fd, 0, w, KLOOP_OFFSET_CURRENT, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_submit_splice(d, 1, r, KLOOP_OFFSET_CURRENT, fd, 0, 8, 0), -EINVAL);
    EXPECT_EQ(kloop_stream_attach(d, 1, fd, 0), -EINVAL);
  }
  // None of them may produce a completion.
  d.Drain(20ms);
  EXPECT_TRUE(d.events().empty()) << Describe(d.events()[0]);
}

TEST_F(Misuse, ChildExitBadPid) {
  for (int pid : {0, -1, INT32_MIN}) {
    int rc = kloop_submit_child_exit(d, 1, pid);
    if (rc == 0) {
      Event e = d.WaitFinal(1);
      EXPECT_LT(e.result, 0) << "pid " << pid;
      d.Forget(1);
    } else {
      EXPECT_EQ(rc, -EINVAL) << "pid " << pid;
    }
  }
}

TEST_F(Misuse, NullBufferWithLengthIsEinval) {
  auto [s, peer] = UnixPair();
  auto [r, w] = Pipe();
  EXPECT_EQ(kloop_submit_recv(d, 1, s, nullptr, 8, 0), -EINVAL);
  EXPECT_EQ(kloop_submit_send(d, 1, s, nullptr, 8, 0), -EINVAL);
  EXPECT_EQ(kloop_submit_recvmsg(d, 1, s, nullptr, 8, 0), -EINVAL);
  EXPECT_EQ(kloop_submit_sendmsg(d, 1, s, nullptr, 8, nullptr, 0, 0), -EINVAL);
  EXPECT_EQ(kloop_submit_read(d, 1, r, nullptr, 8, KLOOP_OFFSET_CURRENT), -EINVAL);
  EXPECT_EQ(kloop_submit_write(d, 1, w, nullptr, 8, KLOOP_OFFSET_CURRENT), -EINVAL);
  d.Drain(10ms);
  EXPECT_TRUE(d.events().empty());
}

TEST_F(Misuse, AddressArgumentsAreChecked) {
  Addr a = Loopback(AF_INET, 9);
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  Fd u(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(kloop_submit_connect(d, 1, s, nullptr, 16), -EINVAL);
  EXPECT_EQ(kloop_submit_connect(d, 1, s, a.sa(), 0), -EINVAL);
  // 129 bytes: one more than sockaddr_storage. The buffer is big enough so
  // that an engine that copies first and checks later is caught by ASan only
  // when it overreads beyond 129.
  std::vector<char> big(129, 0);
  std::memcpy(big.data(), a.sa(), a.len);
  EXPECT_EQ(kloop_submit_connect(d, 1, s, big.data(), 129), -EINVAL);
  EXPECT_EQ(kloop_submit_connect(d, 1, s, big.data(), UINT32_MAX), -EINVAL);
  EXPECT_EQ(kloop_submit_sendmsg(d, 1, u, buf, 4, nullptr, 16, 0), -EINVAL);
  EXPECT_EQ(kloop_submit_sendmsg(d, 1, u, buf, 4, big.data(), 129, 0), -EINVAL);
  EXPECT_EQ(kloop_submit_sendmsg(d, 1, u, buf, 4, big.data(), UINT32_MAX, 0), -EINVAL);
  d.Drain(10ms);
  EXPECT_TRUE(d.events().empty());
  // A full 128-byte address is accepted (the kernel judges its content).
  std::vector<char> full(128, 0);
  std::memcpy(full.data(), a.sa(), a.len);
  ASSERT_EQ(kloop_submit_sendmsg(d, 2, u, buf, 4, full.data(), 128, 0), 0);
  d.WaitFinal(2);
}

TEST_F(Misuse, UnknownFlagsAreEinval) {
  auto [s, peer] = UnixPair();
  Fd l = TcpListener();
  EXPECT_EQ(kloop_submit_accept(d, 1, l, 1u << 1), -EINVAL);
  EXPECT_EQ(kloop_submit_accept(d, 1, l, 1u << 31), -EINVAL);
  EXPECT_EQ(kloop_submit_poll(d, 1, s, POLLIN, 1u << 7), -EINVAL);
  EXPECT_EQ(kloop_stream_attach(d, 1, s, 1u << 9), -EINVAL);
  EXPECT_EQ(kloop_stream_attach(d, 1, s, UINT32_MAX), -EINVAL);
  d.Drain(10ms);
  EXPECT_TRUE(d.events().empty());
}

TEST_F(Misuse, BadShutdownHow) {
  auto [s, peer] = UnixPair();
  for (int how : {3, -1, 100}) {
    int rc = kloop_submit_shutdown(d, 1, s, how);
    if (rc == 0) {
      EXPECT_EQ(d.WaitFinal(1).result, -EINVAL) << how;
      d.Forget(1);
    } else {
      EXPECT_EQ(rc, -EINVAL) << how;
    }
  }
}

TEST_F(Misuse, StaleAndUnknownTokens) {
  EXPECT_EQ(kloop_cancel(d, 0), -ENOENT);
  EXPECT_EQ(kloop_cancel(d, ~0ull), -ENOENT);
  ASSERT_EQ(kloop_submit_nop(d, 10), 0);
  d.WaitFinal(10);
  EXPECT_EQ(kloop_cancel(d, 10), -ENOENT);
  // Reuse after the final completion is allowed.
  d.Forget(10);
  ASSERT_EQ(kloop_submit_nop(d, 10), 0);
  EXPECT_EQ(d.WaitFinal(10).result, 0);
}

TEST_F(Misuse, DuplicateLiveTokenIsEexistForEveryKind) {
  auto [s, peer] = UnixPair();
  auto [r, w] = Pipe();
  Fd l = TcpListener();
  ASSERT_EQ(kloop_submit_timeout(d, 5, 10'000 * kMs), 0);
  Addr a = Loopback(AF_INET, 9);
  EXPECT_EQ(kloop_submit_nop(d, 5), -EEXIST);
  EXPECT_EQ(kloop_submit_timeout(d, 5, 1), -EEXIST);
  EXPECT_EQ(kloop_submit_recv(d, 5, s, buf, 8, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_send(d, 5, s, buf, 8, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_recvmsg(d, 5, s, buf, 8, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_sendmsg(d, 5, s, buf, 8, nullptr, 0, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_read(d, 5, r, buf, 8, KLOOP_OFFSET_CURRENT), -EEXIST);
  EXPECT_EQ(kloop_submit_write(d, 5, w, buf, 8, KLOOP_OFFSET_CURRENT), -EEXIST);
  EXPECT_EQ(kloop_submit_poll(d, 5, r, POLLIN, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_accept(d, 5, l, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_connect(d, 5, s, a.sa(), a.len), -EEXIST);
  EXPECT_EQ(kloop_submit_shutdown(d, 5, s, SHUT_WR), -EEXIST);
  EXPECT_EQ(kloop_submit_close(d, 5, s), -EEXIST);
  EXPECT_EQ(kloop_submit_splice(d, 5, r, KLOOP_OFFSET_CURRENT, s, KLOOP_OFFSET_CURRENT, 8, 0),
            -EEXIST);
  EXPECT_EQ(kloop_submit_child_exit(d, 5, ::getpid()), -EEXIST);
  EXPECT_EQ(kloop_stream_attach(d, 5, s, 0), -EEXIST);
  EXPECT_TRUE(FdOpen(s)) << "a refused close closed the fd";
  ASSERT_EQ(kloop_cancel(d, 5), 0);
  EXPECT_EQ(d.WaitFinal(5).result, -ECANCELED);
  d.Drain(20ms);
  EXPECT_EQ(d.Of(5).size(), 1u) << "a refused submit produced a completion";
}

TEST_F(Misuse, TokensNearUint64MaxAreOrdinary) {
  auto [s, peer] = UnixPair();
  for (uint64_t k = 0; k < 8; ++k) {
    uint64_t tok = UINT64_MAX - k;
    char buf[8];
    ASSERT_EQ(kloop_submit_recv(d, tok, s, buf, sizeof buf, 0), 0) << k;
    EXPECT_EQ(kloop_submit_nop(d, tok), -EEXIST) << k;
    EXPECT_EQ(kloop_submit_sendmsg(d, tok, s, "x", 1, nullptr, 0, 0), -EEXIST) << k;
    d.Drain(2ms);
    EXPECT_FALSE(d.HasFinal(tok)) << k;
    EXPECT_EQ(kloop_submit_nop(d, tok), -EEXIST) << k;
    ASSERT_EQ(kloop_cancel(d, tok), 0) << k;
    EXPECT_EQ(d.WaitFinal(tok).result, -ECANCELED) << k;
  }
}

TEST_F(Misuse, DuplicateOfMultishotIsEexist) {
  Fd l = TcpListener();
  ASSERT_EQ(kloop_submit_accept(d, 8, l, KLOOP_OP_MULTISHOT), 0);
  EXPECT_EQ(d.Poll(0), 0);
  EXPECT_EQ(kloop_submit_nop(d, 8), -EEXIST);
  ASSERT_EQ(kloop_cancel(d, 8), 0);
  d.WaitFinal(8);
}

// A buffer whose end touches an inaccessible page: an oversize length makes
// the kernel fault instead of scribbling over the heap.
class Guarded {
 public:
  explicit Guarded(size_t pages) : len_(pages * 4096) {
    void *p =
        ::mmap(nullptr, len_ + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    base_ = static_cast<char *>(p);
    ::mprotect(base_ + len_, 4096, PROT_NONE);
    std::memset(base_, 'g', len_);
  }
  ~Guarded() { ::munmap(base_, len_ + 4096); }
  char *get() { return base_; }
  size_t size() const { return len_; }

 private:
  size_t len_;
  char *base_;
};

TEST_F(Misuse, OversizeLengthsComplete) {
  Guarded g(2);
  auto [s, peer] = UnixPair();
  int rc = kloop_submit_send(d, 1, s, g.get(), UINT32_MAX, 0);
  if (rc == 0) {
    Event e = d.WaitFinal(1);
    EXPECT_TRUE(e.result == -EFAULT || (e.result > 0 && static_cast<size_t>(e.result) <= g.size()))
        << e.result;
  } else {
    EXPECT_EQ(rc, -EINVAL);
  }
  ReadAvailable(peer);
  ASSERT_TRUE(WriteAll(peer, std::string(100, 'p')));
  rc = kloop_submit_recv(d, 2, s, g.get(), UINT32_MAX, 0);
  if (rc == 0) {
    EXPECT_EQ(d.WaitFinal(2).result, 100);
  } else {
    EXPECT_EQ(rc, -EINVAL);
  }
  Fd f = TempFile(std::string(3 * 4096, 'f'));
  rc = kloop_submit_read(d, 3, f, g.get(), UINT32_MAX, 0);
  if (rc == 0) {
    Event e = d.WaitFinal(3);
    EXPECT_TRUE(e.result == -EFAULT || (e.result > 0 && static_cast<size_t>(e.result) <= g.size()))
        << e.result;
  }
  rc = kloop_submit_write(d, 4, f, g.get(), UINT32_MAX, 0);
  if (rc == 0) {
    Event e = d.WaitFinal(4);
    EXPECT_TRUE(e.result == -EFAULT || (e.result > 0 && static_cast<size_t>(e.result) <= g.size()))
        << e.result;
  }
  Addr a1, a2;
  Fd u1 = UdpSocket(AF_INET, &a1), u2 = UdpSocket(AF_INET, &a2);
  rc = kloop_submit_sendmsg(d, 5, u1, g.get(), UINT32_MAX, a2.sa(), a2.len, 0);
  if (rc == 0) {
    EXPECT_LT(d.WaitFinal(5).result, 0) << "a 4 GiB datagram cannot be sent";
  }
  auto [pr, pw] = Pipe();
  rc = kloop_submit_splice(d, 6, f, 0, pw, KLOOP_OFFSET_CURRENT, UINT32_MAX, 0);
  if (rc == 0) {
    EXPECT_EQ(d.WaitFinal(6).result, 3 * 4096);
  }
}

TEST_F(Misuse, ZeroLengths) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_write(d, 1, w, nullptr, 0, KLOOP_OFFSET_CURRENT), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
  ASSERT_TRUE(WriteAll(w, "x"));
  ASSERT_EQ(kloop_submit_read(d, 2, r, buf, 0, KLOOP_OFFSET_CURRENT), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 0);
  Addr a1, a2;
  Fd u1 = UdpSocket(AF_INET, &a1), u2 = UdpSocket(AF_INET, &a2);
  ASSERT_EQ(kloop_submit_sendmsg(d, 3, u1, nullptr, 0, a2.sa(), a2.len, 0), 0);
  EXPECT_EQ(d.WaitFinal(3).result, 0);
  ASSERT_EQ(kloop_submit_recvmsg(d, 4, u2, nullptr, 0, 0), 0);
  Event e = d.WaitFinal(4);
  EXPECT_EQ(e.result, 0);
  EXPECT_EQ(e.aux & 0xffff, a1.len);
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 5, s, 0), 0);
  EXPECT_EQ(kloop_stream_write(d, 5, nullptr, 0), 0);
  EXPECT_EQ(kloop_stream_write(d, 5, buf, 0), 0);
  ASSERT_EQ(kloop_stream_close(d, 5), 0);
  d.WaitFinal(5);
}

TEST_F(Misuse, HugeStreamWriteIsRefusedWithoutCopying) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  EXPECT_LT(kloop_stream_write(d, 1, buf, SIZE_MAX), 0);
  EXPECT_LT(kloop_stream_write(d, 1, buf, static_cast<size_t>(INT64_MAX) + 1), 0);
  EXPECT_EQ(kloop_stream_write_size(d, 1), 0) << "a refused write was queued";
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  d.WaitFinal(1);
}

TEST_F(Misuse, HugeTimeoutCanBeCancelled) {
  // Beyond INT64_MAX the engine may refuse; up to it, it must accept.
  int rc = kloop_submit_timeout(d, 2, UINT64_MAX);
  EXPECT_TRUE(rc == 0 || rc == -EINVAL) << rc;
  if (rc == 0) {
    ASSERT_EQ(kloop_cancel(d, 2), 0);
    EXPECT_EQ(d.WaitFinal(2).result, -ECANCELED);
  }
  ASSERT_EQ(kloop_submit_timeout(d, 1, INT64_MAX), 0);
  EXPECT_EQ(d.Poll(0), 0);
  ASSERT_EQ(kloop_cancel(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ECANCELED);
}

TEST(MisuseDestroy, WithEverythingInFlight) {
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  char buf1[64], buf2[64];
  auto [s1, p1] = TcpPair();
  ASSERT_EQ(kloop_submit_recv(d, 1, s1, buf1, sizeof buf1, 0), 0);
  Fd l = TcpListener();
  ASSERT_EQ(kloop_submit_accept(d, 2, l, KLOOP_OP_MULTISHOT), 0);
  ASSERT_EQ(kloop_submit_timeout(d, 3, INT64_MAX), 0);
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_poll(d, 4, r, POLLIN, KLOOP_OP_MULTISHOT), 0);
  ASSERT_EQ(kloop_submit_read(d, 5, r, buf2, sizeof buf2, KLOOP_OFFSET_CURRENT), 0);
  // Streams with queued writes the peer never reads.
  auto [s2, p2] = TcpPair();
  ShrinkBuffers(s2, p2);
  int owned = s2.release();
  ASSERT_EQ(kloop_stream_attach(d, 6, owned, KLOOP_STREAM_CLOSE_FD), 0);
  std::string big = Pattern(0, 4 << 20);
  ASSERT_GT(kloop_stream_write(d, 6, big.data(), big.size()), 0);
  auto [s3, p3] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 7, s3, 0), 0);
  ASSERT_GE(kloop_stream_write(d, 7, big.data(), big.size()), 0);
  ASSERT_EQ(kloop_stream_close(d, 7), 0);  // a flush that cannot finish
  pid_t child = ::fork();
  if (child == 0) {
    for (;;) ::pause();
  }
  ASSERT_EQ(kloop_submit_child_exit(d, 8, child), 0);
  // Completions sitting in the ring, not harvested.
  for (uint64_t t = 100; t < 150; ++t) ASSERT_EQ(kloop_submit_nop(d, t), 0);
  kloop_completion c;
  ASSERT_GE(kloop_poll(d, &c, 1, 20 * kMs), 0);
  // And ops queued but never submitted.
  ASSERT_EQ(kloop_submit_timeout(d, 9, INT64_MAX), 0);
  auto t0 = Clock::now();
  EXPECT_EQ(d.Destroy(), 0);
  EXPECT_LT(Clock::now() - t0, 2s) << "destroy waited for the stuck flush";
  EXPECT_FALSE(FdOpen(owned)) << "destroy did not close a KLOOP_STREAM_CLOSE_FD fd";
  EXPECT_TRUE(FdOpen(s3)) << "destroy closed an fd it does not own";
  EXPECT_TRUE(FdOpen(s1));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  // The peer of the recv sees nothing but an open connection; writing works.
  EXPECT_TRUE(WriteAll(p1, "after"));
  EXPECT_EQ(ReadN(s1, 5), "after") << "destroy consumed data of a cancelled recv";
}

TEST(MisuseDestroy, RightAfterCreateAndAfterSubmitOnly) {
  for (int i = 0; i < 3; ++i) {
    kloop_t *l = nullptr;
    ASSERT_EQ(kloop_create(nullptr, &l), 0);
    if (i > 0) {
      ASSERT_EQ(kloop_submit_nop(l, 1), 0);
    }
    if (i > 1) {
      ASSERT_EQ(kloop_submit_timeout(l, 2, 1000000), 0);
    }
    EXPECT_EQ(kloop_destroy(l), 0);
  }
}

TEST(MisuseThreads, CreatedInOneThreadPolledInAnother) {
  // "the loop belongs to the thread that polls it" (kloop_create).
  kloop_t *l = nullptr;
  ASSERT_EQ(kloop_create(nullptr, &l), 0);
  std::thread th([&] {
    EXPECT_EQ(kloop_submit_nop(l, 1), 0);
    kloop_completion c{};
    EXPECT_EQ(kloop_poll(l, &c, 1, 1000 * kMs), 1);
    EXPECT_EQ(c.token, 1u);
    EXPECT_EQ(kloop_destroy(l), 0);
  });
  th.join();
}

TEST(MisuseThreads, NoDeferTaskrunAllowsUseFromThreadsInTurn) {
  kloop_config cfg = DefaultConfig();
  cfg.flags = KLOOP_CONFIG_NO_DEFER_TASKRUN;
  kloop_t *l = nullptr;
  ASSERT_EQ(kloop_create(&cfg, &l), 0);
  EXPECT_EQ(GetCaps(l).enabled & KLOOP_CAP_DEFER_TASKRUN, 0u);
  for (uint64_t t = 0; t < 4; ++t) {
    std::thread th([&] {
      EXPECT_EQ(kloop_submit_nop(l, t), 0);
      kloop_completion c{};
      EXPECT_EQ(kloop_poll(l, &c, 1, 1000 * kMs), 1) << "thread " << t;
      EXPECT_EQ(c.token, t);
    });
    th.join();
  }
  EXPECT_EQ(kloop_destroy(l), 0);
}

// Use after fork: the child must get -EBADFD from every call but destroy.
TEST(MisuseFork, ChildGetsEbadfd) {
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  auto [s, peer] = UnixPair();
  char rbuf[16] = {};
  ASSERT_EQ(kloop_submit_recv(d, 77, s, rbuf, sizeof rbuf, 0), 0);
  auto [ss, speer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 78, ss, 0), 0);
  EXPECT_EQ(d.Poll(0), 0);
  auto [rep_r, rep_w] = Pipe();
  CallArgs args;
  pid_t pid = ::fork();
  if (pid == 0) {
    // The child: report wrong answers through the pipe; no gtest here.
    std::string report;
    for (const Call &c : AllCalls(args)) {
      int64_t rc = c.fn(d.loop());
      if (rc != -EBADFD) report += std::string(c.name) + "=" + std::to_string(rc) + " ";
    }
    // The parent's tokens are not reachable from the child either.
    if (kloop_cancel(d.loop(), 77) != -EBADFD) report += "cancel(77) ";
    if (kloop_stream_write(d.loop(), 78, "x", 1) != -EBADFD) report += "stream_write(78) ";
    int rc = kloop_destroy(d.loop());
    if (rc != 0) report += "destroy=" + std::to_string(rc) + " ";
    report += "END";
    (void)!::write(rep_w, report.data(), report.size());
    ::_exit(0);
  }
  ASSERT_GT(pid, 0);
  rep_w.reset();
  std::string report = ReadToEof(rep_r, 10s);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child crashed: status " << status;
  EXPECT_EQ(report, "END") << "calls in the child that did not answer -EBADFD";
  // The parent's loop is unharmed: its pending recv and stream still work.
  ASSERT_TRUE(WriteAll(peer, "parent"));
  Event e = d.WaitFinal(77);
  EXPECT_EQ(e.result, 6);
  EXPECT_EQ(std::string(rbuf, 6), "parent");
  ASSERT_TRUE(WriteAll(speer, "s"));
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(78) == "s"; }));
  EXPECT_TRUE(FdOpen(ss)) << "the child's destroy closed a parent fd";
  ASSERT_EQ(kloop_stream_close(d, 78), 0);
  d.WaitFinal(78);
}

}  // namespace
