// Engine-owned streams: reading into engine buffers, the write queue with
// flow control, shutdown, graceful close and abort.
#include <sys/socket.h>

#include <atomic>
#include <set>
#include <thread>

#include "common.h"

using namespace kt;

namespace {

class Streams : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(d.Create(nullptr), 0); }

  // Index in d.events() of the first record of token with this event, or -1.
  int IndexOf(uint64_t token, uint32_t event) const {
    const auto &ev = d.events();
    for (size_t i = 0; i < ev.size(); ++i)
      if (ev[i].token == token && ev[i].event == event) return static_cast<int>(i);
    return -1;
  }
  int LastIndexOf(uint64_t token, uint32_t event) const {
    const auto &ev = d.events();
    for (size_t i = ev.size(); i-- > 0;)
      if (ev[i].token == token && ev[i].event == event) return static_cast<int>(i);
    return -1;
  }
  bool Flush(uint64_t token) {
    return d.RunUntil([&] { return kloop_stream_write_size(d, token) == 0; });
  }

  Driver d;
};

// A peer that reads everything from fd in a thread, slowly if asked, and
// checks the pattern as it goes.
class PatternReader {
 public:
  PatternReader(int fd, uint64_t expect, size_t chunk = 65536,
                std::chrono::microseconds pause = 0us, size_t pause_every = 1u << 20)
      : th_([=, this] {
          std::vector<char> buf(chunk);
          size_t since = 0;
          auto end = Clock::now() + 30s;
          while (Clock::now() < end) {
            if (!WaitReadable(fd, 1s)) continue;
            ssize_t n = ::read(fd, buf.data(), buf.size());
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (n <= 0) {
              eof_ = n == 0;
              break;
            }
            for (ssize_t i = 0; i < n; ++i)
              if (static_cast<uint8_t>(buf[i]) != PatternByte(got_ + i) && mismatch_ < 0)
                mismatch_ = static_cast<int64_t>(got_ + i);
            got_ += static_cast<uint64_t>(n);
            since += static_cast<size_t>(n);
            if (pause.count() > 0 && since >= pause_every) {
              since = 0;
              std::this_thread::sleep_for(pause);
            }
            if (stop_at_expect_ && got_ >= expect) break;
          }
        }) {}
  ~PatternReader() { Join(); }
  void Join() {
    if (th_.joinable()) th_.join();
  }
  uint64_t got() const { return got_; }
  bool eof() const { return eof_; }
  int64_t mismatch() const { return mismatch_; }
  // By default read until EOF; call before the data completes to stop at
  // the expected size instead.
  void StopAtExpected() { stop_at_expect_ = true; }

 private:
  std::atomic<uint64_t> got_{0};
  std::atomic<bool> eof_{false};
  std::atomic<int64_t> mismatch_{-1};
  std::atomic<bool> stop_at_expect_{false};
  std::thread th_;
};

TEST_F(Streams, DataArrivesWithMoreFlagInsideArena) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_TRUE(WriteAll(peer, "hello world"));
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1).size() >= 11; }));
  EXPECT_EQ(d.DataOf(1), "hello world");
  uint64_t base = 0, size = 0;
  ASSERT_EQ(kloop_buffer_arena(d, &base, &size), 0);
  for (const Event &e : d.Of(1, KLOOP_EVENT_DATA)) {
    EXPECT_TRUE(e.more());
    EXPECT_GT(e.result, 0);
    EXPECT_GE(e.data, base);
    EXPECT_LE(e.data + static_cast<uint64_t>(e.result), base + size);
  }
  EXPECT_EQ(GetStats(d).streams, 1u);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
  EXPECT_FALSE(c.more());
  EXPECT_EQ(GetStats(d).streams, 0u);
  EXPECT_TRUE(FdOpen(s)) << "closed an fd attached without KLOOP_STREAM_CLOSE_FD";
}

TEST_F(Streams, DataStaysValidUntilNextPoll) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  std::string first(1000, 'A');
  ASSERT_TRUE(WriteAll(peer, first));
  kloop_completion c[16];
  const char *p = nullptr;
  size_t n = 0;
  auto end = Clock::now() + kDeadline;
  while (!p && Clock::now() < end) {
    int r = kloop_poll(d, c, 16, 50 * kMs);
    ASSERT_GE(r, 0);
    for (int i = 0; i < r; ++i)
      if (c[i].event == KLOOP_EVENT_DATA && c[i].token == 1) {
        p = reinterpret_cast<const char *>(c[i].data);
        n = static_cast<size_t>(c[i].result);
        break;
      }
  }
  ASSERT_NE(p, nullptr);
  std::string copy(p, n);
  // The kernel keeps receiving into other buffers meanwhile.
  ASSERT_TRUE(WriteAll(peer, std::string(100000, 'B')));
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(std::string(p, n), copy) << "DATA buffer was reused before the next poll";
  // Everything still arrives afterwards.
  d.set_store_data(false);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) + n >= 101000; }));
}

TEST_F(Streams, LargeInflowWithFewSmallBuffers) {
  kloop_config cfg = DefaultConfig();
  cfg.buf_count = 4;
  cfg.buf_size = 1024;
  Driver d2(&cfg);
  ASSERT_EQ(d2.create_rc(), 0);
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d2, 1, s, 0), 0);
  constexpr size_t kSize = 2 << 20;
  std::string data = Pattern(0, kSize);
  std::thread w([&, fd = peer.get()] { WriteAll(fd, data); });
  ASSERT_TRUE(d2.RunUntil([&] { return d2.DataSizeOf(1) >= kSize; }, 20s));
  w.join();
  EXPECT_EQ(d2.DataSizeOf(1), kSize);
  EXPECT_TRUE(d2.DataOf(1) == data) << "bytes differ or are out of order";
  for (const Event &e : d2.Of(1, KLOOP_EVENT_DATA)) EXPECT_LE(e.result, 1024);
  EXPECT_TRUE(d2.Of(1, KLOOP_EVENT_ERROR).empty()) << "running out of buffers must not be an error";
  EXPECT_EQ(kloop_stream_close(d2, 1), 0);
  EXPECT_EQ(d2.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
}

