// The engine behind kloop.h. C++20, built without exceptions and RTTI:
// allocation failures surface as -ENOMEM through nothrow new.
#pragma once

#include <liburing.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <cstdint>

#include "containers.h"
#include "kloop.h"

namespace kl {

struct Stream;

enum class OpKind : uint8_t {
  Nop,
  Accept,
  Connect,
  Recv,
  Send,
  RecvMsg,
  SendMsg,
  Read,
  Write,
  Poll,
  Timeout,
  Shutdown,
  Close,
  Splice,
  ChildWaitid,
  ChildPidfd,
  // Engine-internal operations: their completions are never shown as-is.
  Wake,
  Timer,  // the poll call's own timer (no IORING_FEAT_EXT_ARG)
  StreamRecv,
  StreamSend,
  StreamShutdown,
  StreamClose,
};

// Op::state bits
enum : uint16_t {
  kOpMultishot = 1u << 0,    // caller asked for multishot
  kOpKernelMulti = 1u << 1,  // armed as a kernel multishot request
  kOpCancelling = 1u << 2,   // cancel requested
  kOpInKernel = 1u << 3,     // an SQE for it is queued or in flight
  kOpPollRetry = 1u << 4,    // waiting for readiness after -EAGAIN
  kOpEdge = 1u << 5,         // caller wants the kernel's multishot (poll: edge-like)
  kOpWaitClose = 1u << 6,    // close: waiting for other ops on the fd
  kOpFinished = 1u << 7,     // final completion produced
  kOpTlsExact = 1u << 8,     // TLS stream recv of exactly what OpenSSL asked for
  kOpTlsRecvmsg = 1u << 9,   // TLS stream recvmsg with the record type (kernel TLS)
};

// What completion dispatch needs of every operation; its address is the
// SQE's user_data. A stream's own operations (receive, send, shutdown,
// close) are just this, embedded in the Stream: their fd and token are the
// stream's, and an idle stream must stay small.
struct OpHead {
  Stream *stream = nullptr;  // set for a stream's own operations
  OpKind kind = OpKind::Nop;
  uint16_t state = 0;
  uint32_t bid = 0;  // stream receive: the own or TLS buffer it reads into
};

// The kernel-facing memory of socket operations with an address.
struct OpNet {
  sockaddr_storage addr;
  msghdr msg;
  iovec iov;
};

// One submitted operation (not a stream's own). Its address is the SQE's
// user_data, so it lives until the kernel's final CQE and, when that CQE
// hands out memory inside the Op (addresses), until the record has been
// returned by kloop_poll. What the kernel reads or writes depends on the
// kind, so those parts share storage: accept, connect, recvmsg and sendmsg
// use `net`; timeouts and the poll call's timer `ts`; waitid `si`.
struct Op : OpHead {
  uint64_t token = 0;
  int fd = -1;
  int fd2 = -1;
  uint32_t len = 0;
  uint32_t flags = 0;  // msg flags, poll events, splice flags, shutdown how
  uint64_t off = 0;
  uint64_t off2 = 0;
  void *buf = nullptr;
  int pid = 0;
  socklen_t addrlen = 0;
  Op *next_free = nullptr;
  union {
    OpNet net{};
    __kernel_timespec ts;
    siginfo_t si;
  };
};

// The Op a head belongs to: only for heads that are not a stream's own
// (stream == nullptr). The engine has no RTTI; the head says what it is.
inline Op *op_of(OpHead *h) {
  return static_cast<Op *>(h);  // NOLINT(cppcoreguidelines-pro-type-static-cast-downcast)
}

// A contiguous block of the write queue: the queue's own copy, or bytes the
// caller lent (kloop_stream_write_ref), which the queue never frees or fills.
struct Block {
  char *data;
  size_t cap, begin, end;
  uint64_t ref = 0;  // borrowed blocks: the caller's reference
  bool borrowed = false;
};

// Called for each borrowed block the queue lets go of (sent or dropped).
using ReleaseFn = void (*)(void *ctx, uint64_t ref);

// Objects of T (which has a `T *next_free`) kept for reuse, at most kKeep:
// what is given back beyond that is deleted, and so is the rest with the
// list. take() returns nullptr when the list is empty.
template <class T, size_t kKeep>
class FreeList {
 public:
  FreeList() = default;
  FreeList(const FreeList &) = delete;
  FreeList &operator=(const FreeList &) = delete;
  ~FreeList() { clear(); }
  T *take() {
    T *t = head_;
    if (t) {
      head_ = t->next_free;
      --count_;
    }
    return t;
  }
  void give(T *t) {
    if (count_ >= kKeep) {
      delete t;
      return;
    }
    t->next_free = head_;
    head_ = t;
    ++count_;
  }
  void clear() {
    while (T *t = head_) {
      head_ = t->next_free;
      delete t;
    }
    count_ = 0;
  }

