// kloop_poll(): timeouts, signals, partial harvesting and CQ overflow.
#include <pthread.h>

#include <array>
#include <atomic>
#include <set>
#include <thread>

#include "common.h"

using namespace kt;

namespace {

class PollCall : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(d.Create(nullptr), 0); }
  Driver d;
};

TEST_F(PollCall, TimeoutZeroReturnsAtOnce) {
  kloop_completion c[8];
  auto t0 = Clock::now();
  EXPECT_EQ(kloop_poll(d, c, 8, 0), 0);
  EXPECT_LT(Clock::now() - t0, 50ms);
}

TEST_F(PollCall, TimeoutZeroStillSubmitsAndReaps) {
  ASSERT_EQ(kloop_submit_nop(d, 1), 0);
  // A nop completes inline: the first non-waiting poll may already return it.
  ASSERT_TRUE(d.RunUntil([&] { return d.HasFinal(1); }, 1s));
}

TEST_F(PollCall, TimeoutIsHonoured) {
  kloop_completion c[8];
  for (int64_t ms : {1, 30, 80}) {
    auto t0 = Clock::now();
    EXPECT_EQ(kloop_poll(d, c, 8, ms * kMs), 0);
    auto dt = Clock::now() - t0;
    EXPECT_GE(dt, std::chrono::milliseconds(ms) - 1ms) << ms << " ms";
    EXPECT_LT(dt, std::chrono::milliseconds(ms) + 500ms) << ms << " ms";
  }
}

TEST_F(PollCall, TimeoutDoesNotProduceRecords) {
  kloop_completion c[8];
  EXPECT_EQ(kloop_poll(d, c, 8, 5 * kMs), 0);
  ASSERT_EQ(kloop_submit_timeout(d, 77, 1000 * kMs), 0);
  // Its own wait timeout must not be confused with the user's timeout.
  EXPECT_EQ(kloop_poll(d, c, 8, 5 * kMs), 0);
  ASSERT_EQ(kloop_cancel(d, 77), 0);
  EXPECT_EQ(d.WaitFinal(77).result, -ECANCELED);
}

TEST_F(PollCall, ReturnsEarlyWhenACompletionArrives) {
  auto [a, b] = UnixPair();
  char buf[4];
  ASSERT_EQ(kloop_submit_recv(d, 1, a, buf, sizeof buf, 0), 0);
  std::thread t([fd = b.get()] {
    std::this_thread::sleep_for(30ms);
    WriteAll(fd, "x");
  });
  kloop_completion c[4];
  auto t0 = Clock::now();
  int n = kloop_poll(d, c, 4, 5000 * kMs);
  t.join();
  EXPECT_EQ(n, 1);
  EXPECT_LT(Clock::now() - t0, 2s);
}

// A signal ends a wait during which sends complete: those completions
// carry no record, and a wait that submitted the next send reports the
// count it submitted, not -EINTR, so the poll must not simply wait again
// after them (it returns 0, and the caller checks its signals). A signal
// that lands between two waits is only seen at the next one, as with any
// wait; the signaller repeats until the poll returns.
TEST_F(PollCall, SignalEndsAWaitWhileSendsComplete) {
  SignalGuard g(SIGUSR1);
  int before = SignalGuard::hits;
  std::pair<Fd, Fd> pair = UnixPair();
  Fd &peer = pair.second;
  ShrinkBuffers(pair.first.get(), peer.get());
  ASSERT_EQ(kloop_stream_attach(d, 1, pair.first.release(), KLOOP_STREAM_CLOSE_FD), 0);
  std::string big = Pattern(3, 4 << 20);
  ASSERT_GE(kloop_stream_write(d, 1, big.data(), big.size()), 0);
  std::atomic<bool> stop{false};
  std::thread reader([fd = peer.get(), &stop] {  // drains slowly: one send after another
    char buf[1024];
    while (!stop) {
      if (::recv(fd, buf, sizeof buf, MSG_DONTWAIT) < 0 && errno != EAGAIN) return;
      std::this_thread::sleep_for(500us);  // about 2 MB/s: 2 s for the 4 MiB
    }
  });
  std::thread signaller([self = ::pthread_self(), &stop] {
    std::this_thread::sleep_for(40ms);
    for (int i = 0; i < 40 && !stop; ++i) {
      ::pthread_kill(self, SIGUSR1);
      std::this_thread::sleep_for(50ms);
    }
  });
  kloop_completion c[4];
  auto t0 = Clock::now();
  int n = 0;
  // No records come: the queue stays far above its low mark.
  do {
    n = kloop_poll(d, c, 4, -1);
  } while (n == 0 && SignalGuard::hits == before);
  auto dt = Clock::now() - t0;
  stop = true;
  signaller.join();
  reader.join();
  EXPECT_TRUE(n == -EINTR || n == 0)
      << n << (n > 0 ? " records, the first event " : "") << (n > 0 ? c[0].event : 0);
  EXPECT_GT(SignalGuard::hits, before);
  EXPECT_LT(dt, 1s);
}