// A message larger than one receive buffer arrives as a run of DATA records;
// DATA_NEXT marks every record whose successor in the same poll array is
// more data of the same stream, so a binding can join the run.
TEST_F(Streams, DataNextMarksRunsOfOneStreamWithinOnePollArray) {
  kloop_config cfg = DefaultConfig();
  cfg.buf_size = 1024;
  cfg.buf_count = 64;
  Driver d2(&cfg);
  ASSERT_EQ(d2.create_rc(), 0);
  auto [a, peer_a] = UnixPair();
  auto [b, peer_b] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d2, 1, a, 0), 0);
  ASSERT_EQ(kloop_stream_attach(d2, 2, b, 0), 0);
  kloop_completion c[64];
  ASSERT_GE(kloop_poll(d2, c, 64, 0), 0);  // arms both receives
  const std::string msg_a = Pattern(0, 5000), msg_b = Pattern(7, 3000);
  // Both messages wait in their sockets before the next poll.
  ASSERT_TRUE(WriteAll(peer_a, msg_a));
  ASSERT_TRUE(WriteAll(peer_b, msg_b));
  std::string got[3];
  size_t flagged = 0, joined_max = 0;
  // Small arrays too: a run cut by the end of an array ends unflagged.
  for (uint32_t max : {64u, 3u}) {
    got[1].clear();
    got[2].clear();
    if (max == 3u) {
      ASSERT_TRUE(WriteAll(peer_a, msg_a));
      ASSERT_TRUE(WriteAll(peer_b, msg_b));
    }
    auto end = Clock::now() + kDeadline;
    while ((got[1].size() < msg_a.size() || got[2].size() < msg_b.size()) && Clock::now() < end) {
      int r = kloop_poll(d2, c, max, 50 * kMs);
      ASSERT_GE(r, 0);
      size_t run = 0;
      for (int i = 0; i < r; ++i) {
        bool next_same =
            i + 1 < r && c[i + 1].event == KLOOP_EVENT_DATA && c[i + 1].token == c[i].token;
        if (c[i].event != KLOOP_EVENT_DATA) {
          EXPECT_FALSE(c[i].flags & KLOOP_COMPLETION_DATA_NEXT) << "on event " << c[i].event;
          continue;
        }
        ASSERT_TRUE(c[i].token == 1 || c[i].token == 2);
        got[c[i].token].append(reinterpret_cast<const char *>(c[i].data),
                               static_cast<size_t>(c[i].result));
        EXPECT_EQ((c[i].flags & KLOOP_COMPLETION_DATA_NEXT) != 0, next_same)
            << "record " << i << " of " << r;
        EXPECT_TRUE(c[i].flags & KLOOP_COMPLETION_MORE);
        if (c[i].flags & KLOOP_COMPLETION_DATA_NEXT) {
          ++flagged;
          ++run;
        } else {
          joined_max = std::max(joined_max, run + 1);
          run = 0;
        }
      }
    }
    EXPECT_EQ(got[1], msg_a);
    EXPECT_EQ(got[2], msg_b);
  }
  // 5000 bytes in 1 KiB buffers, waiting before the poll: the kernel fills
  // several buffers in a row, and the flag joins them.
  EXPECT_GT(flagged, 0u);
  EXPECT_GE(joined_max, 3u);
  ASSERT_EQ(kloop_stream_close(d2, 1), 0);
  ASSERT_EQ(kloop_stream_close(d2, 2), 0);
  EXPECT_EQ(d2.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(d2.WaitFinal(2).event, KLOOP_EVENT_CLOSED);
}

// ---- the receive ring stays short (Engine::flush_recycled) ---------------

// Sends `rounds` messages of 1 KiB from `peer`, one at a time, each received
// by stream `token` of `d`: the distinct receive buffers their DATA records
// pointed into.
size_t DistinctReceiveBuffers(Driver &d, uint64_t token, int peer, int rounds) {
  std::set<uint64_t> seen;
  const std::string msg = Pattern(0, 1024);
  size_t got = 0;
  d.on_record = [&](const kloop_completion &c) {
    if (c.token == token && c.event == KLOOP_EVENT_DATA) {
      seen.insert(c.data);
      got += static_cast<size_t>(c.result);
    }
  };
  for (int i = 0; i < rounds; ++i) {
    EXPECT_TRUE(WriteAll(peer, msg));
    size_t want = got + msg.size();
    if (!d.RunUntil([&] { return got >= want; })) {
      ADD_FAILURE() << "message " << i << " did not arrive";
      break;
    }
  }
  d.on_record = nullptr;
  return seen.size();
}

// The ring holds about as many buffers as the load takes, filled with the
// ones returned last: a steady trickle reuses a few warm buffers instead of
// walking through all 256 (whose memory had gone cold by its turn).
TEST_F(Streams, SteadyReceivesReuseAFewBuffers) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  size_t distinct = DistinctReceiveBuffers(d, 1, peer, 300);
  EXPECT_LE(distinct, 32u) << "300 receives went through " << distinct << " buffers";
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  d.WaitFinal(1);
}

// A burst wider than the short ring: streams that ran out are served as the
// ring grows, nothing is lost; once the burst is over the ring is short
// again.
TEST_F(Streams, ReceiveRingGrowsForABurstAndShrinksAfterIt) {
  constexpr int kN = 64;
  std::vector<std::pair<Fd, Fd>> pairs;
  for (int i = 0; i < kN; ++i) {
    pairs.push_back(UnixPair());
    ASSERT_EQ(kloop_stream_attach(d, 100 + i, pairs[i].first, 0), 0);
  }
  d.Poll(0);  // the receives are armed
  kloop_stats before = GetStats(d);
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(WriteAll(pairs[i].second, Pattern(i, 3000)));
  ASSERT_TRUE(d.RunUntil([&] {
    for (int i = 0; i < kN; ++i)
      if (d.DataSizeOf(100 + i) < 3000) return false;
    return true;
  }));
  for (int i = 0; i < kN; ++i) EXPECT_TRUE(d.DataOf(100 + i) == Pattern(i, 3000)) << i;
  EXPECT_GT(GetStats(d).enobufs, before.enobufs) << "64 streams at once fit the short ring";
  // What the ring grew to is used up first; then a trickle again.
  DistinctReceiveBuffers(d, 100, pairs[0].second, 200);
  size_t distinct = DistinctReceiveBuffers(d, 100, pairs[0].second, 300);
  EXPECT_LE(distinct, 32u) << "the ring did not shrink after the burst";
  for (int i = 0; i < kN; ++i) ASSERT_EQ(kloop_stream_abort(d, 100 + i), 0);
  for (int i = 0; i < kN; ++i) d.WaitFinal(100 + i);
}

// An engine that waits after a burst gives the pages of the receive
// buffers it no longer needs back to the kernel, inside a wait that still
// lasts as long as the caller asked; the buffers given back receive again
// afterwards.
TEST_F(Streams, IdleEngineGivesBackReceiveBuffersOfABurst) {
  constexpr int kN = 128;
  std::vector<std::pair<Fd, Fd>> pairs;
  for (int i = 0; i < kN; ++i) {
    pairs.push_back(UnixPair());
    ASSERT_EQ(kloop_stream_attach(d, 100 + i, pairs[i].first, 0), 0);
  }
  d.Poll(0);
  std::set<uint64_t> burst;
  d.on_record = [&](const kloop_completion &c) {
    if (c.event == KLOOP_EVENT_DATA) burst.insert(c.data);
  };
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(WriteAll(pairs[i].second, Pattern(i, 3000)));
  ASSERT_TRUE(d.RunUntil([&] {
    for (int i = 0; i < kN; ++i)
      if (d.DataSizeOf(100 + i) < 3000) return false;
    return true;
  }));
  d.on_record = nullptr;
  for (int i = 0; i < kN; ++i) EXPECT_TRUE(d.DataOf(100 + i) == Pattern(i, 3000)) << i;
  ASSERT_GE(burst.size(), 64u) << "the burst did not take many buffers";
  EXPECT_GE(ResidentPages(burst), burst.size() - 8) << "the burst's buffers were not in memory";
  // A trickle uses up what the ring grew to: the rest waits in the engine.
  DistinctReceiveBuffers(d, 100, pairs[0].second, 300);
  d.Poll(0);
  kloop_stats before = GetStats(d);

  // Idle: one poll with a timeout, nothing arrives.
  auto start = Clock::now();
  kloop_completion recs[8];
  EXPECT_EQ(kloop_poll(d, recs, 8, 300'000'000), 0);
  EXPECT_GE(Clock::now() - start, 290ms) << "the wait ended before its time";
  kloop_stats after = GetStats(d);
  EXPECT_GE(after.buffers_released - before.buffers_released, burst.size() - 32)
      << "the idle engine kept its buffers";
  EXPECT_LE(ResidentPages(burst), 32u) << "their pages are still in memory";

  // Every buffer still receives, the ones given back too.
  for (int i = 0; i < kN; ++i) ASSERT_TRUE(WriteAll(pairs[i].second, Pattern(i + 1, 3000)));
  ASSERT_TRUE(d.RunUntil([&] {
    for (int i = 0; i < kN; ++i)
      if (d.DataSizeOf(100 + i) < 6000 + (i == 0 ? 300 * 1024 : 0)) return false;
    return true;
  }));
  for (int i = 1; i < kN; ++i)
    EXPECT_TRUE(d.DataOf(100 + i) == Pattern(i, 3000) + Pattern(i + 1, 3000)) << i;
  for (int i = 0; i < kN; ++i) ASSERT_EQ(kloop_stream_abort(d, 100 + i), 0);
  for (int i = 0; i < kN; ++i) d.WaitFinal(100 + i);
}