 private:
  T *head_ = nullptr;
  size_t count_ = 0;
};

// Free write blocks, kept by the loop so that a stream answering one
// message at a time does not allocate and free a block per message (glibc
// gives a freed block at the top of the heap back to the kernel: a brk call
// per message, and page faults when it grows again). Idle streams still
// hold no write memory. Blocks given back are all kept until the next poll
// starts, which trims the pool: the sends that complete in one poll free
// the blocks that the answers written after it take again, however many
// streams take part, and between polls the loop keeps at most kMaxFree
// standard blocks and kMaxLargeBytes of larger ones for all its streams.
// Larger blocks (a write of more than kBlockSize bytes into an empty
// queue) are made in multiples of kBlockSize, and one is taken again for a
// request of at least half its size. A write of at most kSmallBlock bytes
// into an empty queue -- the answer to one small request -- takes a small
// block: when thousands of streams answer at once, the blocks in flight
// together are what the heap grows by (and keeps, touched, once they are
// freed), and 16 KiB blocks would spread each answer over pages of its own.
// A free block holds the link to the next one (and its size) in its first
// bytes.
class BlockPool {
 public:
  static constexpr size_t kBlockSize = 16384;         // a queue's standard block
  static constexpr size_t kSmallBlock = 2048;         // the first block of a small write
  static constexpr size_t kMaxFree = 32;              // 512 KiB per loop across polls
  static constexpr size_t kMaxFreeSmall = 32;         // 64 KiB per loop across polls
  static constexpr size_t kMaxLargeBytes = 2u << 20;  // larger blocks kept across polls
  static constexpr size_t kLargeScan = 16;            // free large blocks looked at per take
  BlockPool() = default;
  BlockPool(const BlockPool &) = delete;
  BlockPool &operator=(const BlockPool &) = delete;
  ~BlockPool() { trim(0, 0, 0); }
  // A block of at least *cap bytes (kSmallBlock when *cap is at most that,
  // else at least kBlockSize); *cap is set to its size. nullptr without
  // memory.
  char *take(size_t *cap);
  // Gives back a block take() returned, with the size take() set.
  void give(char *data, size_t cap);
  // Free pooled blocks beyond `keep` standard ones, `keep_small` small ones
  // and `keep_large_bytes`.
  void trim(size_t keep, size_t keep_small, size_t keep_large_bytes);
  size_t free_count() const { return count_; }
  size_t free_large_bytes() const { return large_bytes_; }

 private:
  struct FreeBlock {
    FreeBlock *next;
    size_t cap;
  };
  FreeBlock *head_ = nullptr;
  size_t count_ = 0;
  FreeBlock *small_ = nullptr;
  size_t small_count_ = 0;
  FreeBlock *large_ = nullptr;
  size_t large_bytes_ = 0;
};

// Chunked byte queue: append copies, consume frees. Blocks never move, so a
// send in flight can point into them while more bytes are appended. With a
// pool, blocks come from it and go back to it; without one (nullptr), from
// and to the heap. A queue uses the same pool (or none) all its life.
class ByteQueue {
 public:
  ByteQueue() = default;
  ByteQueue(const ByteQueue &) = delete;
  ByteQueue &operator=(const ByteQueue &) = delete;
  ~ByteQueue();
  // false on ENOMEM, nothing appended
  bool append(const void *p, size_t n, BlockPool *pool = nullptr);
  // Queues n bytes at p without copying them; false on ENOMEM.
  bool append_borrowed(const void *p, size_t n, uint64_t ref);
  // Room for n contiguous bytes at the end (a new block if the last one
  // has less); grow() then queues what was written there. nullptr on
  // ENOMEM.
  char *tail(size_t n, BlockPool *pool = nullptr);
  void grow(size_t n);
  // Both report each borrowed block they let go of to `release`, if given.
  void consume(size_t n, BlockPool *pool = nullptr, ReleaseFn release = nullptr,
               void *ctx = nullptr);
  void clear(BlockPool *pool = nullptr, ReleaseFn release = nullptr, void *ctx = nullptr);
  size_t size() const { return bytes_; }
  // iovecs for the first `limit` bytes (all by default)
  int fill_iov(iovec *iov, int max, size_t limit = SIZE_MAX) const;

