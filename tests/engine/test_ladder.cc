// Feature ladder: every fallback path, forced with config.disable, must
// behave exactly like the fast path. Each scenario runs once per rung.
#include <pthread.h>
#include <sys/wait.h>

#include <thread>

#include "common.h"

using namespace kt;

namespace {

struct Rung {
  const char *name;
  uint64_t disable;
  uint32_t flags;
};

constexpr uint64_t kLadderCaps = KLOOP_CAP_MULTISHOT_RECV | KLOOP_CAP_BUF_RING |
                                 KLOOP_CAP_DEFER_TASKRUN | KLOOP_CAP_SINGLE_ISSUER |
                                 KLOOP_CAP_WAITID | KLOOP_CAP_MULTISHOT_ACCEPT |
                                 KLOOP_CAP_MULTISHOT_POLL | KLOOP_CAP_EXT_ARG;

const Rung kRungs[] = {
    {"Full", 0, 0},
    {"NoMultishotRecv", KLOOP_CAP_MULTISHOT_RECV, 0},
    {"NoBufRing", KLOOP_CAP_BUF_RING, 0},
    {"NoDeferTaskrun", KLOOP_CAP_DEFER_TASKRUN, 0},
    {"NoSingleIssuer", KLOOP_CAP_SINGLE_ISSUER, 0},
    {"NoWaitid", KLOOP_CAP_WAITID, 0},
    {"NoMultishotAccept", KLOOP_CAP_MULTISHOT_ACCEPT, 0},
    {"NoMultishotPoll", KLOOP_CAP_MULTISHOT_POLL, 0},
    {"NoExtArg", KLOOP_CAP_EXT_ARG, 0},
    {"NoBundleNoInc", KLOOP_CAP_RECV_BUNDLE | KLOOP_CAP_BUF_RING_INC, 0},
    {"ConfigNoDeferTaskrun", 0, KLOOP_CONFIG_NO_DEFER_TASKRUN},
    {"AllOff", kLadderCaps | KLOOP_CAP_RECV_BUNDLE | KLOOP_CAP_BUF_RING_INC, 0},
};

class Ladder : public ::testing::TestWithParam<Rung> {
 protected:
  void SetUp() override {
    kloop_config cfg = DefaultConfig();
    cfg.disable = GetParam().disable;
    cfg.flags = GetParam().flags;
    ASSERT_EQ(d.Create(&cfg), 0) << kloop_strerror(d.create_rc());
    caps = GetCaps(d);
  }
  Driver d;
  kloop_caps caps{};
};

TEST_P(Ladder, CapsLackTheDisabledBits) {
  uint64_t off = GetParam().disable;
  EXPECT_EQ(caps.enabled & off, 0u) << std::hex << caps.enabled;
  EXPECT_EQ(caps.enabled & ~caps.kernel, 0u) << "enabled a capability the kernel lacks";
  // The kernel has the fast path, so the test really exercises a fallback.
  EXPECT_EQ(caps.kernel & off, off) << "the kernel lacks what this rung disables";
  // Only the disabled bits and what kloop.h says depends on them are missing.
  EXPECT_EQ(caps.enabled, ExpectedEnabled(caps.kernel, off, GetParam().flags))
      << std::hex << "kernel " << caps.kernel << " enabled " << caps.enabled;
}

TEST_P(Ladder, StreamEchoPauseEofClose) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_TRUE(WriteAll(peer, "ping"));
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1).size() >= 4; }));
  EXPECT_EQ(d.DataOf(1), "ping");
  ASSERT_GE(kloop_stream_write(d, 1, "pong", 4), 0);
  ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) == 0; }));
  EXPECT_EQ(ReadN(peer, 4), "pong");
  // Pause, peer sends, nothing is delivered; resume, all of it arrives.
  ASSERT_EQ(kloop_stream_pause(d, 1), 0);
  std::string more = Pattern(0, 150000);
  std::thread w([&, fd = peer.get()] { WriteAll(fd, more); });
  d.Drain(40ms);
  EXPECT_EQ(d.DataSizeOf(1), 4u) << "DATA while paused";
  ASSERT_EQ(kloop_stream_resume(d, 1), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) >= 4 + more.size(); }));
  w.join();
  EXPECT_TRUE(d.DataOf(1) == "ping" + more);
  ::shutdown(peer, SHUT_WR);
  EXPECT_EQ(d.WaitEvent(1, KLOOP_EVENT_EOF).result, 0);
  ASSERT_EQ(kloop_stream_shutdown(d, 1), 0);
  EXPECT_EQ(d.WaitEvent(1, KLOOP_EVENT_WRITE_DONE).result, 0);
  EXPECT_EQ(ReadToEof(peer, 1s), "");
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
}

