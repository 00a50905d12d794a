// How often the engine allocates write memory. A request/response stream
// goes idle between messages and then holds no write block; the loop keeps
// a bounded few for all its streams, so answering one message at a time
// must not cost a heap allocation (and, from glibc, a brk call) each.
//
// The engine takes its write blocks with the nothrow operator new. This
// executable replaces the global allocation functions (standard C++: the
// replacement is used by every library of the process, libkloop included)
// with malloc/free and counts nothrow allocations of a write block's size.
#include <sys/socket.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "tls_util.h"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<size_t> g_big_nothrow{0};
std::atomic<bool> g_fail_blocks{false};  // nothrow allocations of a block's size fail

// The smallest write block the engine makes (the first block of a small write).
constexpr size_t kBlock = 2048;

void *Allocate(size_t n) { return std::malloc(n ? n : 1); }
}  // namespace

void *operator new(size_t n) {
  void *p = Allocate(n);
  if (!p) throw std::bad_alloc();
  return p;
}
void *operator new[](size_t n) { return operator new(n); }
void *operator new(size_t n, const std::nothrow_t &) noexcept {
  if (n >= kBlock && g_counting.load(std::memory_order_relaxed))
    g_big_nothrow.fetch_add(1, std::memory_order_relaxed);
  if (n >= kBlock && g_fail_blocks.load(std::memory_order_relaxed)) return nullptr;
  return Allocate(n);
}
void *operator new[](size_t n, const std::nothrow_t &t) noexcept { return operator new(n, t); }
void operator delete(void *p) noexcept { std::free(p); }
void operator delete[](void *p) noexcept { std::free(p); }
void operator delete(void *p, size_t) noexcept { std::free(p); }
void operator delete[](void *p, size_t) noexcept { std::free(p); }
void operator delete(void *p, const std::nothrow_t &) noexcept { std::free(p); }
void operator delete[](void *p, const std::nothrow_t &) noexcept { std::free(p); }

using namespace kt;