 private:
  Fifo<Block> blocks_;
  size_t bytes_ = 0;
};

inline constexpr int kMaxIov = 64;

// Encrypted bytes the engine lets wait in write queues for the next poll.
// Sends are gathered into that poll's one io_uring_enter, which pays for
// small writes; but encrypting is slow enough per byte that a batch of
// large TLS writes would keep the first response from the peer until the
// last one is encrypted, and peer and loop would take turns being idle.
// Past this many bytes the waiting sends go out at once (Engine::send_early).
inline constexpr uint64_t kSendEarlyBytes = 65536;

// TLS writes that leave the waiting plaintext at most this large wait for
// the next poll and are encrypted together (Engine::tls_flush_pt()): one
// record for the pieces an iteration wrote, as a response written as head
// and body, instead of one record each. Also the most one record carries
// (RFC 8446 5.1).
inline constexpr size_t kTlsRecordMax = 16384;

// Writes of at least this many bytes to an idle socket stream are sent at
// once (Engine::direct_send) instead of being copied into the queue.
inline constexpr size_t kDirectSendMin = 16384;

// The receive buffers the ring holds at first and at least (Engine::
// flush_recycled()).
inline constexpr uint32_t kRingMinBuffers = 16;

// Returning idle receive memory (Engine::trim_spare()): spare buffers no
// poll took for kTrimAfterNs give their pages back to the kernel, all but
// the kTrimKeep just below the ones in use, and only kTrimMinBatch or more
// at a time.
inline constexpr int64_t kTrimAfterNs = 100'000'000;
inline constexpr uint32_t kTrimKeep = 16;
inline constexpr uint32_t kTrimMinBatch = 8;

// A stack of free buffers (handed out last in, first out) whose bottom
// entries give their pages back when the engine is idle (Engine::
// trim_spare()).
struct IdleTrim {
  uint32_t cold = 0;  // entries [0, cold) hold no pages (never touched, or given back)
  uint32_t low = 0;   // the fewest entries the stack held since Engine::trim_since_
};

// After entries were taken from the stack, which now holds `size`.
inline void trim_taken(IdleTrim &t, size_t size) {
  auto n = static_cast<uint32_t>(size);
  if (n < t.low) t.low = n;
  if (n < t.cold) t.cold = n;
}

// Whether enough of the stack's `size` entries may be given back.
inline bool trim_worth(const IdleTrim &t, size_t size) {
  return size >= size_t{t.cold} + kTrimKeep + kTrimMinBatch;
}

// What a gathered send of more than one block hands the kernel. Taken from
// the engine's pool when the send is prepared, given back when it completes:
// idle streams hold none. Without one (no memory) a send takes one block.
struct SendSlot {
  msghdr msg;
  iovec iov[kMaxIov];
  SendSlot *next_free;
};

// A completion record waiting to be returned, with what must happen when it
// is: a receive buffer to recycle after the next poll, an Op or a Stream to
// free after the next poll.
struct Pending {
  kloop_completion rec;
  int32_t bid = -1;
  Stream *stream = nullptr;  // stream the record belongs to (DATA/EOF filter)
  Op *retire_op = nullptr;
  Stream *retire_stream = nullptr;
};

struct TlsState;  // tls.cc

// An engine-owned stream. Idle, it is this struct and nothing else: write
// memory (queue blocks, a SendSlot) exists while bytes wait to be sent,
// receive buffers while a record holds them.
struct Stream {
  uint64_t token = 0;
  int fd = -1;
  uint32_t flags = 0;
  // read side
  OpHead recv;
  bool recv_armed = false;
  bool recv_cancel = false;
  bool recv_nobufs = false;  // waiting for buffers (ENOBUFS or no own buffer)
  bool paused = false;
  bool read_done = false;  // EOF or error delivered/queued
  // write side
  bool send_inflight = false;
  bool send_cancel = false;
  bool write_failed = false;
  bool over_high = false;
  bool dirty = false;    // on Engine::dirty_ list
  bool starved = false;  // on Engine::starved_ list
  OpHead send;
  Stream *next_dirty = nullptr;
  Stream *next_starved = nullptr;
  ByteQueue wq;
  // the send in flight: one block in iov1 (sent with send/write), or a
  // gathered sendmsg/writev through slot
  SendSlot *slot = nullptr;
  iovec iov1{};
  uint64_t high = 65536, low = 16384;
  // shutdown / close
  OpHead shut;
  bool shut_req = false, shut_inflight = false, shut_done = false;
  bool close_inflight = false;
  bool closing = false, aborting = false, finished = false;
  OpHead close_op;
  int close_err = 0;
  // read records kept while paused, delivered in order on resume
  Fifo<Pending> held;
  // TLS (kloop_stream_start_tls), else null; freed by delete_stream()
  TlsState *tls = nullptr;
};

// Thousands of idle connections are thousands of these: a guard against
// growing it by accident (tests/engine/test_memory.cc measures the whole
// heap share of an idle stream).
static_assert(sizeof(OpHead) == 16);
static_assert(sizeof(Stream) <= 320, "an idle stream must stay small");

// Frees a Stream and its TLS state (tls.cc). Every Stream goes this way.
void delete_stream(Stream *s);

class Engine {
 public:
  Engine() = default;
  ~Engine();
  Engine(const Engine &) = delete;
  Engine &operator=(const Engine &) = delete;