TEST_F(Streams, EofAfterData) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_TRUE(WriteAll(peer, "bye"));
  ::shutdown(peer, SHUT_WR);
  Event eof = d.WaitEvent(1, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.result, 0);
  EXPECT_TRUE(eof.more());
  EXPECT_EQ(d.DataOf(1), "bye");
  EXPECT_LT(LastIndexOf(1, KLOOP_EVENT_DATA), IndexOf(1, KLOOP_EVENT_EOF));
  d.Drain(20ms);
  EXPECT_EQ(d.Of(1, KLOOP_EVENT_EOF).size(), 1u);
  EXPECT_LT(LastIndexOf(1, KLOOP_EVENT_DATA), IndexOf(1, KLOOP_EVENT_EOF)) << "DATA after EOF";
  EXPECT_FALSE(d.HasFinal(1)) << "EOF must not end the stream";
  // Writing still works after the peer's EOF (half-close).
  EXPECT_GE(kloop_stream_write(d, 1, "ok", 2), 0);
  ASSERT_TRUE(Flush(1));
  EXPECT_EQ(ReadN(peer, 2), "ok");
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
}

TEST_F(Streams, ErrorOnReset) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  EXPECT_GE(d.Poll(0), 0);
  linger lg{1, 0};
  ASSERT_EQ(::setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
  peer.reset();  // RST
  Event err = d.WaitEvent(1, KLOOP_EVENT_ERROR);
  EXPECT_EQ(err.result, -ECONNRESET);
  EXPECT_TRUE(err.more());
  EXPECT_FALSE(d.HasFinal(1));
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_LE(c.result, 0);
}

TEST_F(Streams, PausedAtAttachReadsNothingUntilResume) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_PAUSED), 0);
  std::string data = Pattern(0, 100000);
  std::thread w([&, fd = peer.get()] { WriteAll(fd, data); });
  d.Drain(60ms);
  EXPECT_TRUE(d.Of(1, KLOOP_EVENT_DATA).empty()) << "a paused stream delivered DATA";
  ASSERT_EQ(kloop_stream_resume(d, 1), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) >= data.size(); }));
  w.join();
  EXPECT_TRUE(d.DataOf(1) == data);
}

TEST_F(Streams, PauseResumeLosesNoBytes) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_TRUE(WriteAll(peer, Pattern(0, 5000)));
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) >= 5000; }));
  ASSERT_EQ(kloop_stream_pause(d, 1), 0);
  ASSERT_EQ(kloop_stream_pause(d, 1), 0) << "pause is idempotent";
  size_t at_pause = d.DataSizeOf(1);
  // The peer keeps sending while we are paused.
  constexpr size_t kMore = 300000;
  std::thread w([&, fd = peer.get()] { WriteAll(fd, Pattern(5000, kMore)); });
  d.Drain(80ms);
  EXPECT_EQ(d.DataSizeOf(1), at_pause) << "DATA delivered while paused";
  ASSERT_EQ(kloop_stream_resume(d, 1), 0);
  ASSERT_EQ(kloop_stream_resume(d, 1), 0) << "resume is idempotent";
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) >= 5000 + kMore; }));
  w.join();
  d.Drain(10ms);
  EXPECT_EQ(d.DataSizeOf(1), 5000 + kMore);
  EXPECT_TRUE(d.DataOf(1) == Pattern(0, 5000 + kMore)) << "bytes lost or reordered across pause";
}

TEST_F(Streams, RepeatedPauseResume) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  constexpr size_t kSize = 400000;
  std::thread w([&, fd = peer.get()] { WriteAll(fd, Pattern(0, kSize)); });
  for (int i = 0; i < 20 && d.DataSizeOf(1) < kSize; ++i) {
    d.Poll(2 * kMs);
    ASSERT_EQ(kloop_stream_pause(d, 1), 0);
    d.Poll(1 * kMs);
    ASSERT_EQ(kloop_stream_resume(d, 1), 0);
  }
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) >= kSize; }));
  w.join();
  EXPECT_TRUE(d.DataOf(1) == Pattern(0, kSize));
}

TEST_F(Streams, WriteReturnsQueuedSize) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  int64_t r1 = kloop_stream_write(d, 1, "abc", 3);
  ASSERT_GE(r1, 0);
  EXPECT_LE(r1, 3);
  EXPECT_EQ(kloop_stream_write_size(d, 1), r1);
  int64_t r2 = kloop_stream_write(d, 1, "de", 2);
  ASSERT_GE(r2, 0);
  if (r1 > 0) {
    EXPECT_EQ(r2, r1 + 2) << "queue accounting wrong before any poll";
  }
  EXPECT_EQ(kloop_stream_write_size(d, 1), r2);
  EXPECT_EQ(kloop_stream_write(d, 1, nullptr, 0), r2) << "empty write must report the queue";
  ASSERT_TRUE(Flush(1));
  EXPECT_EQ(ReadN(peer, 5), "abcde");
  EXPECT_EQ(kloop_stream_write_size(d, 1), 0);
}

TEST_F(Streams, ManyWritesAreGathered) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  constexpr int kWrites = 1000;
  constexpr size_t kEach = 100;
  std::string all = Pattern(0, kWrites * kEach);
  kloop_stats before = GetStats(d);
  for (int i = 0; i < kWrites; ++i)
    ASSERT_GE(kloop_stream_write(d, 1, all.data() + i * kEach, kEach), 0);
  // A slow reader: small reads with pauses.
  PatternReader reader(peer, all.size(), 4096, 2ms, 16384);
  reader.StopAtExpected();
  ASSERT_TRUE(Flush(1));
  reader.Join();
  EXPECT_EQ(reader.got(), all.size());
  EXPECT_EQ(reader.mismatch(), -1) << "first wrong byte";
  kloop_stats after = GetStats(d);
  EXPECT_LT(after.sqes - before.sqes, static_cast<uint64_t>(kWrites / 2))
      << "1000 queued writes were not gathered into few sends";
}

// Eight 20 KiB writes queued on a fresh stream of `drv` whose socket
// buffer holds them all: the SQEs it took to send them (the bytes are
// checked at the peer). A byte written first keeps the stream busy, so
// that none of them is sent at once (Engine::direct_send).
uint64_t SqesToSendEightBlocks(Driver &drv) {
  auto [s, peer] = UnixPair();
  int sndbuf = 1 << 20;
  EXPECT_EQ(setsockopt(s, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf), 0);
  EXPECT_EQ(kloop_stream_attach(drv, 1, s, KLOOP_STREAM_NO_READ), 0);
  constexpr size_t kEach = 20 * 1024;
  std::string all = Pattern(0, kEach * 8 + 1);
  kloop_stats before = GetStats(drv);
  EXPECT_EQ(kloop_stream_write(drv, 1, all.data(), 1), 1);
  for (int i = 0; i < 8; ++i)
    EXPECT_GE(kloop_stream_write(drv, 1, all.data() + 1 + i * kEach, kEach), 0);
  EXPECT_TRUE(drv.RunUntil([&] { return kloop_stream_write_size(drv, 1) == 0; }));
  kloop_stats after = GetStats(drv);
  EXPECT_TRUE(ReadN(peer, all.size()) == all);
  EXPECT_EQ(kloop_stream_close(drv, 1), 0);
  EXPECT_EQ(drv.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  return after.sqes - before.sqes;
}

// Queued writes of more than a queue block each are gathered into one
// send: eight blocks of 20 KiB fit the socket's buffer and go out in one
// SQE, not one per block.
TEST_F(Streams, SendGathersManyBlocksAtOnce) {
  EXPECT_EQ(SqesToSendEightBlocks(d), 1u) << "the queued blocks were not sent in one SQE";
}

// KLOOP_CONFIG_NO_SEND_GATHER (the ablation switch): the same blocks go
// out one per send, intact.
TEST_F(Streams, NoSendGatherSendsOneBlockPerSqe) {
  kloop_config cfg = DefaultConfig();
  cfg.flags |= KLOOP_CONFIG_NO_SEND_GATHER;
  Driver d2(&cfg);
  ASSERT_EQ(d2.create_rc(), 0);
  EXPECT_GE(SqesToSendEightBlocks(d2), 8u)
      << "blocks were gathered although KLOOP_CONFIG_NO_SEND_GATHER was set";
}

TEST_F(Streams, SixtyFourMiBWithShortSendsArriveInOrder) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ | KLOOP_STREAM_CLOSE_FD), 0);
  s.release();
  constexpr size_t kChunk = 1 << 20;
  constexpr size_t kTotal = 64 * kChunk;
  PatternReader reader(peer, kTotal, 65536, 1ms, 1 << 20);
  std::string chunk;
  for (size_t off = 0; off < kTotal; off += kChunk) {
    chunk = Pattern(off, kChunk);
    int64_t q = kloop_stream_write(d, 1, chunk.data(), chunk.size());
    ASSERT_GE(q, 0) << kloop_strerror(static_cast<int>(q));
    ASSERT_LE(static_cast<uint64_t>(q), off + kChunk);
  }
  ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) == 0; }, 40s));
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1, 20s);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
  reader.Join();
  EXPECT_EQ(reader.got(), kTotal);
  EXPECT_TRUE(reader.eof());
  EXPECT_EQ(reader.mismatch(), -1) << "first wrong byte";
}