void SignalAfter(pthread_t target, std::chrono::milliseconds ms) {
  std::this_thread::sleep_for(ms);
  ::pthread_kill(target, SIGUSR1);
}

TEST_F(PollCall, SignalGivesEintrInfiniteWait) {
  SignalGuard g(SIGUSR1);
  int before = SignalGuard::hits;
  std::thread t(SignalAfter, ::pthread_self(), 40ms);
  kloop_completion c[4];
  int n = kloop_poll(d, c, 4, -1);
  t.join();
  EXPECT_EQ(n, -EINTR);
  EXPECT_EQ(SignalGuard::hits, before + 1);
  // The loop keeps working.
  ASSERT_EQ(kloop_submit_nop(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
}

TEST_F(PollCall, SignalGivesEintrTimedWait) {
  SignalGuard g(SIGUSR1);
  std::thread t(SignalAfter, ::pthread_self(), 40ms);
  kloop_completion c[4];
  auto t0 = Clock::now();
  int n = kloop_poll(d, c, 4, 3000 * kMs);
  t.join();
  EXPECT_EQ(n, -EINTR);
  EXPECT_LT(Clock::now() - t0, 2s);
}

TEST_F(PollCall, SignalDoesNotLoseCompletions) {
  SignalGuard g(SIGUSR1);
  ASSERT_EQ(kloop_submit_timeout(d, 5, 60 * kMs), 0);
  std::thread t(SignalAfter, ::pthread_self(), 20ms);
  kloop_completion c[4];
  int n = kloop_poll(d, c, 4, -1);
  t.join();
  EXPECT_TRUE(n == -EINTR || n == 1) << n;
  if (n == -EINTR) {
    EXPECT_EQ(d.WaitFinal(5).result, 0);
  }
}

TEST_F(PollCall, ArgumentErrors) {
  kloop_completion c[1];
  EXPECT_EQ(kloop_poll(d, nullptr, 4, 0), -EINVAL);
  EXPECT_EQ(kloop_poll(d, c, 0, 0), -EINVAL);
  EXPECT_EQ(kloop_poll(nullptr, c, 1, 0), -EBADF);
}

TEST_F(PollCall, MaxSmallerThanReadyKeepsTheRest) {
  for (uint64_t t = 0; t < 10; ++t) ASSERT_EQ(kloop_submit_nop(d, 1000 + t), 0);
  std::multiset<uint64_t> got;
  kloop_completion c[3];
  auto end = Clock::now() + kDeadline;
  while (got.size() < 10 && Clock::now() < end) {
    int n = kloop_poll(d, c, 3, 10 * kMs);
    ASSERT_GE(n, 0);
    ASSERT_LE(n, 3);
    for (int i = 0; i < n; ++i) got.insert(c[i].token);
  }
  ASSERT_EQ(got.size(), 10u);
  for (uint64_t t = 0; t < 10; ++t) EXPECT_EQ(got.count(1000 + t), 1u) << t;
  EXPECT_EQ(kloop_poll(d, c, 3, 10 * kMs), 0);
}

TEST_F(PollCall, TokensOfRecordsNotYetReturnedStayTaken) {
  // Found by fuzz_ops: a token whose final record waits in the engine
  // (kloop_poll's max was too small) must not be reusable yet.
  auto [a, b] = UnixPair();
  Addr bogus = Loopback(AF_INET, 9);  // sendmsg with an address on a connected Unix stream fails
  for (uint64_t t = 1; t <= 4; ++t) ASSERT_EQ(kloop_submit_nop(d, t), 0);
  ASSERT_EQ(kloop_submit_sendmsg(d, 5, a, "x", 1, bogus.sa(), bogus.len, 0), 0);
  char buf[4];
  ASSERT_EQ(kloop_submit_recv(d, 6, b, buf, sizeof buf, 0), 0);
  ASSERT_TRUE(WriteAll(a, "y"));
  std::this_thread::sleep_for(10ms);
  kloop_completion c{};
  ASSERT_EQ(kloop_poll(d, &c, 1, 100 * kMs), 1);
  std::set<uint64_t> returned{c.token};
  for (uint64_t t = 1; t <= 6; ++t) {
    if (returned.count(t)) continue;
    EXPECT_EQ(kloop_submit_nop(d, t), -EEXIST)
        << "token " << t << " reusable before its record was returned";
  }
  // Harvest the rest: every token exactly once.
  std::multiset<uint64_t> all{c.token};
  auto end = Clock::now() + kDeadline;
  while (all.size() < 6 && Clock::now() < end) {
    int n = kloop_poll(d, &c, 1, 10 * kMs);
    ASSERT_GE(n, 0);
    if (n == 1) all.insert(c.token);
  }
  for (uint64_t t = 1; t <= 6; ++t) EXPECT_EQ(all.count(t), 1u) << t;
}

TEST_F(PollCall, MaxOneHarvestsOneByOne) {
  for (uint64_t t = 0; t < 5; ++t) ASSERT_EQ(kloop_submit_nop(d, t), 0);
  kloop_completion c{};
  int total = 0;
  for (int i = 0; i < 50 && total < 5; ++i) {
    int n = kloop_poll(d, &c, 1, 10 * kMs);
    ASSERT_GE(n, 0);
    ASSERT_LE(n, 1);
    total += n;
  }
  EXPECT_EQ(total, 5);
}

// CQ overflow loses nothing: a ring far smaller than the burst.
class PollOverflow : public ::testing::TestWithParam<std::pair<uint32_t, uint32_t>> {};

TEST_P(PollOverflow, ThousandNopsComeBackExactlyOnce) {
  kloop_config cfg = DefaultConfig();
  cfg.sq_entries = GetParam().first;
  cfg.cq_entries = GetParam().second;
  Driver d(&cfg);
  ASSERT_EQ(d.create_rc(), 0) << kloop_strerror(d.create_rc());
  constexpr uint64_t kN = 1000;
  for (uint64_t t = 0; t < kN; ++t) ASSERT_EQ(kloop_submit_nop(d, t), 0) << "token " << t;
  std::vector<int> seen(kN, 0);
  size_t total = 0;
  kloop_completion c[7];
  auto end = Clock::now() + kDeadline;
  while (total < kN && Clock::now() < end) {
    int n = kloop_poll(d, c, 7, 10 * kMs);
    ASSERT_GE(n, 0) << kloop_strerror(n);
    for (int i = 0; i < n; ++i) {
      ASSERT_LT(c[i].token, kN);
      EXPECT_EQ(c[i].result, 0);
      EXPECT_EQ(c[i].flags, 0u);
      seen[c[i].token]++;
      total++;
    }
  }
  EXPECT_EQ(total, kN);
  for (uint64_t t = 0; t < kN; ++t) EXPECT_EQ(seen[t], 1) << "token " << t;
  EXPECT_EQ(kloop_poll(d, c, 7, 10 * kMs), 0);
}

TEST_P(PollOverflow, ManyRecvCompletionsAtOnce) {
  // Real I/O completions overflowing the CQ: 200 recvs on 200 sockets,
  // all made ready before the engine reaps anything.
  kloop_config cfg = DefaultConfig();
  cfg.sq_entries = GetParam().first;
  cfg.cq_entries = GetParam().second;
  Driver d(&cfg);
  ASSERT_EQ(d.create_rc(), 0);
  constexpr int kN = 200;
  std::vector<std::pair<Fd, Fd>> pairs;
  std::vector<std::array<char, 8>> bufs(kN);
  for (int i = 0; i < kN; ++i) {
    pairs.push_back(UnixPair());
    ASSERT_EQ(kloop_submit_recv(d, i, pairs.back().first, bufs[i].data(), 8, 0), 0);
  }
  ASSERT_GE(d.Poll(0), 0);  // submit them
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(WriteAll(pairs[i].second, "v"));
  std::this_thread::sleep_for(20ms);
  ASSERT_TRUE(d.RunUntil([&] { return d.events().size() >= static_cast<size_t>(kN); }));
  for (int i = 0; i < kN; ++i) {
    ASSERT_EQ(d.FinalCount(i), 1) << "token " << i;
    EXPECT_EQ(d.Of(i)[0].result, 1);
    EXPECT_EQ(bufs[i][0], 'v');
  }
}

INSTANTIATE_TEST_SUITE_P(Rings, PollOverflow,
                         ::testing::Values(std::make_pair(1u, 1u), std::make_pair(2u, 2u),
                                           std::make_pair(4u, 8u)),
                         [](const auto &info) {
                           return "sq" + std::to_string(info.param.first) + "cq" +
                                  std::to_string(info.param.second);
                         });

TEST(PollOverflowStats, OverflowIsCountedOrAvoided) {
  kloop_config cfg = DefaultConfig();
  cfg.sq_entries = 2;
  cfg.cq_entries = 2;
  Driver d(&cfg);
  ASSERT_EQ(d.create_rc(), 0);
  for (uint64_t t = 0; t < 100; ++t) ASSERT_EQ(kloop_submit_nop(d, t), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.events().size() == 100; }));
  kloop_stats s = GetStats(d);
  EXPECT_EQ(s.completions, 100u);
  EXPECT_GE(s.cqes, 100u);
  EXPECT_EQ(s.ops_in_flight, 0u);
}

}  // namespace