  int init(const kloop_config &cfg);
  void destroy();  // cancel all, wait for the kernel, free
  bool forked() const;

  int poll(kloop_completion *out, uint32_t max, int64_t timeout_ns);
  int wake();
  int caps(kloop_caps *c) const;
  int stats(kloop_stats *s) const;
  int ring_fd() const { return ring_.ring_fd; }
  void arena(uint64_t *base, uint64_t *size) const;

  // one-shot / multishot operations
  int submit_op(OpKind kind, uint64_t token, const Op &args);
  int cancel(uint64_t token);
  int cancel_fd(int fd);
  int submit_now();

  // streams
  int stream_attach(uint64_t token, int fd, uint32_t flags);
  int stream_pause(uint64_t token, bool pause);
  int64_t stream_write(uint64_t token, const void *buf, size_t len);
  size_t direct_send(Stream *s, const void *buf, size_t len);
  int64_t stream_write_ref(uint64_t token, const void *buf, size_t len, uint64_t ref);
  int stream_set_limits(uint64_t token, uint64_t high, uint64_t low);
  int64_t stream_write_size(uint64_t token);
  int stream_shutdown(uint64_t token);
  int stream_close(uint64_t token);
  int stream_abort(uint64_t token);
  int stream_start_tls(uint64_t token, void *ssl);
  int stream_tls_error(uint64_t token, kloop_tls_error *out);

  // The TLS BIO's callbacks (tls.cc)
  int tls_bio_read(TlsState *t, char *out, size_t len);
  bool tls_bio_write(TlsState *t, const char *in, size_t len);
  bool tls_set_key(TlsState *t, bool tx, const void *crypto_info);

  uint64_t enabled() const { return enabled_; }

 private:
  // ring plumbing
  io_uring_sqe *get_sqe();
  int enter_if_needed();
  bool ensure_enabled();
  int enable();
  int wait_once(int64_t timeout_ns);
  static int64_t now_ns();
  bool kernel_has_work() const;
  void queue_cancel(const OpHead *target);
  void prep(io_uring_sqe *sqe, OpHead *h);
  static void prep_op(io_uring_sqe *sqe, Op *op);
  void prep_stream(io_uring_sqe *sqe, OpHead *op);
  void arm(OpHead *op);
  void handle_cqe(const io_uring_cqe *cqe);
  void handle_op_cqe(Op *op, int res, uint32_t cflags);
  void handle_stream_cqe(OpHead *op, int res, uint32_t cflags);
  void emit(uint64_t token, int32_t res, uint32_t flags, uint64_t data, uint32_t event,
            uint32_t aux, int32_t bid = -1, Stream *s = nullptr);
  void finish_op(Op *op, int32_t res, uint64_t data = 0, uint32_t aux = 0);
  void reap(size_t space);