TEST_F(Streams, WriteLowAfterCrossingHighAndDraining) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  ASSERT_EQ(kloop_stream_set_limits(d, 1, 65536, 16384), 0);
  constexpr size_t kSize = 1 << 20;
  int64_t q = kloop_stream_write(d, 1, Pattern(0, kSize).data(), kSize);
  ASSERT_GT(q, 65536);
  d.Drain(50ms);
  EXPECT_TRUE(d.Of(1, KLOOP_EVENT_WRITE_LOW).empty()) << "WRITE_LOW while the queue is high";
  EXPECT_GT(kloop_stream_write_size(d, 1), 16384);
  PatternReader reader(peer, kSize);
  reader.StopAtExpected();
  Event low = d.WaitEvent(1, KLOOP_EVENT_WRITE_LOW);
  EXPECT_TRUE(low.more());
  EXPECT_LE(kloop_stream_write_size(d, 1), 16384);
  ASSERT_TRUE(Flush(1));
  reader.Join();
  EXPECT_EQ(reader.got(), kSize);
  EXPECT_EQ(reader.mismatch(), -1);
  d.Drain(20ms);
  EXPECT_EQ(d.Of(1, KLOOP_EVENT_WRITE_LOW).size(), 1u) << "WRITE_LOW must come once per crossing";
}

TEST_F(Streams, WriteLowAgainAfterSecondCrossing) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  ASSERT_EQ(kloop_stream_set_limits(d, 1, 1000, 500), 0);
  std::string blob = Pattern(0, 3000);
  std::string got;
  for (int round = 0; round < 2; ++round) {
    int64_t q = kloop_stream_write(d, 1, blob.data(), blob.size());
    ASSERT_GT(q, 1000);
    ASSERT_TRUE(Flush(1));
    got += ReadN(peer, blob.size());
  }
  d.Drain(10ms);
  EXPECT_EQ(got, blob + blob);
  EXPECT_EQ(d.Of(1, KLOOP_EVENT_WRITE_LOW).size(), 2u);
}

TEST_F(Streams, NoWriteLowWithoutCrossingHigh) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  ASSERT_GE(kloop_stream_write(d, 1, "small", 5), 0);
  ASSERT_TRUE(Flush(1));
  d.Drain(20ms);
  EXPECT_TRUE(d.Of(1, KLOOP_EVENT_WRITE_LOW).empty());
  EXPECT_EQ(ReadN(peer, 5), "small");
}

TEST_F(Streams, SetLimitsValidation) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  EXPECT_EQ(kloop_stream_set_limits(d, 1, 100, 200), -EINVAL);
  EXPECT_EQ(kloop_stream_set_limits(d, 1, 100, 100), 0);
  EXPECT_EQ(kloop_stream_set_limits(d, 1, 0, 0), 0);
  EXPECT_EQ(kloop_stream_set_limits(d, 99, 100, 10), -ENOENT);
}

TEST_F(Streams, ShutdownGivesWriteDoneAndPeerEof) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_GE(kloop_stream_write(d, 1, "bye", 3), 0);
  ASSERT_EQ(kloop_stream_shutdown(d, 1), 0);
  EXPECT_EQ(kloop_stream_write(d, 1, "more", 4), -EPIPE);
  EXPECT_EQ(kloop_stream_shutdown(d, 1), -EPIPE);
  Event done = d.WaitEvent(1, KLOOP_EVENT_WRITE_DONE);
  EXPECT_EQ(done.result, 0);
  EXPECT_TRUE(done.more());
  EXPECT_EQ(ReadToEof(peer, 2s), "bye");
  // Reading goes on (half-close).
  ASSERT_TRUE(WriteAll(peer, "still here"));
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1).size() >= 10; }));
  EXPECT_EQ(d.DataOf(1), "still here");
  EXPECT_FALSE(d.HasFinal(1));
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
}

TEST_F(Streams, ShutdownWaitsForTheQueue) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  constexpr size_t kSize = 1 << 20;
  ASSERT_GE(kloop_stream_write(d, 1, Pattern(0, kSize).data(), kSize), 0);
  ASSERT_EQ(kloop_stream_shutdown(d, 1), 0);
  d.Drain(30ms);
  EXPECT_TRUE(d.Of(1, KLOOP_EVENT_WRITE_DONE).empty()) << "WRITE_DONE before the queue drained";
  PatternReader reader(peer, kSize);
  Event done = d.WaitEvent(1, KLOOP_EVENT_WRITE_DONE);
  EXPECT_EQ(done.result, 0);
  reader.Join();
  EXPECT_EQ(reader.got(), kSize);
  EXPECT_TRUE(reader.eof());
  EXPECT_EQ(reader.mismatch(), -1);
}

TEST_F(Streams, GracefulCloseFlushesThenClosesFd) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  int fd = s.release();
  ASSERT_EQ(kloop_stream_attach(d, 1, fd, KLOOP_STREAM_CLOSE_FD), 0);
  constexpr size_t kSize = 1 << 20;
  ASSERT_GE(kloop_stream_write(d, 1, Pattern(0, kSize).data(), kSize), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  // As asyncio's transports: close() stops reading, but what is written
  // before the queue has flushed still goes out, in order.
  EXPECT_GT(kloop_stream_write(d, 1, Pattern(kSize, 1).data(), 1), 0) << "write while closing";
  d.Drain(20ms);
  EXPECT_FALSE(d.HasFinal(1)) << "CLOSED before the queue was flushed";
  PatternReader reader(peer, kSize + 1);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
  EXPECT_FALSE(c.more());
  reader.Join();
  EXPECT_EQ(reader.got(), kSize + 1);
  EXPECT_TRUE(reader.eof());
  EXPECT_EQ(reader.mismatch(), -1);
  errno = 0;
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
  EXPECT_EQ(errno, EBADF) << "KLOOP_STREAM_CLOSE_FD did not close the fd";
}

TEST_F(Streams, GracefulCloseWithoutCloseFdLeavesFdOpen) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_GE(kloop_stream_write(d, 1, "abc", 3), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
  EXPECT_NE(::fcntl(s, F_GETFD), -1) << "the fd was closed without KLOOP_STREAM_CLOSE_FD";
  EXPECT_EQ(ReadN(peer, 3), "abc");
  s.reset();
  EXPECT_EQ(ReadToEof(peer, 1s), "");
}

