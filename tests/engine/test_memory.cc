// What an engine stream costs in memory while it is idle. A server holds
// thousands of mostly idle connections: the engine's share per connection
// must stay a few hundred bytes, not kilobytes (uvloop's whole connection,
// Python objects included, costs about 1.7 KiB).
//
// Measured as heap bytes in use (mallinfo2, or the sanitizer allocator's
// own count in an ASan build) before attaching the streams and after each
// has echoed one message and gone idle: every stream has then set up all a
// live connection needs (a receive armed, a write queued, sent and drained).
// The loop keeps a bounded number of free write blocks for all its streams;
// that is the loop's cost, not a stream's: it is filled before measuring,
// and checked on its own.
#include <sys/resource.h>
#include <sys/socket.h>

#include <malloc.h>

#include "common.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define KT_ASAN 1
#endif
#ifdef KT_ASAN
#include <sanitizer/allocator_interface.h>
#endif

using namespace kt;

namespace {

size_t HeapInUse() {
#ifdef KT_ASAN
  return __sanitizer_get_current_allocated_bytes();
#else
  struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
#endif
}

// The engine's heap share per idle stream: the Stream itself, its slot in
// the token table and whatever else an echoed-then-idle stream keeps.
constexpr size_t kMaxBytesPerIdleStream = 512;

// What the loop may keep for all its streams once they are idle: free
// write blocks (32 of 16 KiB) and its record queues.
constexpr size_t kMaxLoopCacheBytes = 640 * 1024;

class Memory : public ::testing::Test {
 protected:
  void SetUp() override {
    // 2 fds per stream, plus the ring's and the test's own.
    rlimit rl{};
    ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
    rlim_t want = 2 * kStreams + 64;
    if (rl.rlim_cur < want && rl.rlim_max >= want) {
      rl.rlim_cur = want;
      ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
    }
    ASSERT_GE(rl.rlim_cur, want) << "the test needs " << want << " file descriptors";
    ASSERT_EQ(kloop_create(nullptr, &loop_), 0);
    // The first poll enables the ring and sizes the engine's record queues.
    ASSERT_GE(kloop_poll(loop_, recs_, kBatch, 0), 0);
    for (size_t i = 0; i < kStreams; ++i) {
      int sv[2];
      ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
      ours_[i] = sv[0];
      peers_[i] = sv[1];
    }
  }
  void TearDown() override {
    if (loop_) kloop_destroy(loop_);
    for (size_t i = 0; i < kStreams; ++i) {
      if (ours_[i] >= 0) ::close(ours_[i]);
      if (peers_[i] >= 0) ::close(peers_[i]);
    }
  }

  // Poll until every stream has echoed kMsg bytes back to its peer and has
  // nothing left to send. No allocation in here beyond the engine's own.
  bool EchoAll() {
    static char msg[kMsg];
    memset(msg, 'm', sizeof msg);
    for (size_t i = 0; i < kStreams; ++i)
      if (::send(peers_[i], msg, sizeof msg, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof msg))
        return false;
    size_t done = 0;
    auto end = Clock::now() + kDeadline;
    while (done < kStreams && Clock::now() < end) {
      int n = kloop_poll(loop_, recs_, kBatch, kMs);
      if (n < 0 && n != -EINTR) return false;
      for (int k = 0; k < n; ++k) {
        const kloop_completion &c = recs_[k];
        if (c.event != KLOOP_EVENT_DATA) return false;
        if (kloop_stream_write(loop_, c.token, reinterpret_cast<const void *>(c.data),
                               static_cast<size_t>(c.result)) < 0)
          return false;
      }
      ReadPeers();
      done = 0;
      for (size_t i = 0; i < kStreams; ++i)
        if (echoed_[i] == kMsg && kloop_stream_write_size(loop_, 1 + i) == 0) ++done;
    }
    // Two more polls: records returned and memory retired by the last one
    // are recycled at the start of the next.
    kloop_poll(loop_, recs_, kBatch, 0);
    kloop_poll(loop_, recs_, kBatch, 0);
    return done == kStreams;
  }

  // Reads what the streams sent to their peers so far (into echoed_).
  void ReadPeers() {
    for (size_t i = 0; i < kStreams; ++i) {
      char buf[kMsg];
      ssize_t r;
      while ((r = ::recv(peers_[i], buf, sizeof buf, MSG_DONTWAIT)) > 0)
        echoed_[i] += static_cast<size_t>(r);
    }
  }