  // ops
  Op *alloc_op();
  void free_op(Op *op);
  SendSlot *take_slot();
  void give_slot(SendSlot *slot);
  bool token_in_use(uint64_t token) const;
  bool fd_ref(int fd);
  bool reserve_records(size_t n) { return pending_.reserve(pending_.size() + n); }
  void add_starved(Stream *s);
  void unlink(Stream *s);
  // The stream's write queue: consume sent bytes / drop all, with a
  // WRITE_RELEASE record for each borrowed block let go of.
  void wq_consume(Stream *s, size_t n);
  void wq_clear(Stream *s);
  static void released(void *ctx, uint64_t ref);
  void fd_unref(int fd);

  // buffers
  bool setup_buffers();
  bool setup_tls_buffers();
  char *buf_addr(uint32_t bid) const { return arena_ + static_cast<size_t>(bid) * buf_size_; }
  void recycle(uint32_t bid);
  void took_ring_buffer() {
    ++buffers_in_use_;
    --ring_avail_;
    ++ring_taken_;
  }
  int take_own_buffer();
  void flush_recycled();
  bool trim_wanted() const;
  void trim_spare(int64_t now);
  void release_cold(Vec<uint32_t> &stack, IdleTrim &t);

  // streams
  Stream *find_stream(uint64_t token) const;
  void progress(Stream *s);
  void mark_dirty(Stream *s);
  void arm_recv(Stream *s);
  void submit_send(Stream *s);
  int send_iov(Stream *s, size_t limit, iovec **iov);
  void send_ended(Stream *s);
  static bool may_send_before_poll(const Stream *s);
  void send_early();
  void send_prompt();
  void stream_finish(Stream *s, int err);
  void drop_held(Stream *s);

  // TLS streams (tls.cc)
  void tls_pump(Stream *s);
  void tls_input(Stream *s, int32_t bid, uint32_t off, uint32_t len);
  void tls_socket_eof(Stream *s);
  void tls_socket_error(Stream *s, int err);
  void tls_fail(Stream *s, int err, int ssl_error, bool handshake, uint32_t side);
  bool tls_encrypt(Stream *s, const void *buf, size_t len);
  bool tls_seal(Stream *s, uint8_t type, const void *buf, size_t len);
  static bool tls_seal_key(TlsState *t, const void *crypto_info);
  bool tls_open_key(TlsState *t, const void *crypto_info) const;
  void tls_open13(Stream *s) const;
  int tls_open(Stream *s, bool drop);
  bool tls_read(Stream *s, bool drop);
  void tls_wait_buffer(Stream *s);
  void tls_drop_input(TlsState *t);
  void tls_fail_record(Stream *s, int alert, int reason);
  bool tls_flush_pt(Stream *s);
  bool tls_stage(TlsState *t, const void *buf, size_t len);
  void tls_drop_stage(TlsState *t);
  void tls_release(Stream *s);
  inline void tls_touch(Stream *s);  // tls.h
  static void tls_unwarm(Stream *s);
  void tls_trim();
  int take_tls_buffer();
  void tls_unstarve();
  bool tls_prep_send(Stream *s, io_uring_sqe *sqe);
  static void tls_sent(Stream *s, size_t n);
  bool tls_apply_tx_key(Stream *s);
  bool tls_prep_recv(Stream *s, io_uring_sqe *sqe);
  bool tls_recv_cqe(Stream *s, OpHead *op, int res, uint32_t cflags);
  static uint16_t tls_recv_mode(const Stream *s);
  bool is_tls_buffer(uint32_t bid) const { return bid >= buf_count_; }

  io_uring ring_{};
  bool ring_ok_ = false;
  bool enabled_ring_ = true;  // false while IORING_SETUP_R_DISABLED is pending
  unsigned setup_flags_ = 0;
  uint32_t features_ = 0;
  uint64_t kernel_caps_ = 0;
  uint64_t enabled_ = 0;
  uint8_t opcodes_[256] = {};
  uint32_t sq_entries_ = 0, cq_entries_ = 0;
  unsigned fork_gen_ = 0;