TEST_F(Streams, AbortDropsQueueAndReportsCanceled) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  int fd = s.release();
  ASSERT_EQ(kloop_stream_attach(d, 1, fd, KLOOP_STREAM_CLOSE_FD), 0);
  constexpr size_t kSize = 4 << 20;
  ASSERT_GE(kloop_stream_write(d, 1, Pattern(0, kSize).data(), kSize), 0);
  d.Drain(20ms);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, -ECANCELED);
  EXPECT_FALSE(FdOpen(fd));
  PatternReader reader(peer, kSize);
  reader.Join();
  EXPECT_LT(reader.got(), kSize) << "abort did not drop the queue";
  EXPECT_EQ(reader.mismatch(), -1);
}

TEST_F(Streams, AbortAfterCloseCutsTheFlush) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  constexpr size_t kSize = 4 << 20;
  ASSERT_GE(kloop_stream_write(d, 1, Pattern(0, kSize).data(), kSize), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(kloop_stream_close(d, 1), -EALREADY);
  d.Drain(20ms);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  EXPECT_EQ(kloop_stream_abort(d, 1), -EALREADY);
  EXPECT_EQ(kloop_stream_close(d, 1), -EALREADY);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, -ECANCELED);
  d.Drain(10ms);
  EXPECT_EQ(d.FinalCount(1), 1);
  EXPECT_EQ(kloop_stream_abort(d, 1), -ENOENT);
  EXPECT_EQ(kloop_stream_close(d, 1), -ENOENT);
}

TEST_F(Streams, DoubleCloseIsEalready) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(kloop_stream_close(d, 1), -EALREADY);
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  d.Drain(10ms);
  EXPECT_EQ(d.FinalCount(1), 1);
  EXPECT_EQ(kloop_stream_close(d, 1), -ENOENT);
}

// Found by fuzz_ops: a stream with nothing in the kernel (read error, EOF,
// write-only, paused) finished at close()/abort() at once and released its
// token before CLOSED was handed out.
enum class Idle { kReadError, kEof, kNoRead, kPaused };

std::string IdleName(Idle i) {
  switch (i) {
    case Idle::kReadError:
      return "ReadError";
    case Idle::kEof:
      return "Eof";
    case Idle::kNoRead:
      return "NoRead";
    default:
      return "Paused";
  }
}

class StreamsIdle : public Streams, public ::testing::WithParamInterface<std::pair<Idle, bool>> {};

TEST_P(StreamsIdle, TokenStaysLiveUntilClosedIsReturned) {
  auto [mode, use_abort] = GetParam();
  auto [a, b] = UnixPair();
  auto [r, w] = Pipe();
  switch (mode) {
    case Idle::kReadError:
      // Reading the write end of a pipe fails with EBADF.
      ASSERT_EQ(kloop_stream_attach(d, 3, w, KLOOP_STREAM_FILE), 0);
      EXPECT_EQ(d.WaitEvent(3, KLOOP_EVENT_ERROR).result, -EBADF);
      break;
    case Idle::kEof:
      ASSERT_EQ(kloop_stream_attach(d, 3, a, 0), 0);
      ::shutdown(b, SHUT_WR);
      EXPECT_EQ(d.WaitEvent(3, KLOOP_EVENT_EOF).result, 0);
      break;
    case Idle::kNoRead:
      ASSERT_EQ(kloop_stream_attach(d, 3, a, KLOOP_STREAM_NO_READ), 0);
      d.Drain(5ms);
      break;
    case Idle::kPaused:
      ASSERT_EQ(kloop_stream_attach(d, 3, a, KLOOP_STREAM_PAUSED), 0);
      d.Drain(5ms);
      break;
  }
  if (use_abort) {
    ASSERT_EQ(kloop_stream_abort(d, 3), 0);
    EXPECT_EQ(kloop_stream_abort(d, 3), -EALREADY);
  } else {
    ASSERT_EQ(kloop_stream_close(d, 3), 0);
    EXPECT_EQ(kloop_stream_close(d, 3), -EALREADY);
    EXPECT_EQ(kloop_stream_abort(d, 3), 0) << "abort is allowed after close";
  }
  EXPECT_EQ(kloop_stream_write_size(d, 3), 0) << "the stream is gone before its CLOSED";
  int c = kloop_cancel(d, 3);
  EXPECT_TRUE(c == 0 || c == -EALREADY) << "cancel of a stream being closed returned " << c;
  auto [s2, p2] = UnixPair();
  EXPECT_EQ(kloop_stream_attach(d, 3, s2, 0), -EEXIST) << "token reusable before its CLOSED";
  EXPECT_EQ(kloop_submit_nop(d, 3), -EEXIST) << "token reusable before its CLOSED";
  Event fin = d.WaitFinal(3);
  EXPECT_EQ(fin.event, KLOOP_EVENT_CLOSED);
  d.Drain(10ms);
  EXPECT_EQ(d.FinalCount(3), 1);
}

INSTANTIATE_TEST_SUITE_P(
    States, StreamsIdle,
    ::testing::Values(std::make_pair(Idle::kReadError, false),
                      std::make_pair(Idle::kReadError, true), std::make_pair(Idle::kEof, false),
                      std::make_pair(Idle::kEof, true), std::make_pair(Idle::kNoRead, false),
                      std::make_pair(Idle::kNoRead, true), std::make_pair(Idle::kPaused, false),
                      std::make_pair(Idle::kPaused, true)),
    [](const auto &info) {
      return IdleName(info.param.first) + (info.param.second ? "Abort" : "Close");
    });

TEST_F(Streams, CallsWhileClosing) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  int64_t queued = kloop_stream_write(d, 1, Pattern(0, 1 << 20).data(), 1 << 20);
  ASSERT_GT(queued, 0) << "the shrunk socket buffer took all of 1 MiB";
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(kloop_stream_write(d, 1, "x", 1), queued + 1) << "writes are taken until flushed";
  EXPECT_EQ(kloop_stream_pause(d, 1), -EPIPE);
  EXPECT_EQ(kloop_stream_resume(d, 1), -EPIPE);
  EXPECT_EQ(kloop_stream_shutdown(d, 1), -EPIPE);
  EXPECT_GE(kloop_stream_write_size(d, 1), 0);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  EXPECT_EQ(kloop_stream_write(d, 1, "x", 1), -EPIPE) << "write after abort";
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(kloop_stream_write(d, 1, "x", 1), -ENOENT) << "write after CLOSED was returned";
}

TEST_F(Streams, CloseFdFlagClosesOnlyWhenAsked) {
  for (uint32_t flags : {0u, static_cast<uint32_t>(KLOOP_STREAM_CLOSE_FD)}) {
    auto [s, peer] = UnixPair();
    int fd = s.get();
    ASSERT_EQ(kloop_stream_attach(d, 1, fd, flags), 0);
    ASSERT_EQ(kloop_stream_close(d, 1), 0);
    EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
    if (flags & KLOOP_STREAM_CLOSE_FD) {
      errno = 0;
      EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
      EXPECT_EQ(errno, EBADF);
      s.release();
    } else {
      EXPECT_NE(::fcntl(fd, F_GETFD), -1);
    }
    d.Forget(1);
  }
}

TEST_F(Streams, FileStreamOnPipe) {
  auto [r, w] = Pipe();
  int rfd = r.release();
  ASSERT_EQ(kloop_stream_attach(d, 1, rfd, KLOOP_STREAM_FILE | KLOOP_STREAM_CLOSE_FD), 0);
  ASSERT_TRUE(WriteAll(w, "abc"));
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1).size() >= 3; }));
  EXPECT_EQ(d.DataOf(1), "abc");
  // More than the pipe holds: the writer blocks until the engine reads.
  std::thread writer([fd = w.get()] { WriteAll(fd, Pattern(0, 200000)); });
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(1) >= 200003; }));
  writer.join();
  EXPECT_TRUE(d.DataOf(1) == "abc" + Pattern(0, 200000));
  w.reset();
  Event eof = d.WaitEvent(1, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.result, 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  EXPECT_FALSE(FdOpen(rfd));
}