namespace {

constexpr size_t kMsg = 1024;
constexpr size_t kLargeMsg = 100 * 1024;  // more than a block: written as larger blocks
constexpr uint32_t kBatch = 64;

// Counts the engine's block-sized allocations while alive.
class CountBlocks {
 public:
  CountBlocks() {
    g_big_nothrow = 0;
    g_counting = true;
  }
  ~CountBlocks() { g_counting = false; }
  size_t count() const { return g_big_nothrow.load(); }
};

// Poll until every stream in [first, first + n) has nothing left to send;
// DATA records are not expected.
bool PollUntilFlushed(kloop_t *loop, uint64_t first, size_t n) {
  kloop_completion recs[kBatch];
  auto end = Clock::now() + kDeadline;
  while (Clock::now() < end) {
    bool flushed = true;
    for (size_t i = 0; i < n && flushed; ++i)
      flushed = kloop_stream_write_size(loop, first + i) == 0;
    if (flushed) {
      // Records returned by the last poll are retired at the start of the next.
      kloop_poll(loop, recs, kBatch, 0);
      return true;
    }
    int rc = kloop_poll(loop, recs, kBatch, kMs);
    if (rc < 0 && rc != -EINTR) return false;
  }
  return false;
}

// A loop whose writes all wait in the queue for the next poll: a large
// write to an idle stream is otherwise sent at once and takes no block,
// and the pool is for the writes that must wait (a busy stream's).
kloop_config QueueingConfig() {
  kloop_config cfg;
  kloop_config_init(&cfg);
  cfg.flags |= KLOOP_CONFIG_NO_DIRECT_SEND;
  return cfg;
}

// Echoes messages of msg_size bytes through one stream and expects no write
// block to be allocated after the first message.
void EchoAllocatesNoBlockPerMessage(size_t msg_size) {
  kloop_t *loop = nullptr;
  kloop_config cfg = QueueingConfig();
  ASSERT_EQ(kloop_create(&cfg, &loop), 0);
  // Not a structured binding: clang 14 refuses to capture one in a lambda.
  std::pair<Fd, Fd> pair = TcpPair();
  Fd &peer = pair.second;
  ASSERT_EQ(kloop_stream_attach(loop, 1, pair.first.release(), KLOOP_STREAM_CLOSE_FD), 0);
  std::string msg = Pattern(0, msg_size);
  kloop_completion recs[kBatch];

  // One echo: the peer sends, the engine hands the bytes back to the peer,
  // and the stream's write queue is empty again (its block let go of).
  auto echo_once = [&]() -> bool {
    if (!WriteAll(peer, msg)) return false;
    size_t got = 0;
    auto end = Clock::now() + kDeadline;
    while (got < msg_size && Clock::now() < end) {
      int n = kloop_poll(loop, recs, kBatch, kMs);
      if (n < 0 && n != -EINTR) return false;
      for (int k = 0; k < n; ++k) {
        if (recs[k].event != KLOOP_EVENT_DATA) return false;
        if (kloop_stream_write(loop, 1, reinterpret_cast<const void *>(recs[k].data),
                               static_cast<size_t>(recs[k].result)) < 0)
          return false;
        got += static_cast<size_t>(recs[k].result);
      }
    }
    if (got != msg_size || !PollUntilFlushed(loop, 1, 1)) return false;
    return ReadN(peer, msg_size) == msg;
  };

  ASSERT_TRUE(echo_once());  // the first message may allocate
  constexpr int kRounds = 200;
  size_t allocated;
  {
    CountBlocks counter;
    for (int i = 0; i < kRounds; ++i) ASSERT_TRUE(echo_once()) << "round " << i;
    allocated = counter.count();
  }
  EXPECT_EQ(allocated, 0u) << "write blocks allocated over " << kRounds << " echoes";
  EXPECT_EQ(kloop_destroy(loop), 0);  // frees the kept blocks (LeakSanitizer checks)
}

TEST(WriteBlocks, RequestResponseStreamAllocatesNoBlockPerMessage) {
  EchoAllocatesNoBlockPerMessage(kMsg);
}

// Messages larger than a block: the loop keeps the larger blocks too (an
// allocation and a free of 100 KiB per message made glibc trim and regrow
// its heap: a brk call and page faults per message).
TEST(WriteBlocks, RequestResponseStreamAllocatesNoLargeBlockPerMessage) {
  EchoAllocatesNoBlockPerMessage(kLargeMsg);
}

// Many streams each queue a message at once: one block each.
class ManyStreams : public ::testing::Test {
 protected:
  static constexpr size_t kStreams = 100;
  void SetUp() override {
    kloop_config cfg = QueueingConfig();
    ASSERT_EQ(kloop_create(&cfg, &loop_), 0);
    for (size_t i = 0; i < kStreams; ++i) {
      std::pair<Fd, Fd> pair = UnixPair();
      ASSERT_EQ(kloop_stream_attach(loop_, 1 + i, pair.first.release(), KLOOP_STREAM_CLOSE_FD), 0);
      peers_.push_back(std::move(pair.second));
    }
  }
  void TearDown() override {
    if (loop_) EXPECT_EQ(kloop_destroy(loop_), 0);
  }
  // Writes the message to every stream; returns the blocks allocated.
  size_t WriteAll() {
    CountBlocks counter;
    for (size_t i = 0; i < kStreams; ++i)
      if (kloop_stream_write(loop_, 1 + i, msg_.data(), msg_.size()) !=
          static_cast<int64_t>(msg_.size()))
        ADD_FAILURE() << "write to stream " << 1 + i;
    return counter.count();
  }
  bool Flushed() {
    for (size_t i = 0; i < kStreams; ++i)
      if (kloop_stream_write_size(loop_, 1 + i) != 0) return false;
    return true;
  }
  void ReadAll() {
    for (auto &p : peers_) ASSERT_EQ(ReadN(p, msg_.size()), msg_);
  }