TEST_P(Ladder, StreamInflowWithFewBuffers) {
  kloop_config cfg = DefaultConfig();
  cfg.disable = GetParam().disable;
  cfg.flags = GetParam().flags;
  cfg.buf_count = 2;
  cfg.buf_size = 512;
  Driver d2(&cfg);
  ASSERT_EQ(d2.create_rc(), 0);
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d2, 1, s, 0), 0);
  constexpr size_t kSize = 300000;
  std::string data = Pattern(7, kSize);
  std::thread w([&, fd = peer.get()] { WriteAll(fd, data); });
  ASSERT_TRUE(d2.RunUntil([&] { return d2.DataSizeOf(1) >= kSize; }, 20s));
  w.join();
  EXPECT_TRUE(d2.DataOf(1) == data);
  EXPECT_TRUE(d2.Of(1, KLOOP_EVENT_ERROR).empty());
  ASSERT_EQ(kloop_stream_abort(d2, 1), 0);
  EXPECT_EQ(d2.WaitFinal(1).result, -ECANCELED);
}

TEST_P(Ladder, StreamWriteToSlowReader) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  constexpr size_t kSize = 1 << 20;
  std::string data = Pattern(3, kSize);
  ASSERT_GT(kloop_stream_write(d, 1, data.data(), data.size()), 65536);
  std::string got;
  std::thread r([&, fd = peer.get()] { got = ReadN(fd, kSize, 20s); });
  EXPECT_EQ(d.WaitEvent(1, KLOOP_EVENT_WRITE_LOW, 20s).event, KLOOP_EVENT_WRITE_LOW);
  ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) == 0; }, 20s));
  r.join();
  EXPECT_TRUE(got == data);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
}

TEST_P(Ladder, AcceptOneShotAndMultishot) {
  Addr la;
  Fd l = TcpListener(AF_INET, &la);
  ASSERT_EQ(kloop_submit_accept(d, 1, l, 0), 0);
  Fd c0(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c0, la.sa(), la.len), 0);
  Event e = d.WaitFinal(1);
  ASSERT_GE(e.result, 0);
  Fd a0(e.result);
  EXPECT_EQ(e.aux, LocalAddr(c0).len);

  ASSERT_EQ(kloop_submit_accept(d, 2, l, KLOOP_OP_MULTISHOT), 0);
  std::vector<Fd> cs, as;
  for (int i = 0; i < 4; ++i) {
    cs.emplace_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(cs.back(), la.sa(), la.len), 0);
  }
  ASSERT_TRUE(d.RunUntil([&] { return d.Of(2).size() >= 4; }));
  for (const Event &x : d.Of(2)) {
    EXPECT_TRUE(x.more());
    ASSERT_GE(x.result, 0);
    as.emplace_back(x.result);
  }
  ASSERT_EQ(kloop_cancel(d, 2), 0);
  Event fin = d.WaitFinal(2);
  EXPECT_EQ(fin.result, -ECANCELED);
  d.Drain(10ms);
  EXPECT_EQ(d.FinalCount(2), 1);
  EXPECT_EQ(as.size(), 4u);
}

TEST_P(Ladder, PollOneShotAndMultishot) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_poll(d, 1, r, POLLIN, 0), 0);
  d.Drain(10ms);
  EXPECT_FALSE(d.HasFinal(1));
  ASSERT_TRUE(WriteAll(w, "x"));
  EXPECT_TRUE(d.WaitFinal(1).result & POLLIN);
  ReadAvailable(r);

  ASSERT_EQ(kloop_submit_poll(d, 2, r, POLLIN, KLOOP_OP_MULTISHOT), 0);
  d.Drain(10ms);
  EXPECT_TRUE(d.Of(2).empty()) << "multishot poll fired on an empty pipe";
  ASSERT_TRUE(WriteAll(w, "a"));
  ASSERT_TRUE(d.RunUntil([&] { return !d.Of(2).empty(); }));
  size_t n = d.Of(2).size();
  ASSERT_TRUE(WriteAll(w, "b"));
  ASSERT_TRUE(d.RunUntil([&] { return d.Of(2).size() > n; }));
  // Reading everything makes it quiet again (after what was in flight).
  ReadAvailable(r);
  d.Drain(20ms);
  size_t quiet = d.Of(2).size();
  d.Drain(30ms);
  EXPECT_EQ(d.Of(2).size(), quiet) << "multishot poll keeps firing on an empty pipe";
  for (const Event &x : d.Of(2)) EXPECT_TRUE(x.more());
  ASSERT_EQ(kloop_cancel(d, 2), 0);
  EXPECT_EQ(d.WaitFinal(2).result, -ECANCELED);
}