TEST_F(Streams, FileStreamWritesToPipe) {
  auto [r, w] = Pipe();
  int wfd = w.release();
  ASSERT_EQ(kloop_stream_attach(d, 2, wfd,
                                KLOOP_STREAM_FILE | KLOOP_STREAM_NO_READ | KLOOP_STREAM_CLOSE_FD),
            0);
  constexpr size_t kSize = 1 << 20;  // far beyond the pipe's 64 KiB
  PatternReader reader(r, kSize);
  ASSERT_GE(kloop_stream_write(d, 2, Pattern(0, kSize).data(), kSize), 0);
  ASSERT_EQ(kloop_stream_close(d, 2), 0);
  Event c = d.WaitFinal(2);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
  reader.Join();
  EXPECT_EQ(reader.got(), kSize);
  EXPECT_TRUE(reader.eof());
  EXPECT_EQ(reader.mismatch(), -1);
}

TEST_F(Streams, FileStreamShutdownOnPipe) {
  // No shutdown(2) on a pipe: WRITE_DONE still reports the queue flushed.
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_stream_attach(d, 2, w, KLOOP_STREAM_FILE | KLOOP_STREAM_NO_READ), 0);
  ASSERT_GE(kloop_stream_write(d, 2, "pipe", 4), 0);
  ASSERT_EQ(kloop_stream_shutdown(d, 2), 0);
  Event done = d.WaitEvent(2, KLOOP_EVENT_WRITE_DONE);
  EXPECT_EQ(done.result, 0);
  EXPECT_EQ(ReadN(r, 4), "pipe");
  ASSERT_EQ(kloop_stream_close(d, 2), 0);
  d.WaitFinal(2);
}

TEST_F(Streams, NoReadStreamLeavesDataInSocket) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  ASSERT_TRUE(WriteAll(peer, "untouched"));
  d.Drain(30ms);
  EXPECT_TRUE(d.Of(1, KLOOP_EVENT_DATA).empty());
  EXPECT_EQ(ReadN(s, 9), "untouched");
}

TEST_F(Streams, TokenReusableAfterClosed) {
  for (int round = 0; round < 3; ++round) {
    auto [s, peer] = UnixPair();
    ASSERT_EQ(kloop_stream_attach(d, 7, s, 0), 0) << "round " << round;
    ASSERT_TRUE(WriteAll(peer, "r"));
    ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(7).size() >= 1; }));
    ASSERT_EQ(kloop_stream_close(d, 7), 0);
    EXPECT_EQ(d.WaitFinal(7).event, KLOOP_EVENT_CLOSED);
    d.Forget(7);
  }
}

TEST_F(Streams, DuplicateTokenIsEexist) {
  auto [s1, p1] = UnixPair();
  auto [s2, p2] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s1, 0), 0);
  EXPECT_EQ(kloop_stream_attach(d, 1, s2, 0), -EEXIST);
  EXPECT_EQ(kloop_submit_nop(d, 1), -EEXIST);
  ASSERT_EQ(kloop_submit_timeout(d, 2, 10'000 * kMs), 0);
  EXPECT_EQ(kloop_stream_attach(d, 2, s2, 0), -EEXIST);
  ASSERT_EQ(kloop_cancel(d, 2), 0);
  d.WaitFinal(2);
  d.Forget(2);
  EXPECT_EQ(kloop_stream_attach(d, 2, s2, 0), 0);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  ASSERT_EQ(kloop_stream_abort(d, 2), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ECANCELED);
  EXPECT_EQ(d.WaitFinal(2).result, -ECANCELED);
}

TEST_F(Streams, UnknownTokenIsEnoent) {
  EXPECT_EQ(kloop_stream_pause(d, 5), -ENOENT);
  EXPECT_EQ(kloop_stream_resume(d, 5), -ENOENT);
  EXPECT_EQ(kloop_stream_write(d, 5, "x", 1), -ENOENT);
  EXPECT_EQ(kloop_stream_write_size(d, 5), -ENOENT);
  EXPECT_EQ(kloop_stream_set_limits(d, 5, 10, 1), -ENOENT);
  EXPECT_EQ(kloop_stream_shutdown(d, 5), -ENOENT);
  EXPECT_EQ(kloop_stream_close(d, 5), -ENOENT);
  EXPECT_EQ(kloop_stream_abort(d, 5), -ENOENT);
  // An operation token is not a stream.
  ASSERT_EQ(kloop_submit_timeout(d, 6, 10'000 * kMs), 0);
  EXPECT_EQ(kloop_stream_write(d, 6, "x", 1), -ENOENT);
  EXPECT_EQ(kloop_stream_close(d, 6), -ENOENT);
  ASSERT_EQ(kloop_cancel(d, 6), 0);
  d.WaitFinal(6);
}

TEST_F(Streams, WriteFailsWithEpipeAfterPeerReset) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  linger lg{1, 0};
  ::setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  peer.reset();
  std::string blob(1024, 'z');
  int64_t last = 0;
  auto end = Clock::now() + kDeadline;
  while (Clock::now() < end) {
    last = kloop_stream_write(d, 1, blob.data(), blob.size());
    if (last < 0) break;
    d.Poll(5 * kMs);
  }
  EXPECT_EQ(last, -EPIPE) << "writes to a reset connection never failed";
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
}

TEST_F(Streams, ManyStreamsEcho) {
  constexpr int kN = 16;
  constexpr size_t kSize = 20000;
  std::vector<std::pair<Fd, Fd>> pairs;
  for (int i = 0; i < kN; ++i) {
    pairs.push_back(UnixPair());
    ASSERT_EQ(kloop_stream_attach(d, 100 + i, pairs[i].first, 0), 0);
    ASSERT_TRUE(WriteAll(pairs[i].second, Pattern(i, kSize)));
  }
  d.on_record = [&](const kloop_completion &c) {
    if (c.event == KLOOP_EVENT_DATA) {
      EXPECT_GE(kloop_stream_write(d, c.token, reinterpret_cast<const void *>(c.data),
                                   static_cast<size_t>(c.result)),
                0);
    }
  };
  std::vector<std::string> echoed(kN);
  ASSERT_TRUE(d.RunUntil([&] {
    bool all = true;
    for (int i = 0; i < kN; ++i) {
      echoed[i] += ReadAvailable(pairs[i].second);
      all = all && echoed[i].size() >= kSize;
    }
    return all;
  }));
  d.on_record = nullptr;
  for (int i = 0; i < kN; ++i) EXPECT_TRUE(echoed[i] == Pattern(i, kSize)) << "stream " << i;
  for (int i = 0; i < kN; ++i) ASSERT_EQ(kloop_stream_close(d, 100 + i), 0);
  for (int i = 0; i < kN; ++i) EXPECT_EQ(d.WaitFinal(100 + i).event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(GetStats(d).streams, 0u);
}

TEST_F(Streams, AttachArgumentErrors) {
  auto [s, peer] = UnixPair();
  EXPECT_EQ(kloop_stream_attach(d, 1, -1, 0), -EINVAL);
  EXPECT_EQ(kloop_stream_attach(d, 1, s, 1u << 20), -EINVAL);
  EXPECT_EQ(kloop_stream_write(d, 1, "x", 1), -ENOENT) << "a failed attach left a stream behind";
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  EXPECT_EQ(kloop_stream_write(d, 1, nullptr, 5), -EINVAL);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  d.WaitFinal(1);
}

// ---- borrowed writes (kloop_stream_write_ref) ---------------------------

// The refs released for a stream token, in order of their records.
std::vector<uint64_t> ReleasedRefs(const Driver &d, uint64_t token) {
  std::vector<uint64_t> refs;
  for (const Event &e : d.Of(token, KLOOP_EVENT_WRITE_RELEASE)) {
    EXPECT_TRUE(e.more()) << "WRITE_RELEASE must not be a final completion";
    EXPECT_EQ(e.result, 0);
    refs.push_back(e.data);
  }
  return refs;
}

TEST_F(Streams, WriteRefSendsTheCallersBytesNotACopy) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  // A byte queued first: the lent block waits behind it for the next poll
  // (to an idle stream it would be sent at once, see DirectSend* below).
  ASSERT_EQ(kloop_stream_write(d, 1, "<", 1), 1);
  std::string lent(100000, 'a');
  int64_t q = kloop_stream_write_ref(d, 1, lent.data(), lent.size(), 77);
  ASSERT_EQ(q, static_cast<int64_t>(lent.size()) + 1) << "nothing is sent before the next poll";
  EXPECT_EQ(kloop_stream_write_size(d, 1), q);
  // Changed after the call and before the send: a copying queue would send
  // the 'a's.
  lent.assign(lent.size(), 'b');
  std::string got;
  const int peer_fd = peer;  // (clang 14 cannot capture structured bindings)
  ASSERT_TRUE(d.RunUntil([&] {
    char buf[65536];
    ssize_t n = ::recv(peer_fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) got.append(buf, static_cast<size_t>(n));
    return got.size() >= lent.size() + 1 && !d.Of(1, KLOOP_EVENT_WRITE_RELEASE).empty();
  }));
  EXPECT_EQ(got, "<" + lent);
  EXPECT_EQ(ReleasedRefs(d, 1), std::vector<uint64_t>{77});
  EXPECT_EQ(kloop_stream_write_size(d, 1), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(ReleasedRefs(d, 1).size(), 1u) << "a release came twice";
}

TEST_F(Streams, WriteRefKeepsOrderWithCopiedWritesAndReleasesEachOnce) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  constexpr size_t kEach = 40000;
  constexpr int kN = 200;
  const std::string all = Pattern(0, kEach * kN);
  PatternReader reader(peer, all.size(), 8192, 1ms, 1 << 19);
  reader.StopAtExpected();
  std::vector<uint64_t> lent;
  for (int i = 0; i < kN; ++i) {
    const char *p = all.data() + static_cast<size_t>(i) * kEach;
    if (i % 3 == 2) {
      // copied writes in between, some cut in two
      ASSERT_GE(kloop_stream_write(d, 1, p, 100), 0);
      ASSERT_GE(kloop_stream_write(d, 1, p + 100, kEach - 100), 0);
    } else {
      uint64_t ref = 1000 + static_cast<uint64_t>(i);
      ASSERT_GE(kloop_stream_write_ref(d, 1, p, kEach, ref), 0);
      lent.push_back(ref);
    }
    if (i % 16 == 0) d.Poll(0);
  }
  ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) == 0; }, 30s));
  reader.Join();
  EXPECT_EQ(reader.got(), all.size());
  EXPECT_EQ(reader.mismatch(), -1) << "first wrong byte";
  d.Drain(10ms);
  EXPECT_EQ(ReleasedRefs(d, 1), lent) << "each lent block released once, in queue order";
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  d.WaitFinal(1);
}