  kloop_t *loop_ = nullptr;
  std::vector<Fd> peers_;
  std::string msg_ = Pattern(7, kMsg);
};

TEST_F(ManyStreams, BlocksFreedInAPollServeTheWritesAfterIt) {
  EXPECT_EQ(WriteAll(), kStreams);  // nothing kept yet
  // One poll submits the sends; into empty socket buffers they complete at
  // once, and the poll reaps them all (room for every record).
  kloop_completion recs[256];
  ASSERT_GE(kloop_poll(loop_, recs, 256, 0), 0);
  ASSERT_TRUE(Flushed()) << "the sends did not complete in the poll that submitted them";
  // The answers written right after that poll take the blocks it freed.
  EXPECT_EQ(WriteAll(), 0u) << "blocks freed in the last poll were not kept";
  ASSERT_TRUE(PollUntilFlushed(loop_, 1, kStreams));
  ReadAll();
  ReadAll();
}

TEST_F(ManyStreams, LoopKeepsABoundedNumberOfBlocksBetweenPolls) {
  EXPECT_EQ(WriteAll(), kStreams);
  // Flushed, then one more poll: the pool is back to its bound.
  ASSERT_TRUE(PollUntilFlushed(loop_, 1, kStreams));
  ReadAll();
  size_t again = WriteAll();
  EXPECT_GT(again, 0u) << "the loop kept a block for every stream";
  EXPECT_LT(again, kStreams) << "the loop kept no block";
  ASSERT_TRUE(PollUntilFlushed(loop_, 1, kStreams));
  ReadAll();
}

// The same with messages larger than a block: what the loop keeps of the
// larger blocks between polls is bounded in bytes.
class ManyStreamsLarge : public ManyStreams {
 protected:
  ManyStreamsLarge() { msg_ = Pattern(8, kLargeMsg); }
};

TEST_F(ManyStreamsLarge, BlocksFreedInAPollServeTheWritesAfterIt) {
  EXPECT_EQ(WriteAll(), kStreams);
  kloop_completion recs[256];
  ASSERT_GE(kloop_poll(loop_, recs, 256, 0), 0);
  ASSERT_TRUE(Flushed()) << "the sends did not complete in the poll that submitted them";
  EXPECT_EQ(WriteAll(), 0u) << "large blocks freed in the last poll were not kept";
  ReadAll();  // room in the sockets for the second messages
  ASSERT_TRUE(PollUntilFlushed(loop_, 1, kStreams));
  ReadAll();
}

TEST_F(ManyStreamsLarge, LoopKeepsABoundedAmountOfLargeBlocksBetweenPolls) {
  EXPECT_EQ(WriteAll(), kStreams);
  ASSERT_TRUE(PollUntilFlushed(loop_, 1, kStreams));
  ReadAll();
  // 100 blocks of 112 KiB were freed; 2 MiB of them are kept.
  size_t again = WriteAll();
  EXPECT_GT(again, 0u) << "the loop kept a large block for every stream";
  EXPECT_LT(again, kStreams) << "the loop kept no large block";
  EXPECT_GE(again, kStreams - (2u << 20) / (112 * 1024)) << "more than 2 MiB kept";
  ASSERT_TRUE(PollUntilFlushed(loop_, 1, kStreams));
  ReadAll();
}

}  // namespace

// A TLS write larger than the write pool can hold, with no memory for more
// write blocks: whether the engine seals the records or OpenSSL encrypts
// them, records of the write may be queued when memory runs out, so the
// stream fails (-EPIPE, an ERROR record) instead of reporting -ENOMEM for a
// write of which the peer would get a part.
TEST(WriteBlocks, TlsWriteWithoutMemoryFailsTheStream) {
  for (uint32_t flags : {0u, static_cast<uint32_t>(KLOOP_CONFIG_NO_TLS_SEAL)}) {
    SCOPED_TRACE(flags ? "OpenSSL encrypts" : "engine seals");
    kloop_config cfg = QueueingConfig();
    cfg.flags |= flags;
    Driver d(&cfg);
    ASSERT_EQ(d.create_rc(), 0);
    CtxPtr sctx = ServerCtx(), cctx = ClientCtx();
    SslPtr c = Client(cctx.get()), s = Server(sctx.get());
    std::pair<Fd, Fd> fds;
    ASSERT_NO_FATAL_FAILURE(StartTlsPair(d, c.get(), s.get(), &fds));
    Event hs = d.WaitEvent(1, KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
    std::string big(4u << 20, 'x');  // far more than the pool keeps (512 KiB)
    g_fail_blocks = true;
    int64_t rc = kloop_stream_write(d, 1, big.data(), big.size());
    g_fail_blocks = false;
    EXPECT_EQ(rc, -EPIPE);
    Event err = d.WaitEvent(1, KLOOP_EVENT_ERROR);
    EXPECT_NE(err.aux & KLOOP_ERROR_WRITE, 0u) << Describe(err);
    kloop_stream_abort(d, 1);
    kloop_stream_abort(d, 2);
    d.WaitFinal(1);
    d.WaitFinal(2);
  }
}