  // Echo one message on each of kWarm streams of their own, all at once,
  // then close them: the loop's caches are then as full as an echo makes
  // them.
  bool WarmUp() {
    static char msg[kMsg];
    memset(msg, 'w', sizeof msg);
    int sv[kWarm][2];
    for (size_t i = 0; i < kWarm; ++i) {
      if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv[i]) != 0) return false;
      if (kloop_stream_attach(loop_, kWarmToken + i, sv[i][0], KLOOP_STREAM_CLOSE_FD) != 0)
        return false;
      if (::send(sv[i][1], msg, sizeof msg, MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof msg))
        return false;
    }
    size_t echoed = 0, closed = 0;
    auto end = Clock::now() + kDeadline;
    while (closed < kWarm && Clock::now() < end) {
      int n = kloop_poll(loop_, recs_, kBatch, kMs);
      if (n < 0 && n != -EINTR) return false;
      for (int k = 0; k < n; ++k) {
        const kloop_completion &c = recs_[k];
        if (c.event == KLOOP_EVENT_DATA) {
          if (kloop_stream_write(loop_, c.token, reinterpret_cast<const void *>(c.data),
                                 static_cast<size_t>(c.result)) < 0)
            return false;
          echoed += static_cast<size_t>(c.result);
          if (echoed == kWarm * kMsg)
            for (size_t i = 0; i < kWarm; ++i) kloop_stream_close(loop_, kWarmToken + i);
        } else if (c.event == KLOOP_EVENT_CLOSED) {
          ++closed;
        }
      }
    }
    kloop_poll(loop_, recs_, kBatch, 0);
    for (size_t i = 0; i < kWarm; ++i) ::close(sv[i][1]);
    return closed == kWarm;
  }

  static constexpr size_t kWarm = 64;
  static constexpr uint64_t kWarmToken = 1000000;
  static constexpr size_t kStreams = 1000;
  static constexpr size_t kMsg = 1024;
  static constexpr uint32_t kBatch = 64;
  kloop_t *loop_ = nullptr;
  kloop_completion recs_[kBatch];
  int ours_[kStreams];
  int peers_[kStreams];
  size_t echoed_[kStreams] = {};
};

TEST_F(Memory, IdleStreamCostsAFewHundredBytes) {
  size_t created = HeapInUse();
  ASSERT_TRUE(WarmUp()) << "the warm-up streams did not echo and close";
  size_t before = HeapInUse();
  EXPECT_LE(before, created + kMaxLoopCacheBytes)
      << "the loop keeps this much for idle streams: " << created << " -> " << before;
  RecordProperty("loop_cache_bytes", static_cast<int>(before > created ? before - created : 0));
  for (size_t i = 0; i < kStreams; ++i)
    ASSERT_EQ(kloop_stream_attach(loop_, 1 + i, ours_[i], 0), 0);
  ASSERT_TRUE(EchoAll()) << "not every stream echoed its message";
  size_t after = HeapInUse();
  size_t per = after > before ? (after - before) / kStreams : 0;
  EXPECT_LE(per, kMaxBytesPerIdleStream)
      << "heap bytes per idle stream: " << per << " (" << before << " -> " << after << ")";
  RecordProperty("heap_bytes_per_idle_stream", static_cast<int>(per));

  // And they go back when the streams close.
  for (size_t i = 0; i < kStreams; ++i) ASSERT_EQ(kloop_stream_close(loop_, 1 + i), 0);
  size_t closed = 0;
  auto end = Clock::now() + kDeadline;
  while (closed < kStreams && Clock::now() < end) {
    int n = kloop_poll(loop_, recs_, kBatch, kMs);
    for (int k = 0; k < n; ++k) closed += recs_[k].event == KLOOP_EVENT_CLOSED;
  }
  ASSERT_EQ(closed, kStreams);
  kloop_poll(loop_, recs_, kBatch, 0);
  size_t gone = HeapInUse();
  // The token table keeps its capacity: 1000 entries' worth at most.
  EXPECT_LE(gone, before + 64 * kStreams) << before << " -> " << gone;
}

// Every stream answers one small message at once (a server after a burst
// of small requests): the answers wait in the queues together, and what
// they take is what the heap grows by -- and keeps, touched, after they
// are freed. A small answer takes a block about its size, not 16 KiB.
TEST_F(Memory, SmallAnswersQueuedTogetherTakeSmallBlocks) {
  for (size_t i = 0; i < kStreams; ++i)
    ASSERT_EQ(kloop_stream_attach(loop_, 1 + i, ours_[i], 0), 0);
  kloop_poll(loop_, recs_, kBatch, 0);
  static char msg[kMsg];
  memset(msg, 'a', sizeof msg);
  size_t before = HeapInUse();
  for (size_t i = 0; i < kStreams; ++i)
    ASSERT_EQ(kloop_stream_write(loop_, 1 + i, msg, sizeof msg), static_cast<int64_t>(kMsg));
  size_t after = HeapInUse();
  size_t per = after > before ? (after - before) / kStreams : 0;
  EXPECT_LE(per, 4 * kMsg) << "heap bytes per queued 1 KiB answer: " << per;
  RecordProperty("heap_bytes_per_queued_small_answer", static_cast<int>(per));
  size_t done = 0;
  auto end = Clock::now() + kDeadline;
  while (done < kStreams && Clock::now() < end) {
    kloop_poll(loop_, recs_, kBatch, kMs);
    ReadPeers();
    done = 0;
    for (size_t i = 0; i < kStreams; ++i) done += echoed_[i] == kMsg;
  }
  EXPECT_EQ(done, kStreams) << "not every answer arrived";
}

}  // namespace