TEST_F(Streams, WriteRefReleasedBeforeClosedWhenAborted) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  // Far more than the shrunk socket buffers take: most stays queued.
  std::vector<std::string> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(Pattern(static_cast<uint64_t>(i) << 20, 1 << 20));
  for (int i = 0; i < 8; ++i)
    ASSERT_GE(kloop_stream_write_ref(d, 1, blocks[i].data(), blocks[i].size(), 10 + i), 0);
  d.Drain(20ms);
  ASSERT_GT(kloop_stream_write_size(d, 1), 0);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  Event c = d.WaitFinal(1);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  std::vector<uint64_t> refs = ReleasedRefs(d, 1);
  EXPECT_EQ(refs, (std::vector<uint64_t>{10, 11, 12, 13, 14, 15, 16, 17}));
  EXPECT_LT(IndexOf(1, KLOOP_EVENT_WRITE_RELEASE), IndexOf(1, KLOOP_EVENT_CLOSED));
  EXPECT_LT(LastIndexOf(1, KLOOP_EVENT_WRITE_RELEASE), IndexOf(1, KLOOP_EVENT_CLOSED));
  // After the release the bytes are the caller's again.
  blocks.clear();
  d.Drain(10ms);
}

TEST_F(Streams, WriteRefReleasedWhenTheWriteFails) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  std::string big = Pattern(0, 4 << 20);
  ASSERT_GE(kloop_stream_write_ref(d, 1, big.data(), big.size(), 5), 0);
  d.Drain(20ms);
  linger lg{1, 0};
  ::setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  peer.reset();  // RST: the queued send fails
  Event err = d.WaitEvent(1, KLOOP_EVENT_ERROR);
  EXPECT_EQ(err.aux & KLOOP_ERROR_WRITE, KLOOP_ERROR_WRITE);
  d.Drain(10ms);
  EXPECT_EQ(ReleasedRefs(d, 1), std::vector<uint64_t>{5});
  EXPECT_EQ(kloop_stream_write_ref(d, 1, big.data(), big.size(), 6), -EPIPE);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  d.WaitFinal(1);
  EXPECT_EQ(ReleasedRefs(d, 1), std::vector<uint64_t>{5}) << "a refused write was released";
}

TEST_F(Streams, WriteRefGracefulCloseFlushesThenReleases) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_CLOSE_FD), 0);
  s.release();
  std::string big = Pattern(0, 3 << 20);
  PatternReader reader(peer, big.size());
  ASSERT_GE(kloop_stream_write_ref(d, 1, big.data(), big.size(), 9), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event c = d.WaitFinal(1, 20s);
  EXPECT_EQ(c.event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(c.result, 0);
  EXPECT_EQ(ReleasedRefs(d, 1), std::vector<uint64_t>{9});
  EXPECT_LT(IndexOf(1, KLOOP_EVENT_WRITE_RELEASE), IndexOf(1, KLOOP_EVENT_CLOSED));
  reader.Join();
  EXPECT_EQ(reader.got(), big.size());
  EXPECT_TRUE(reader.eof());
  EXPECT_EQ(reader.mismatch(), -1);
}

TEST_F(Streams, WriteRefArgumentErrors) {
  auto [s, peer] = UnixPair();
  char x = 'x';
  EXPECT_EQ(kloop_stream_write_ref(d, 1, &x, 1, 1), -ENOENT);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, 0), 0);
  EXPECT_EQ(kloop_stream_write_ref(d, 1, nullptr, 5, 1), -EINVAL);
  EXPECT_EQ(kloop_stream_write_ref(d, 1, &x, 0, 1), -EINVAL) << "len 0 lends nothing";
  EXPECT_EQ(kloop_stream_write_ref(d, 1, &x, (static_cast<size_t>(1) << 40) + 1, 1), -EINVAL);
  EXPECT_EQ(kloop_stream_write_ref(nullptr, 1, &x, 1, 1), -EBADF);
  ASSERT_EQ(kloop_stream_shutdown(d, 1), 0);
  EXPECT_EQ(kloop_stream_write_ref(d, 1, &x, 1, 2), -EPIPE);
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  d.WaitFinal(1);
  EXPECT_TRUE(ReleasedRefs(d, 1).empty()) << "refused writes must not be released";
}

// ---- direct sends (Engine::direct_send) ---------------------------------

constexpr size_t kDirectMin = 16384;  // kDirectSendMin in libkloop/engine.h