  // receive buffers: one arena, used through a buffer ring or handed out
  // from a free list (KLOOP_CAP_BUF_RING off)
  char *arena_ = nullptr;
  size_t arena_size_ = 0;
  uint32_t buf_size_ = 0, buf_count_ = 0;
  bool no_send_gather_ = false;  // KLOOP_CONFIG_NO_SEND_GATHER
  bool no_direct_send_ = false;  // KLOOP_CONFIG_NO_DIRECT_SEND
  bool no_tls_seal_ = false;     // KLOOP_CONFIG_NO_TLS_SEAL
  bool send_after_wait_ = true;  // not KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT
  io_uring_buf_ring *br_ = nullptr;
  size_t br_size_ = 0;
  bool br_registered_ = false;
  Vec<uint32_t> handed_out_;  // returned by the last poll
  Vec<uint32_t> own_free_;    // free list without buffer ring
  uint32_t buffers_in_use_ = 0;
  // With the buffer ring: the ring holds only about ring_target_ buffers at
  // a time, topped up at each poll from ring_spare_, the buffers returned
  // since, most recently returned first. See Engine::flush_recycled().
  Vec<uint32_t> ring_spare_;
  uint32_t ring_avail_ = 0;   // buffers in the ring the kernel has not taken
  uint32_t ring_target_ = 0;  // what the ring is topped up to at each poll
  uint32_t ring_taken_ = 0;   // buffers the kernel took since the last top-up
  IdleTrim spare_trim_;       // of ring_spare_
  int64_t trim_since_ = 0;    // see Engine::trim_spare()
  bool can_trim_ = false;     // buffers are whole pages
  // TLS plaintext buffers: the arena's last tls_buf_count_ buffers, never
  // given to the kernel; bids buf_count_ .. buf_count_ + tls_buf_count_ - 1
  uint32_t tls_buf_count_ = 0;
  Vec<uint32_t> tls_free_;
  IdleTrim tls_trim_;  // of tls_free_
  uint32_t tls_in_use_ = 0;
  bool ktls_ulp_missing_ = false;  // setsockopt(TCP_ULP, "tls") said ENOENT once
  Stream *tls_starved_ = nullptr;  // intrusive (TlsState::next_starved): TLS
                                   // streams waiting for a plaintext buffer
  Stream *tls_warm_ = nullptr;     // intrusive, doubly linked (TlsState::
                                   // next_warm): SSLs that may hold record
                                   // buffers the engine frees when idle
  int pending_recycle_ = 0;        // buffers added to the ring, not yet published

  IntMap<uint64_t, Op *> ops_;
  IntMap<uint64_t, Stream *> streams_;
  IntMap<int, uint32_t> fd_ops_;
  Vec<Op *> wait_close_;       // close ops waiting for their fd to drain
  Stream *dirty_ = nullptr;    // intrusive: work to queue at next poll
  Stream *starved_ = nullptr;  // intrusive: waiting for receive buffers
  Fifo<Pending> pending_;      // records not yet returned
  uint64_t borrowed_ = 0;      // borrowed write blocks not yet released
  Vec<Op *> retire_ops_;       // free at the next poll
  Vec<Stream *> retire_streams_;
  FreeList<Op, 1024> free_ops_;
  FreeList<SendSlot, 16> free_slots_;  // kept for the next gathered sends
  // Bytes OpenSSL encrypted into write queues since the last poll or early
  // send (see Engine::send_early).
  uint64_t encrypted_unsent_ = 0;
  // The last poll found nothing ready and waited: until the next poll, the
  // TLS stream written last (prompt_) sends its records as soon as the loop
  // writes to another stream (see Engine::send_prompt).
  bool idle_poll_ = false;
  Stream *prompt_ = nullptr;
  BlockPool wblocks_;  // free write blocks for the streams' queues

  // wake-up
  int wake_fd_ = -1;
  Op wake_op_;
  uint64_t wake_buf_ = 0;
  std::atomic<bool> wake_pending_{false};

  Op *timer_ = nullptr;        // the wait's own timer, while in the kernel
  uint64_t ignored_cqes_ = 0;  // CQEs that carry no record (cancel results, timers)
  uint64_t in_flight_ = 0;     // SQEs whose final CQE has not been reaped
  kloop_stats st_{};
  bool in_destroy_ = false;
};

extern std::atomic<unsigned> g_fork_generation;

}  // namespace kl