TEST_P(Ladder, ChildExit) {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(7);
  ASSERT_EQ(kloop_submit_child_exit(d, 1, pid), 0);
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(WIFEXITED(e.result));
  EXPECT_EQ(WEXITSTATUS(e.result), 7);
  errno = 0;
  EXPECT_EQ(::waitpid(pid, nullptr, WNOHANG), -1);

  pid = ::fork();
  if (pid == 0) {
    for (;;) ::pause();
  }
  ASSERT_EQ(kloop_submit_child_exit(d, 2, pid), 0);
  d.Drain(10ms);
  EXPECT_FALSE(d.HasFinal(2));
  ::kill(pid, SIGTERM);
  e = d.WaitFinal(2);
  EXPECT_TRUE(WIFSIGNALED(e.result));
  EXPECT_EQ(WTERMSIG(e.result), SIGTERM);
}

TEST_P(Ladder, PollTimeoutSignalAndWake) {
  kloop_completion c[4];
  auto t0 = Clock::now();
  EXPECT_EQ(kloop_poll(d, c, 4, 40 * kMs), 0);
  auto dt = Clock::now() - t0;
  EXPECT_GE(dt, 39ms);
  EXPECT_LT(dt, 1s);
  // A pending operation must not make the timed wait return early or late.
  ASSERT_EQ(kloop_submit_timeout(d, 9, 10'000 * kMs), 0);
  t0 = Clock::now();
  EXPECT_EQ(kloop_poll(d, c, 4, 30 * kMs), 0);
  dt = Clock::now() - t0;
  EXPECT_GE(dt, 29ms);
  EXPECT_LT(dt, 1s);

  SignalGuard g(SIGUSR1);
  std::thread sig([t = ::pthread_self()] {
    std::this_thread::sleep_for(30ms);
    ::pthread_kill(t, SIGUSR1);
  });
  EXPECT_EQ(kloop_poll(d, c, 4, 3000 * kMs), -EINTR);
  sig.join();

  std::thread waker([l = d.loop()] {
    std::this_thread::sleep_for(30ms);
    kloop_wake(l);
  });
  t0 = Clock::now();
  int n = kloop_poll(d, c, 4, 3000 * kMs);
  waker.join();
  EXPECT_EQ(n, 0);
  EXPECT_LT(Clock::now() - t0, 2s) << "wake did not end the wait";
  ASSERT_EQ(kloop_cancel(d, 9), 0);
  EXPECT_EQ(d.WaitFinal(9).result, -ECANCELED);
}

TEST_P(Ladder, RecvSendAndOverflow) {
  auto [a, b] = UnixPair();
  char buf[16] = {};
  ASSERT_EQ(kloop_submit_recv(d, 1, a, buf, sizeof buf, 0), 0);
  ASSERT_EQ(kloop_submit_send(d, 2, b, "ladder", 6, 0), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 6);
  EXPECT_EQ(d.WaitFinal(1).result, 6);
  EXPECT_EQ(std::string(buf, 6), "ladder");

  kloop_config cfg = DefaultConfig();
  cfg.disable = GetParam().disable;
  cfg.flags = GetParam().flags;
  cfg.sq_entries = 2;
  cfg.cq_entries = 2;
  Driver small(&cfg);
  ASSERT_EQ(small.create_rc(), 0);
  for (uint64_t t = 0; t < 300; ++t) ASSERT_EQ(kloop_submit_nop(small, t), 0);
  ASSERT_TRUE(small.RunUntil([&] { return small.events().size() >= 300; }));
  for (uint64_t t = 0; t < 300; ++t) EXPECT_EQ(small.FinalCount(t), 1) << t;
}

INSTANTIATE_TEST_SUITE_P(Rungs, Ladder, ::testing::ValuesIn(kRungs),
                         [](const auto &info) { return std::string(info.param.name); });

}  // namespace