// A large write to a stream with nothing queued and nothing in flight goes
// to the kernel at once, from the caller's memory: no copy, no SQE, and the
// peer has it before the next poll.
TEST_F(Streams, DirectSendTakesALargeWriteToAnIdleStreamAtOnce) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  const std::string msg = Pattern(0, 64 * 1024);
  kloop_stats before = GetStats(d);
  EXPECT_EQ(kloop_stream_write(d, 1, msg.data(), msg.size()), 0) << "the write was queued";
  kloop_stats after = GetStats(d);
  EXPECT_EQ(after.direct_sends - before.direct_sends, 1u);
  EXPECT_EQ(after.sqes, before.sqes);
  EXPECT_EQ(kloop_stream_write_size(d, 1), 0);
  EXPECT_TRUE(ReadN(peer, msg.size()) == msg) << "the bytes are not at the peer before a poll";
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
}

// Below the threshold, or behind queued bytes, a write waits in the queue:
// small writes stay gathered into the poll's one io_uring_enter, and a
// write never overtakes bytes queued before it.
TEST_F(Streams, DirectSendOnlyForLargeWritesToAnIdleStream) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  const std::string all = Pattern(0, 1 + 2 * kDirectMin + (kDirectMin - 1));
  const char *p = all.data();
  kloop_stats before = GetStats(d);
  ASSERT_EQ(kloop_stream_write(d, 1, p, kDirectMin - 1), static_cast<int64_t>(kDirectMin - 1));
  ASSERT_TRUE(Flush(1));
  EXPECT_EQ(ReadN(peer, kDirectMin - 1), all.substr(0, kDirectMin - 1));
  p += kDirectMin - 1;
  ASSERT_EQ(kloop_stream_write(d, 1, p, 1), 1);  // queued: the stream is busy now
  ASSERT_EQ(kloop_stream_write(d, 1, p + 1, kDirectMin), static_cast<int64_t>(kDirectMin + 1));
  EXPECT_EQ(GetStats(d).direct_sends, before.direct_sends) << "a write overtook the queue";
  ASSERT_TRUE(Flush(1));
  p += 1 + kDirectMin;
  ASSERT_EQ(kloop_stream_write(d, 1, p, kDirectMin), 0);  // idle again: sent at once
  EXPECT_EQ(GetStats(d).direct_sends - before.direct_sends, 1u);
  EXPECT_TRUE(ReadN(peer, all.size() - (kDirectMin - 1)) == all.substr(kDirectMin - 1));
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  d.WaitFinal(1);
}

// What the socket does not take at once is queued and follows in order.
TEST_F(Streams, DirectSendQueuesWhatTheSocketDoesNotTake) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  const std::string all = Pattern(0, 3 << 20);
  kloop_stats before = GetStats(d);
  int64_t q = kloop_stream_write(d, 1, all.data(), 1 << 20);
  ASSERT_GT(q, 0) << "the shrunk socket buffer took all of 1 MiB";
  EXPECT_LT(q, 1 << 20) << "nothing was sent at once";
  EXPECT_EQ(GetStats(d).direct_sends - before.direct_sends, 1u);
  ASSERT_GE(kloop_stream_write(d, 1, all.data() + (1 << 20), 2 << 20), q);
  PatternReader reader(peer, all.size(), 65536, 1ms, 1 << 19);
  reader.StopAtExpected();
  ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) == 0; }, 30s));
  reader.Join();
  EXPECT_EQ(reader.got(), all.size());
  EXPECT_EQ(reader.mismatch(), -1) << "first wrong byte";
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  d.WaitFinal(1);
}

// KLOOP_CONFIG_NO_DIRECT_SEND (the ablation switch): every write waits for
// the poll.
TEST_F(Streams, NoDirectSendQueuesLargeWrites) {
  kloop_config cfg = DefaultConfig();
  cfg.flags |= KLOOP_CONFIG_NO_DIRECT_SEND;
  Driver d2(&cfg);
  ASSERT_EQ(d2.create_rc(), 0);
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d2, 1, s, KLOOP_STREAM_NO_READ), 0);
  const std::string msg = Pattern(0, 64 * 1024);
  EXPECT_EQ(kloop_stream_write(d2, 1, msg.data(), msg.size()), static_cast<int64_t>(msg.size()));
  EXPECT_TRUE(d2.RunUntil([&] { return kloop_stream_write_size(d2, 1) == 0; }));
  EXPECT_TRUE(ReadN(peer, msg.size()) == msg);
  EXPECT_EQ(GetStats(d2).direct_sends, 0u);
  ASSERT_EQ(kloop_stream_close(d2, 1), 0);
  d2.WaitFinal(1);
}

// A pipe (KLOOP_STREAM_FILE) may be in blocking mode: never written at once.
TEST_F(Streams, DirectSendNeverOnAFileStream) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_stream_attach(d, 2, w, KLOOP_STREAM_FILE | KLOOP_STREAM_NO_READ), 0);
  const std::string msg = Pattern(0, 32 * 1024);
  EXPECT_EQ(kloop_stream_write(d, 2, msg.data(), msg.size()), static_cast<int64_t>(msg.size()));
  EXPECT_EQ(GetStats(d).direct_sends, 0u);
  ASSERT_TRUE(Flush(2));
  EXPECT_TRUE(ReadN(r, msg.size()) == msg);
  ASSERT_EQ(kloop_stream_close(d, 2), 0);
  d.WaitFinal(2);
}

// A lent block the kernel took whole at once is released by the next poll
// (kloop_stream_write_ref's promise: one WRITE_RELEASE per accepted call).
TEST_F(Streams, DirectSendOfALentBlockReleasesItAtTheNextPoll) {
  auto [s, peer] = UnixPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  const std::string msg = Pattern(0, 64 * 1024);
  EXPECT_EQ(kloop_stream_write_ref(d, 1, msg.data(), msg.size(), 42), 0);
  EXPECT_EQ(GetStats(d).direct_sends, 1u);
  EXPECT_TRUE(ReadN(peer, msg.size()) == msg);
  d.Poll(0);
  EXPECT_EQ(ReleasedRefs(d, 1), std::vector<uint64_t>{42});
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).event, KLOOP_EVENT_CLOSED);
  EXPECT_EQ(ReleasedRefs(d, 1), std::vector<uint64_t>{42}) << "released twice";
}

// A broken connection fails the direct send quietly: the bytes are queued
// and the queued send reports the error as it would have without it.
TEST_F(Streams, DirectSendToAResetConnectionReportsAWriteError) {
  auto [s, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  linger lg{1, 0};
  ::setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  peer.reset();
  std::this_thread::sleep_for(10ms);
  const std::string msg = Pattern(0, 64 * 1024);
  EXPECT_EQ(kloop_stream_write(d, 1, msg.data(), msg.size()), static_cast<int64_t>(msg.size()));
  EXPECT_EQ(GetStats(d).direct_sends, 0u);
  Event err = d.WaitEvent(1, KLOOP_EVENT_ERROR);
  EXPECT_EQ(err.aux & KLOOP_ERROR_WRITE, KLOOP_ERROR_WRITE);
  EXPECT_TRUE(err.result == -ECONNRESET || err.result == -EPIPE) << err.result;
  EXPECT_EQ(kloop_stream_write(d, 1, msg.data(), msg.size()), -EPIPE);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  d.WaitFinal(1);
}

TEST_F(Streams, DestroyWithBorrowedBytesQueuedReadsThemNoMore) {
  auto [s, peer] = TcpPair();
  ShrinkBuffers(s, peer);
  ASSERT_EQ(kloop_stream_attach(d, 1, s, KLOOP_STREAM_NO_READ), 0);
  auto *lent = new std::string(Pattern(0, 4 << 20));
  ASSERT_GE(kloop_stream_write_ref(d, 1, lent->data(), lent->size(), 1), 0);
  d.Drain(10ms);
  ASSERT_EQ(d.Destroy(), 0);
  // Under ASan a read of freed memory by a late send would be caught.
  delete lent;
  EXPECT_TRUE(d.Of(1, KLOOP_EVENT_WRITE_RELEASE).empty());
}

}  // namespace
