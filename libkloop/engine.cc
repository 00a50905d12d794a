// Ring setup, the operation table, completion dispatch and the poll call.
//
// Lifetime rule: an Op's address is the user_data of its SQEs. It is freed
// only after (a) the kernel has posted its final CQE and (b) the record that
// reports it has been returned by kloop_poll() and the next poll started
// (the record may point into the Op, e.g. an accepted peer's address).
#include "engine.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <new>

#include "compat.h"
#include "probe.h"

namespace kl {

std::atomic<unsigned> g_fork_generation{0};

namespace {
// user_data of SQEs whose CQEs carry nothing for anyone (async cancel).
constexpr uint64_t kIgnoreUdata = 0;

bool is_stream_kind(OpKind k) {
  return k == OpKind::StreamRecv || k == OpKind::StreamSend || k == OpKind::StreamShutdown ||
         k == OpKind::StreamClose;
}
}  // namespace

// ---------------------------------------------------------------------------
// BlockPool

char *BlockPool::take(size_t *cap) {
  if (*cap <= kSmallBlock) {
    *cap = kSmallBlock;
    if (small_) {
      FreeBlock *b = small_;
      small_ = b->next;
      --small_count_;
      return reinterpret_cast<char *>(b);
    }
    return static_cast<char *>(::operator new(kSmallBlock, std::nothrow));
  }
  if (*cap <= kBlockSize) {
    *cap = kBlockSize;
    if (head_) {
      FreeBlock *b = head_;
      head_ = b->next;
      --count_;
      return reinterpret_cast<char *>(b);
    }
    return static_cast<char *>(::operator new(kBlockSize, std::nothrow));
  }
  size_t want = (*cap + kBlockSize - 1) / kBlockSize * kBlockSize;
  FreeBlock **link = &large_;
  for (size_t i = 0; *link && i < kLargeScan; ++i, link = &(*link)->next) {
    FreeBlock *b = *link;
    if (b->cap >= want && b->cap / 2 <= want) {
      *link = b->next;
      large_bytes_ -= b->cap;
      *cap = b->cap;
      return reinterpret_cast<char *>(b);
    }
  }
  char *d = static_cast<char *>(::operator new(want, std::nothrow));
  if (d) *cap = want;
  return d;
}

void BlockPool::give(char *data, size_t cap) {
  auto *b = reinterpret_cast<FreeBlock *>(data);
  b->cap = cap;
  if (cap == kBlockSize) {
    b->next = head_;
    head_ = b;
    ++count_;
  } else if (cap == kSmallBlock) {
    b->next = small_;
    small_ = b;
    ++small_count_;
  } else {
    b->next = large_;
    large_ = b;
    large_bytes_ += cap;
  }
}

void BlockPool::trim(size_t keep, size_t keep_small, size_t keep_large_bytes) {
  while (count_ > keep) {
    FreeBlock *next = head_->next;
    ::operator delete(head_);
    head_ = next;
    --count_;
  }
  while (small_count_ > keep_small) {
    FreeBlock *next = small_->next;
    ::operator delete(small_);
    small_ = next;
    --small_count_;
  }
  // Keep the first blocks of the list (the ones given back last) up to the
  // byte bound; free the rest.
  FreeBlock **link = &large_;
  size_t kept = 0;
  while (*link && kept + (*link)->cap <= keep_large_bytes) {
    kept += (*link)->cap;
    link = &(*link)->next;
  }
  FreeBlock *b = *link;
  *link = nullptr;
  while (b) {
    FreeBlock *next = b->next;
    large_bytes_ -= b->cap;
    ::operator delete(b);
    b = next;
  }
}

// ---------------------------------------------------------------------------
// ByteQueue

namespace {
char *alloc_block(BlockPool *pool, size_t *cap) {
  return pool ? pool->take(cap) : static_cast<char *>(::operator new(*cap, std::nothrow));
}

void free_block(BlockPool *pool, char *data, size_t cap) {
  if (pool)
    pool->give(data, cap);
  else
    ::operator delete(data);
}
}  // namespace

// Borrowed blocks are the caller's: kloop_destroy() only stops reading them.
ByteQueue::~ByteQueue() { clear(); }

bool ByteQueue::append(const void *p, size_t n, BlockPool *pool) {
  const char *src = static_cast<const char *>(p);
  size_t take = 0;
  if (!blocks_.empty()) {
    Block &b = blocks_.at(blocks_.size() - 1);
    size_t room = b.cap - b.end;
    take = room < n ? room : n;
  }
  if (take < n) {
    // Allocate the new block first, so a failure leaves the queue as it was.
    size_t rest = n - take;
    size_t cap = rest < BlockPool::kBlockSize ? BlockPool::kBlockSize : rest;
    if (blocks_.empty() && rest <= BlockPool::kSmallBlock) cap = BlockPool::kSmallBlock;
    char *d = alloc_block(pool, &cap);
    if (!d) return false;
    if (!blocks_.push_back(Block{d, cap, 0, 0})) {
      free_block(pool, d, cap);
      return false;
    }
    if (take) {
      Block &prev = blocks_.at(blocks_.size() - 2);
      memcpy(prev.data + prev.end, src, take);
      prev.end += take;
    }
    Block &nb = blocks_.at(blocks_.size() - 1);
    memcpy(nb.data, src + take, rest);
    nb.end = rest;
  } else if (take) {
    Block &b = blocks_.at(blocks_.size() - 1);
    memcpy(b.data + b.end, src, take);
    b.end += take;
  }
  bytes_ += n;
  return true;
}

char *ByteQueue::tail(size_t n, BlockPool *pool) {
  if (!blocks_.empty()) {
    Block &b = blocks_.at(blocks_.size() - 1);
    if (b.cap - b.end >= n) return b.data + b.end;  // never a borrowed block: cap == end
  }
  size_t cap = n < BlockPool::kBlockSize ? BlockPool::kBlockSize : n;
  if (blocks_.empty() && n <= BlockPool::kSmallBlock) cap = BlockPool::kSmallBlock;
  char *d = alloc_block(pool, &cap);
  if (!d) return nullptr;
  if (!blocks_.push_back(Block{d, cap, 0, 0})) {
    free_block(pool, d, cap);
    return nullptr;
  }
  return d;
}

void ByteQueue::grow(size_t n) {
  blocks_.at(blocks_.size() - 1).end += n;
  bytes_ += n;
}

bool ByteQueue::append_borrowed(const void *p, size_t n, uint64_t ref) {
  // cap == end: append() never copies into a borrowed block.
  Block b{static_cast<char *>(const_cast<void *>(p)), n, 0, n};
  b.ref = ref;
  b.borrowed = true;
  if (!blocks_.push_back(b)) return false;
  bytes_ += n;
  return true;
}

void ByteQueue::consume(size_t n, BlockPool *pool, ReleaseFn release, void *ctx) {
  while (n && !blocks_.empty()) {
    Block &b = blocks_.front();
    size_t avail = b.end - b.begin;
    size_t take = avail < n ? avail : n;
    b.begin += take;
    bytes_ -= take;
    n -= take;
    if (b.begin == b.end) {
      // An idle stream keeps no write memory: with thousands of mostly idle
      // connections a cached block each costs more than malloc saves (the
      // loop's pool keeps a bounded few for all of them).
      if (!b.borrowed)
        free_block(pool, b.data, b.cap);
      else if (release)
        release(ctx, b.ref);
      blocks_.pop_front();
    }
  }
  if (blocks_.empty()) blocks_.release();  // nor the block list's array
}

void ByteQueue::clear(BlockPool *pool, ReleaseFn release, void *ctx) {
  for (size_t i = 0; i < blocks_.size(); ++i) {
    Block &b = blocks_.at(i);
    if (!b.borrowed)
      free_block(pool, b.data, b.cap);
    else if (release)
      release(ctx, b.ref);
  }
  blocks_.release();
  bytes_ = 0;
}

int ByteQueue::fill_iov(iovec *iov, int max, size_t limit) const {
  int n = 0;
  for (size_t i = 0; i < blocks_.size() && n < max && limit > 0; ++i) {
    const Block &b = blocks_.at(i);
    if (b.end == b.begin) continue;
    size_t len = b.end - b.begin;
    if (len > limit) len = limit;
    iov[n].iov_base = b.data + b.begin;
    iov[n].iov_len = len;
    limit -= len;
    ++n;
  }
  return n;
}

// ---------------------------------------------------------------------------
// Setup and teardown

Engine::~Engine() = default;

bool Engine::forked() const {
  return fork_gen_ != g_fork_generation.load(std::memory_order_relaxed);
}

int Engine::init(const kloop_config &cfg) {
  ProbeResult pr;
  int rc = probe_kernel(&pr);
  if (rc < 0) return rc;
  features_ = pr.features;
  kernel_caps_ = pr.caps;
  memcpy(opcodes_, pr.opcodes, sizeof(opcodes_));

  uint64_t en = kernel_caps_ & ~cfg.disable;
  if (cfg.flags & KLOOP_CONFIG_NO_DEFER_TASKRUN)
    en &= ~(KLOOP_CAP_SINGLE_ISSUER | KLOOP_CAP_DEFER_TASKRUN);
  if (cfg.flags & KLOOP_CONFIG_SQPOLL) en &= ~KLOOP_CAP_DEFER_TASKRUN;  // not allowed together
  if (!(en & KLOOP_CAP_SINGLE_ISSUER)) en &= ~KLOOP_CAP_DEFER_TASKRUN;
  if (!(en & KLOOP_CAP_BUF_RING))
    en &= ~(KLOOP_CAP_MULTISHOT_RECV | KLOOP_CAP_RECV_BUNDLE | KLOOP_CAP_BUF_RING_INC);

  io_uring_params p{};
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
  p.cq_entries = cfg.cq_entries;
  if (cfg.flags & KLOOP_CONFIG_SQPOLL) {
    p.flags |= IORING_SETUP_SQPOLL;
    p.sq_thread_idle = cfg.sqpoll_idle_ms;
  }
  if (en & KLOOP_CAP_SINGLE_ISSUER) {
    // R_DISABLED: the ring is bound to the thread that first polls it, not
    // to the one that created it (Python may create a loop in one thread and
    // run it in another).
    p.flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_R_DISABLED;
    // TASKRUN_FLAG: the kernel flags deferred completions in the SQ ring,
    // so a poll that does not wait can skip io_uring_enter when none are
    // pending and nothing is queued.
    if (en & KLOOP_CAP_DEFER_TASKRUN)
      p.flags |= IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  } else if (!(cfg.flags & KLOOP_CONFIG_SQPOLL)) {
    p.flags |= IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  }
  rc = io_uring_queue_init_params(cfg.sq_entries, &ring_, &p);
  if (rc < 0 && (p.flags & (IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL))) {
    // Kernels before 5.18/5.19 reject these flags; they are optimisations.
    p = io_uring_params{};
    p.flags = IORING_SETUP_CQSIZE | (cfg.flags & KLOOP_CONFIG_SQPOLL ? IORING_SETUP_SQPOLL : 0);
    p.cq_entries = cfg.cq_entries;
    p.sq_thread_idle = cfg.sqpoll_idle_ms;
    en &= ~(KLOOP_CAP_SINGLE_ISSUER | KLOOP_CAP_DEFER_TASKRUN);
    rc = io_uring_queue_init_params(cfg.sq_entries, &ring_, &p);
  }
  if (rc < 0) return rc;
  ring_ok_ = true;
  setup_flags_ = p.flags;
  enabled_ring_ = !(p.flags & IORING_SETUP_R_DISABLED);
  sq_entries_ = p.sq_entries;
  cq_entries_ = p.cq_entries;
  features_ = p.features;
  if (!(en & KLOOP_CAP_EXT_ARG)) {
    // liburing falls back to a timeout SQE when it believes the kernel has
    // no IORING_FEAT_EXT_ARG; clearing the bit forces that path.
    ring_.features &= ~IORING_FEAT_EXT_ARG;
  }
  if (!(features_ & IORING_FEAT_NODROP)) en &= ~KLOOP_CAP_NODROP;
  // A registered ring fd lives in the registering thread's io_uring
  // context: other threads cannot use it. Register it only for a ring that
  // one thread owns, and only in that thread (ensure_enabled).
  if (!(en & KLOOP_CAP_SINGLE_ISSUER)) en &= ~KLOOP_CAP_REG_RING_FD;
  enabled_ = en;

  no_send_gather_ = (cfg.flags & KLOOP_CONFIG_NO_SEND_GATHER) != 0;
  no_direct_send_ = (cfg.flags & KLOOP_CONFIG_NO_DIRECT_SEND) != 0;
  no_tls_seal_ = (cfg.flags & KLOOP_CONFIG_NO_TLS_SEAL) != 0;
  send_after_wait_ = (cfg.flags & KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT) == 0;
  buf_size_ = cfg.buf_size;
  buf_count_ = cfg.buf_count;
  if (!setup_buffers() || !setup_tls_buffers()) {
    destroy();
    return -ENOMEM;
  }

  wake_fd_ = eventfd(0, EFD_CLOEXEC);
  if (wake_fd_ < 0) {
    int e = -errno;
    destroy();
    return e;
  }
  wake_op_.kind = OpKind::Wake;
  wake_op_.fd = wake_fd_;
  wake_op_.buf = &wake_buf_;
  wake_op_.len = sizeof(wake_buf_);
  arm(&wake_op_);

  fork_gen_ = g_fork_generation.load(std::memory_order_relaxed);
  st_.size = sizeof(st_);
  return 0;
}

bool Engine::setup_buffers() {
  // A quarter as many again (8..64) for TLS plaintext, after the receive buffers.
  tls_buf_count_ = buf_count_ / 4 < 8 ? 8 : (buf_count_ / 4 > 64 ? 64 : buf_count_ / 4);
  arena_size_ = static_cast<size_t>(buf_size_) * (buf_count_ + tls_buf_count_);
  void *a = mmap(nullptr, arena_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (a == MAP_FAILED) {
    arena_ = nullptr;
    return false;
  }
  arena_ = static_cast<char *>(a);
  long page = sysconf(_SC_PAGESIZE);
  can_trim_ = page > 0 && buf_size_ % static_cast<uint32_t>(page) == 0;
  if (enabled_ & KLOOP_CAP_BUF_RING) {
    br_size_ = sizeof(io_uring_buf) * buf_count_;
    void *r = mmap(nullptr, br_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) return false;
    br_ = static_cast<io_uring_buf_ring *>(r);
    io_uring_buf_ring_init(br_);
    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<uint64_t>(br_);
    reg.ring_entries = buf_count_;
    reg.bgid = 0;
    if (io_uring_register_buf_ring(&ring_, &reg, 0) < 0) {
      // Treat as absent: fall back to engine-managed buffers.
      munmap(br_, br_size_);
      br_ = nullptr;
      enabled_ &= ~(KLOOP_CAP_BUF_RING | KLOOP_CAP_MULTISHOT_RECV | KLOOP_CAP_RECV_BUNDLE |
                    KLOOP_CAP_BUF_RING_INC);
    } else {
      br_registered_ = true;
      if (!ring_spare_.reserve(buf_count_)) return false;
      ring_target_ = buf_count_ < kRingMinBuffers ? buf_count_ : kRingMinBuffers;
      for (uint32_t i = buf_count_; i-- > ring_target_;) ring_spare_.push_back(i);
      spare_trim_.cold = spare_trim_.low = static_cast<uint32_t>(ring_spare_.size());  // untouched
      int mask = io_uring_buf_ring_mask(buf_count_);
      for (uint32_t i = 0; i < ring_target_; ++i)
        io_uring_buf_ring_add(br_, buf_addr(i), buf_size_, static_cast<unsigned short>(i), mask,
                              static_cast<int>(i));
      io_uring_buf_ring_advance(br_, static_cast<int>(ring_target_));
      ring_avail_ = ring_target_;
      return true;
    }
  }
  if (!own_free_.reserve(buf_count_)) return false;
  for (uint32_t i = buf_count_; i-- > 0;) own_free_.push_back(i);
  return true;
}

bool Engine::setup_tls_buffers() {
  if (!tls_free_.reserve(tls_buf_count_)) return false;
  for (uint32_t i = tls_buf_count_; i-- > 0;) tls_free_.push_back(buf_count_ + i);
  tls_trim_.cold = tls_trim_.low = tls_buf_count_;  // untouched
  return true;
}

void Engine::destroy() {
  in_destroy_ = true;
  bool can_wait = ring_ok_ && !forked();
  if (can_wait && !enabled_ring_) {
    // Never enabled: the kernel has seen no SQE, nothing is in flight.
    can_wait = false;
    in_flight_ = 0;
  }
  bool kernel_may_hold_memory = false;
  if (can_wait && in_flight_ > 0) {
    // Cancel everything the kernel holds, then reap until it let go.
    ops_.for_each([&](uint64_t, Op *op) {
      if (op->state & kOpInKernel) queue_cancel(op);
    });
    streams_.for_each([&](uint64_t, Stream *s) {
      if (s->finished) return;
      if (s->recv_armed) queue_cancel(&s->recv);
      if (s->send_inflight) queue_cancel(&s->send);
      if (s->shut_inflight) queue_cancel(&s->shut);
    });
    queue_cancel(&wake_op_);
    if (timer_) queue_cancel(timer_);
    for (int spins = 0; in_flight_ > 0 && spins < 500; ++spins) {
      __kernel_timespec ts{0, 10LL * 1000 * 1000};
      io_uring_cqe *cqe = nullptr;
      int rc = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
      if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) break;
      io_uring_cqe *cqes[64];
      unsigned n;
      while ((n = io_uring_peek_batch_cqe(&ring_, cqes, 64)) > 0) {
        for (unsigned i = 0; i < n; ++i) {
          uint64_t ud = cqes[i]->user_data;
          if (ud == kIgnoreUdata || ud == LIBURING_UDATA_TIMEOUT) continue;
          if (cqes[i]->flags & IORING_CQE_F_MORE) continue;
          auto *h = reinterpret_cast<OpHead *>(ud);
          if (h->state & kOpInKernel) {
            h->state &= static_cast<uint16_t>(~kOpInKernel);
            --in_flight_;
          }
          // An accepted fd nobody will see must not leak.
          if (h->kind == OpKind::Accept && cqes[i]->res >= 0) close(cqes[i]->res);
          if (h->kind == OpKind::Timer) {
            Op *op = op_of(h);
            if (timer_ == op) timer_ = nullptr;
            free_op(op);
          }
        }
        io_uring_cq_advance(&ring_, n);
      }
    }
    kernel_may_hold_memory = in_flight_ > 0;
  } else if (ring_ok_ && forked()) {
    // After fork the parent still owns the ring and its operations; the
    // child only drops its copies of the mappings and fds.
    in_flight_ = 0;
  }
  if (ring_ok_) {
    io_uring_queue_exit(&ring_);
    ring_ok_ = false;
  }
  if (kernel_may_hold_memory) return;  // leak rather than let the kernel write freed memory

  bool child = forked();
  ops_.for_each([&](uint64_t, Op *op) {
    if (op->state & kOpFinished) return;  // owned by its record in pending_
    if (op->kind == OpKind::ChildPidfd && op->fd2 >= 0) close(op->fd2);
    delete op;
  });
  ops_.clear();
  wait_close_.clear();  // its ops were in ops_
  streams_.for_each([&](uint64_t, Stream *s) {
    if (s->finished) return;  // owned by its CLOSED record in pending_
    if (!child && (s->flags & KLOOP_STREAM_CLOSE_FD) && s->fd >= 0 && !s->close_inflight)
      close(s->fd);
    delete_stream(s);
  });
  streams_.clear();
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending &p = pending_.at(i);
    delete p.retire_op;
    if (p.retire_stream) delete_stream(p.retire_stream);
  }
  pending_.clear();
  for (Op *op : retire_ops_) delete op;
  retire_ops_.clear();
  for (Stream *s : retire_streams_) delete_stream(s);
  retire_streams_.clear();
  free_ops_.clear();
  free_slots_.clear();
  wblocks_.trim(0, 0, 0);
  if (wake_fd_ >= 0) close(wake_fd_);
  wake_fd_ = -1;
  if (br_) munmap(br_, br_size_);
  br_ = nullptr;
  if (arena_) munmap(arena_, arena_size_);
  arena_ = nullptr;
}

// ---------------------------------------------------------------------------
// Queries

int Engine::caps(kloop_caps *c) const {
  c->features = features_;
  c->kernel = kernel_caps_;
  c->enabled = enabled_;
  c->sq_entries = sq_entries_;
  c->cq_entries = cq_entries_;
  c->buf_size = buf_size_;
  c->buf_count = buf_count_;
  memcpy(c->opcodes, opcodes_, sizeof(c->opcodes));
  return 0;
}

int Engine::stats(kloop_stats *s) const {
  kloop_stats out = st_;
  out.size = sizeof(out);
  out.ops_in_flight = in_flight_ > 0 ? in_flight_ - ((wake_op_.state & kOpInKernel) ? 1 : 0) : 0;
  out.streams = streams_.size();
  out.buffers_in_use = buffers_in_use_ + tls_in_use_;
  if (ring_ok_ && ring_.cq.koverflow) out.cq_overflows = *ring_.cq.koverflow;
  *s = out;
  return 0;
}

void Engine::arena(uint64_t *base, uint64_t *size) const {
  *base = reinterpret_cast<uint64_t>(arena_);
  *size = arena_size_;
}

// ---------------------------------------------------------------------------
// SQE plumbing

int Engine::enable() {
  if (enabled_ring_) return 0;
  int rc = compat::enable_rings(ring_.ring_fd);
  if (rc < 0) return rc;
  enabled_ring_ = true;
  if ((enabled_ & KLOOP_CAP_REG_RING_FD) && io_uring_register_ring_fd(&ring_) != 1)
    enabled_ &= ~KLOOP_CAP_REG_RING_FD;
  return 0;
}

bool Engine::ensure_enabled() { return enable() == 0; }

io_uring_sqe *Engine::get_sqe() {
  io_uring_sqe *sqe = io_uring_get_sqe(&ring_);
  if (sqe) return sqe;
  // SQ full: hand what is queued to the kernel to make room.
  if (!ensure_enabled()) return nullptr;
  ++st_.enters;
  int rc = io_uring_submit(&ring_);
  (void)rc;
  sqe = io_uring_get_sqe(&ring_);
  return sqe;
}

void Engine::queue_cancel(const OpHead *target) {
  io_uring_sqe *sqe = get_sqe();
  if (!sqe) return;
  io_uring_prep_cancel64(sqe, reinterpret_cast<uint64_t>(target), 0);
  io_uring_sqe_set_data64(sqe, kIgnoreUdata);
  ++st_.sqes;
}

void Engine::prep(io_uring_sqe *sqe, OpHead *h) {
  if (h->stream)
    prep_stream(sqe, h);
  else
    prep_op(sqe, op_of(h));
}

void Engine::prep_op(io_uring_sqe *sqe, Op *op) {
  if (op->state & kOpPollRetry) {
    io_uring_prep_poll_add(sqe, op->fd, op->off2 /* events stored for retry */);
    return;
  }
  switch (op->kind) {
    case OpKind::Nop:
      io_uring_prep_nop(sqe);
      break;
    case OpKind::Accept:
      if (op->state & kOpKernelMulti) {
        io_uring_prep_multishot_accept(sqe, op->fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      } else {
        op->addrlen = sizeof(op->net.addr);
        io_uring_prep_accept(sqe, op->fd, reinterpret_cast<sockaddr *>(&op->net.addr), &op->addrlen,
                             SOCK_CLOEXEC | SOCK_NONBLOCK);
      }
      break;
    case OpKind::Connect:
      io_uring_prep_connect(sqe, op->fd, reinterpret_cast<sockaddr *>(&op->net.addr), op->addrlen);
      break;
    case OpKind::Recv:
      io_uring_prep_recv(sqe, op->fd, op->buf, op->len, static_cast<int>(op->flags));
      break;
    case OpKind::Send:
      io_uring_prep_send(sqe, op->fd, op->buf, op->len, static_cast<int>(op->flags | MSG_NOSIGNAL));
      break;
    case OpKind::RecvMsg: {
      OpNet &n = op->net;
      n.iov = {op->buf, op->len};
      n.msg = {};
      n.msg.msg_name = &n.addr;
      n.msg.msg_namelen = sizeof(n.addr);
      n.msg.msg_iov = &n.iov;
      n.msg.msg_iovlen = 1;
      io_uring_prep_recvmsg(sqe, op->fd, &n.msg, op->flags);
      break;
    }
    case OpKind::SendMsg: {
      OpNet &n = op->net;
      n.iov = {op->buf, op->len};
      n.msg = {};
      n.msg.msg_name = op->addrlen ? &n.addr : nullptr;
      n.msg.msg_namelen = op->addrlen;
      n.msg.msg_iov = &n.iov;
      n.msg.msg_iovlen = 1;
      io_uring_prep_sendmsg(sqe, op->fd, &n.msg, op->flags | MSG_NOSIGNAL);
      break;
    }
    case OpKind::Read:
      io_uring_prep_read(sqe, op->fd, op->buf, op->len, op->off);
      break;
    case OpKind::Write:
      io_uring_prep_write(sqe, op->fd, op->buf, op->len, op->off);
      break;
    case OpKind::Poll:
      if (op->state & kOpKernelMulti)
        io_uring_prep_poll_multishot(sqe, op->fd, op->flags);
      else
        io_uring_prep_poll_add(sqe, op->fd, op->flags);
      break;
    case OpKind::Timeout:
    case OpKind::Timer:
      io_uring_prep_timeout(sqe, &op->ts, 0, 0);
      break;
    case OpKind::Shutdown:
      io_uring_prep_shutdown(sqe, op->fd, static_cast<int>(op->flags));
      break;
    case OpKind::Close:
      io_uring_prep_close(sqe, op->fd);
      break;
    case OpKind::Splice:
      io_uring_prep_splice(sqe, op->fd, static_cast<int64_t>(op->off), op->fd2,
                           static_cast<int64_t>(op->off2), op->len, op->flags);
      break;
    case OpKind::ChildWaitid:
      compat::prep_waitid(sqe, P_PID, static_cast<id_t>(op->pid), &op->si, WEXITED);
      break;
    case OpKind::ChildPidfd:
      io_uring_prep_poll_add(sqe, op->fd2, POLLIN);
      break;
    case OpKind::Wake:
      io_uring_prep_read(sqe, op->fd, op->buf, op->len, 0);
      break;
    default:  // a stream's own operations: prep_stream()
      break;
  }
}

void Engine::prep_stream(io_uring_sqe *sqe, OpHead *op) {
  Stream *s = op->stream;
  if (op->state & kOpPollRetry) {
    io_uring_prep_poll_add(sqe, s->fd, op->kind == OpKind::StreamRecv ? POLLIN : POLLOUT);
    return;
  }
  switch (op->kind) {
    case OpKind::StreamRecv: {
      if (s->tls && tls_prep_recv(s, sqe)) break;  // exact reads, kernel TLS records
      bool file = s->flags & KLOOP_STREAM_FILE;
      if (enabled_ & KLOOP_CAP_BUF_RING) {
        if (file)
          io_uring_prep_read(sqe, s->fd, nullptr, buf_size_, KLOOP_OFFSET_CURRENT);
        else if (enabled_ & KLOOP_CAP_MULTISHOT_RECV)
          io_uring_prep_recv_multishot(sqe, s->fd, nullptr, 0, 0);
        else
          io_uring_prep_recv(sqe, s->fd, nullptr, buf_size_, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = 0;
      } else {
        char *b = buf_addr(op->bid);
        if (file)
          io_uring_prep_read(sqe, s->fd, b, buf_size_, KLOOP_OFFSET_CURRENT);
        else
          io_uring_prep_recv(sqe, s->fd, b, buf_size_, 0);
      }
      break;
    }
    case OpKind::StreamSend: {
      if (s->tls && tls_prep_send(s, sqe)) break;  // kTLS: bounded by record marks
      iovec *iov = nullptr;
      int n = send_iov(s, SIZE_MAX, &iov);
      bool file = s->flags & KLOOP_STREAM_FILE;
      if (iov == &s->iov1) {
        // One block: no iovec array or msghdr for the kernel to read.
        if (file)
          io_uring_prep_write(sqe, s->fd, iov->iov_base, static_cast<unsigned>(iov->iov_len),
                              KLOOP_OFFSET_CURRENT);
        else
          io_uring_prep_send(sqe, s->fd, iov->iov_base, iov->iov_len, MSG_NOSIGNAL);
      } else if (file) {
        io_uring_prep_writev(sqe, s->fd, iov, static_cast<unsigned>(n), KLOOP_OFFSET_CURRENT);
      } else {
        msghdr &m = s->slot->msg;
        m = {};
        m.msg_iov = iov;
        m.msg_iovlen = static_cast<size_t>(n);
        io_uring_prep_sendmsg(sqe, s->fd, &m, MSG_NOSIGNAL);
      }
      break;
    }
    case OpKind::StreamShutdown:
      io_uring_prep_shutdown(sqe, s->fd, SHUT_WR);
      break;
    case OpKind::StreamClose:
      io_uring_prep_close(sqe, s->fd);
      break;
    default:
      break;
  }
}

void Engine::arm(OpHead *op) {
  io_uring_sqe *sqe = get_sqe();
  if (!sqe) {
    // Cannot happen once the ring is enabled (submit frees SQ space); if
    // the kernel refuses, fail the operation rather than lose it.
    if (!is_stream_kind(op->kind) && op->kind != OpKind::Wake) finish_op(op_of(op), -EAGAIN);
    return;
  }
  prep(sqe, op);
  io_uring_sqe_set_data(sqe, op);
  ++st_.sqes;
  if (!(op->state & kOpInKernel)) {
    op->state |= kOpInKernel;
    ++in_flight_;
  }
}

// ---------------------------------------------------------------------------
// Operation table

Op *Engine::alloc_op() {
  Op *op = free_ops_.take();
  if (!op) return new (std::nothrow) Op;
  *op = Op{};
  return op;
}

void Engine::free_op(Op *op) { free_ops_.give(op); }

// Slots for gathered sends: as many as sends of several blocks are in
// flight at once, a few kept for the next ones.
SendSlot *Engine::take_slot() {
  SendSlot *slot = free_slots_.take();
  return slot ? slot : new (std::nothrow) SendSlot;
}

void Engine::give_slot(SendSlot *slot) { free_slots_.give(slot); }

bool Engine::token_in_use(uint64_t token) const {
  return ops_.contains(token) || streams_.contains(token);
}

bool Engine::fd_ref(int fd) {
  if (uint32_t *n = fd_ops_.find(fd)) {
    ++*n;
    return true;
  }
  return fd_ops_.put(fd, 1);
}

void Engine::fd_unref(int fd) {
  uint32_t *n = fd_ops_.find(fd);
  if (!n) return;
  if (--*n > 0) return;
  fd_ops_.erase(fd);
  // Closes that waited for this fd to drain may go now.
  for (size_t i = 0; i < wait_close_.size();) {
    Op *c = wait_close_[i];
    if (c->fd == fd) {
      wait_close_.swap_remove(i);
      c->state &= static_cast<uint16_t>(~kOpWaitClose);
      if (c->state & kOpCancelling)
        finish_op(c, -ECANCELED);
      else
        arm(c);
    } else {
      ++i;
    }
  }
}

int Engine::submit_op(OpKind kind, uint64_t token, const Op &args) {
  if (token_in_use(token)) return -EEXIST;
  int pidfd = -1;
  if (kind == OpKind::ChildWaitid && !(enabled_ & KLOOP_CAP_WAITID)) {
    if (!(enabled_ & KLOOP_CAP_PIDFD)) return -ENOSYS;
    pidfd = compat::pidfd_open(args.pid);
    if (pidfd < 0) return -errno;
    kind = OpKind::ChildPidfd;
  }
  Op *op = alloc_op();
  if (!op) {
    if (pidfd >= 0) close(pidfd);
    return -ENOMEM;
  }
  op->token = token;
  op->kind = kind;
  op->fd = args.fd;
  op->fd2 = kind == OpKind::ChildPidfd ? pidfd : args.fd2;
  op->len = args.len;
  op->flags = args.flags;
  op->off = args.off;
  op->off2 = args.off2;
  op->buf = args.buf;
  op->pid = args.pid;
  op->addrlen = args.addrlen;
  // Only the member of the union this kind uses.
  if (kind == OpKind::Timeout)
    op->ts = args.ts;
  else if (args.addrlen)
    memcpy(&op->net.addr, &args.net.addr, args.addrlen);
  op->state = static_cast<uint16_t>(args.state & (kOpMultishot | kOpEdge));
  if (op->state & kOpMultishot) {
    if (kind == OpKind::Accept && (op->state & kOpEdge) && (enabled_ & KLOOP_CAP_MULTISHOT_ACCEPT))
      op->state |= kOpKernelMulti;
    if (kind == OpKind::Poll && (op->state & kOpEdge) && (enabled_ & KLOOP_CAP_MULTISHOT_POLL))
      op->state |= kOpKernelMulti;
  }
  // Take every allocation this operation can need before anything is
  // visible, so -ENOMEM leaves no trace: the token, the fd counts, a place
  // for its final record, and for a close its place in the waiting list.
  bool tracked = kind != OpKind::Close && kind != OpKind::Nop && kind != OpKind::Timeout &&
                 kind != OpKind::ChildWaitid && kind != OpKind::ChildPidfd && op->fd >= 0;
  bool ok = reserve_records(2) && ops_.put(token, op);
  bool ref1 = false;
  bool ref2 = false;
  if (ok && tracked) ok = ref1 = fd_ref(op->fd);
  if (ok && kind == OpKind::Splice && op->fd2 >= 0) ok = ref2 = fd_ref(op->fd2);
  bool wait = ok && kind == OpKind::Close && fd_ops_.contains(op->fd);
  if (wait) ok = wait_close_.push_back(op);
  if (!ok) {
    if (ref1) fd_unref(op->fd);
    if (ref2) fd_unref(op->fd2);
    ops_.erase(token);
    if (pidfd >= 0) close(pidfd);
    free_op(op);
    return -ENOMEM;
  }
  if (wait) {
    op->state |= kOpWaitClose;
    cancel_fd(op->fd);
    return 0;
  }
  arm(op);
  return 0;
}

int Engine::cancel(uint64_t token) {
  if (Op **found = ops_.find(token)) {
    Op *op = *found;
    if (op->state & (kOpCancelling | kOpFinished)) return -EALREADY;
    op->state |= kOpCancelling;
    if (op->state & kOpWaitClose) return 0;  // completes -ECANCELED when the fd drains
    if (op->state & kOpInKernel) queue_cancel(op);
    return 0;
  }
  if (Stream **found = streams_.find(token)) {
    Stream *s = *found;
    if (s->finished || s->closing || s->aborting) return -EALREADY;
    return stream_pause(token, true);
  }
  return -ENOENT;
}

// Submit what is queued and run the kernel's deferred completions now:
// cancelled requests complete and drop their file references. Their CQEs
// stay in the ring for the next poll.
int Engine::submit_now() {
  int rc = enable();
  if (rc < 0) return rc;
  ++st_.enters;
  rc = io_uring_submit_and_get_events(&ring_);
  return rc < 0 && rc != -EINTR && rc != -EBUSY && rc != -EAGAIN ? rc : 0;
}

int Engine::cancel_fd(int fd) {
  int n = 0;
  ops_.for_each([&](uint64_t, Op *op) {
    if (op->kind == OpKind::Close || (op->state & kOpFinished)) return;
    if ((op->fd == fd || (op->kind == OpKind::Splice && op->fd2 == fd)) &&
        !(op->state & kOpCancelling)) {
      op->state |= kOpCancelling;
      if (op->state & kOpInKernel) queue_cancel(op);
      ++n;
    }
  });
  return n;
}

// ---------------------------------------------------------------------------
// Completions

void Engine::emit(uint64_t token, int32_t res, uint32_t flags, uint64_t data, uint32_t event,
                  uint32_t aux, int32_t bid, Stream *s) {
  Pending p;
  p.rec = kloop_completion{token, res, flags, data, event, aux};
  p.bid = bid;
  p.stream = s;
  if (s && s->paused &&
      (event == KLOOP_EVENT_DATA || event == KLOOP_EVENT_EOF || event == KLOOP_EVENT_ERROR)) {
    if (s->held.push_back(p)) return;
    // No memory to hold it: deliver it (the poll call retries holding).
  }
  // Space was reserved: at poll start for what CQEs can produce, and by
  // each API call for what it can produce itself.
  pending_.push_back(p);
}

void Engine::finish_op(Op *op, int32_t res, uint64_t data, uint32_t aux) {
  if (op->state & kOpFinished) return;
  op->state |= kOpFinished;
  // The token stays taken until this record is returned (Engine::poll), so
  // it cannot be reused while its final completion is still on the way.
  if (op->kind != OpKind::Close && op->kind != OpKind::Nop && op->kind != OpKind::Timeout &&
      op->kind != OpKind::ChildWaitid && op->kind != OpKind::ChildPidfd && op->fd >= 0)
    fd_unref(op->fd);
  if (op->kind == OpKind::Splice && op->fd2 >= 0) fd_unref(op->fd2);
  Pending p;
  p.rec = kloop_completion{op->token, res, 0, data, KLOOP_EVENT_OP, aux};
  p.retire_op = op;
  pending_.push_back(p);
}

void Engine::handle_cqe(const io_uring_cqe *cqe) {
  uint64_t ud = cqe->user_data;
  if (ud == kIgnoreUdata || ud == LIBURING_UDATA_TIMEOUT) {
    ++ignored_cqes_;
    return;
  }
  ++st_.cqes;
  auto *h = reinterpret_cast<OpHead *>(ud);
  bool more = cqe->flags & IORING_CQE_F_MORE;
  if (!more && (h->state & kOpInKernel)) {
    h->state &= static_cast<uint16_t>(~kOpInKernel);
    --in_flight_;
  }
  if (h->stream) {
    handle_stream_cqe(h, cqe->res, cqe->flags);
    return;
  }
  Op *op = op_of(h);
  if (op->kind == OpKind::Timer) {
    // The wait's own timer: it carries no record.
    --st_.cqes;
    ++ignored_cqes_;
    if (timer_ == op) timer_ = nullptr;
    free_op(op);
    return;
  }
  if (op->kind == OpKind::Wake) {
    wake_pending_.store(false, std::memory_order_release);
    if (!in_destroy_) arm(op);
    return;
  }
  handle_op_cqe(op, cqe->res, cqe->flags);
}

void Engine::handle_op_cqe(Op *op, int res, uint32_t cflags) {
  bool more = cflags & IORING_CQE_F_MORE;
  bool cancelling = op->state & kOpCancelling;
  if (op->state & kOpPollRetry) {
    // Readiness poll after -EAGAIN: retry the real operation.
    op->state &= static_cast<uint16_t>(~kOpPollRetry);
    if (res < 0)
      finish_op(op, res);
    else if (cancelling)
      finish_op(op, -ECANCELED);
    else
      arm(op);
    return;
  }
  switch (op->kind) {
    case OpKind::Recv:
    case OpKind::Send:
    case OpKind::RecvMsg:
    case OpKind::SendMsg:
    case OpKind::Read:
    case OpKind::Write:
      if (res == -EAGAIN && !cancelling) {
        // O_NONBLOCK files (pipes) return EAGAIN instead of waiting.
        bool in =
            op->kind == OpKind::Recv || op->kind == OpKind::RecvMsg || op->kind == OpKind::Read;
        op->off2 = in ? POLLIN : POLLOUT;  // off2 is unused by these kinds
        op->state |= kOpPollRetry;
        arm(op);
        return;
      }
      if (op->kind == OpKind::RecvMsg && res >= 0) {
        uint32_t aux = (static_cast<uint32_t>(op->net.msg.msg_flags & 0xffff) << 16) |
                       (op->net.msg.msg_namelen & 0xffff);
        finish_op(op, res, reinterpret_cast<uint64_t>(&op->net.addr), aux);
      } else {
        finish_op(op, res);
      }
      return;
    case OpKind::Accept:
      if (op->state & kOpMultishot) {
        if (res >= 0) {
          if (cancelling && !more) {
            emit(op->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_OP, 0);
            finish_op(op, -ECANCELED);
          } else {
            emit(op->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_OP, 0);
            if (!more) arm(op);  // emulated multishot, or the kernel ended it
          }
        } else if (!more) {
          finish_op(op, res);
        }
        return;
      }
      if (res >= 0)
        finish_op(op, res, reinterpret_cast<uint64_t>(&op->net.addr), op->addrlen);
      else
        finish_op(op, res);
      return;
    case OpKind::Poll:
      if (op->state & kOpMultishot) {
        if (res >= 0) {
          emit(op->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_OP,
               static_cast<uint32_t>(res));
          if (!more) {
            if (cancelling)
              finish_op(op, -ECANCELED);
            else
              arm(op);  // level-triggered: fires again next poll while ready
          }
        } else if (!more) {
          finish_op(op, res);
        }
        return;
      }
      finish_op(op, res, 0, res >= 0 ? static_cast<uint32_t>(res) : 0);
      return;
    case OpKind::Timeout:
      finish_op(op, res == -ETIME ? 0 : res);
      return;
    case OpKind::ChildWaitid:
      finish_op(op, res < 0 ? res : compat::wait_status(op->si));
      return;
    case OpKind::ChildPidfd: {
      if (res < 0) {
        close(op->fd2);
        op->fd2 = -1;
        finish_op(op, res);
        return;
      }
      siginfo_t si{};
      if (waitid(P_PIDFD, static_cast<id_t>(op->fd2), &si, WEXITED | WNOHANG) < 0) {
        int e = -errno;
        close(op->fd2);
        op->fd2 = -1;
        finish_op(op, e);
        return;
      }
      if (si.si_pid == 0) {  // not exited after all
        if (cancelling) {
          close(op->fd2);
          op->fd2 = -1;
          finish_op(op, -ECANCELED);
        } else {
          arm(op);
        }
        return;
      }
      close(op->fd2);
      op->fd2 = -1;
      finish_op(op, compat::wait_status(si));
      return;
    }
    default:
      finish_op(op, res);
      return;
  }
}

// ---------------------------------------------------------------------------
// The poll call

// Receive buffers go back to the kernel's ring here, once per poll. The
// ring is kept short: twice as many buffers as the kernel took since the
// last poll (all of them, when a stream ran out), at least kRingMinBuffers,
// topped up with the buffers returned most recently. The kernel takes ring
// buffers in order, so in a ring of all buf_count buffers a returned buffer
// waited behind every other one, and the kernel wrote into memory that had
// not been touched for a long time: a 100 KiB echo at 10 connections used
// 42-44 MiB of RSS (28-31 MiB now) and a few per cent more CPU per message.
void Engine::flush_recycled() {
  if (!handed_out_.empty()) {
    for (uint32_t bid : handed_out_) recycle(bid);
    handed_out_.clear();
  }
  if (br_registered_) {
    // Twice what the kernel took since the last top-up (all of it, when a
    // stream ran out): the ring follows the load both ways.
    uint32_t want = 2 * ring_taken_;
    ring_taken_ = 0;
    ring_target_ =
        want < kRingMinBuffers ? kRingMinBuffers : (want > buf_count_ ? buf_count_ : want);
    int mask = io_uring_buf_ring_mask(buf_count_);
    while (ring_avail_ < ring_target_ && !ring_spare_.empty()) {
      uint32_t bid = ring_spare_.back();
      ring_spare_.pop_back();
      io_uring_buf_ring_add(br_, buf_addr(bid), buf_size_, static_cast<unsigned short>(bid), mask,
                            pending_recycle_);
      ++pending_recycle_;
      ++ring_avail_;
    }
    if (pending_recycle_) {
      io_uring_buf_ring_advance(br_, pending_recycle_);
      pending_recycle_ = 0;
    }
    trim_taken(spare_trim_, ring_spare_.size());
  }
  for (Op *op : retire_ops_) free_op(op);
  retire_ops_.clear();
  for (Stream *s : retire_streams_) delete_stream(s);
  retire_streams_.clear();
  if (tls_starved_ && !tls_free_.empty()) tls_unstarve();
  if (starved_ && (br_registered_ ? ring_avail_ > 0 : buffers_in_use_ < buf_count_)) {
    Stream *s = starved_;
    starved_ = nullptr;
    while (s) {
      Stream *next = s->next_starved;
      s->next_starved = nullptr;
      s->starved = false;
      s->recv_nobufs = false;
      progress(s);
      s = next;
    }
  }
}

// Whether an idle trim has work (checked before a wait): free receive (or
// TLS plaintext) buffers worth giving back, more than kTrimKeep +
// kTrimMinBatch above the cold ones; or TLS streams whose OpenSSL record
// buffers the engine frees (tls_trim()).
bool Engine::trim_wanted() const {
  return tls_warm_ || (can_trim_ && (trim_worth(spare_trim_, ring_spare_.size()) ||
                                     trim_worth(tls_trim_, tls_free_.size())));
}

// Gives the pages of free buffers that no poll took since trim_since_ back
// to the kernel, once that is kTrimAfterNs ago: the spare stack of the
// receive ring and the free TLS plaintext buffers; and frees the OpenSSL
// record buffers of TLS streams untouched since (tls_trim()). Called before the
// engine waits: a loop that runs without waiting is not idle, and keeps
// its buffers. A buffer given back costs a page fault per page the next
// time it is filled.
void Engine::trim_spare(int64_t now) {
  if (now - trim_since_ < kTrimAfterNs) return;
  if (can_trim_) {
    release_cold(ring_spare_, spare_trim_);
    release_cold(tls_free_, tls_trim_);
  }
  tls_trim();
  trim_since_ = now;
}

// Both stacks hand out the buffers returned last first, so the ones no poll
// took are the bottom t.low entries; the kTrimKeep just below the rest stay,
// for a load that grows a little.
void Engine::release_cold(Vec<uint32_t> &stack, IdleTrim &t) {
  uint32_t end = t.low > kTrimKeep ? t.low - kTrimKeep : 0;
  if (end >= t.cold + kTrimMinBatch) {
    uint32_t *first = stack.begin() + t.cold;
    uint32_t *last = stack.begin() + end;
    std::sort(first, last);  // these are all cold: order does not matter
    for (uint32_t *run = first; run != last;) {
      uint32_t *next = run + 1;
      while (next != last && *next == next[-1] + 1) ++next;
      // Cannot fail on a private anonymous mapping we own; if it did, the
      // pages would only stay.
      (void)madvise(buf_addr(*run), static_cast<size_t>(next - run) * buf_size_, MADV_DONTNEED);
      run = next;
    }
    st_.buffers_released += end - t.cold;
    t.cold = end;
  }
  t.low = static_cast<uint32_t>(stack.size());
}

void Engine::recycle(uint32_t bid) {
  if (is_tls_buffer(bid)) {
    --tls_in_use_;
    tls_free_.push_back(bid);  // cannot fail: reserved for all of them
    return;
  }
  --buffers_in_use_;
  if (br_registered_) {
    ring_spare_.push_back(bid);  // cannot fail: reserved for all of them
  } else {
    own_free_.push_back(bid);
  }
}

int Engine::take_own_buffer() {
  if (own_free_.empty()) return -1;
  uint32_t bid = own_free_.back();
  own_free_.pop_back();
  ++buffers_in_use_;
  return static_cast<int>(bid);
}

void Engine::reap(size_t space) {
  io_uring_cqe *cqes[64];
  while (pending_.size() < space) {
    size_t want = space - pending_.size();
    if (want > 64) want = 64;
    unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, static_cast<unsigned>(want));
    if (n == 0) break;
    for (unsigned i = 0; i < n; ++i) handle_cqe(cqes[i]);
    io_uring_cq_advance(&ring_, n);
  }
}

int Engine::poll(kloop_completion *out, uint32_t max, int64_t timeout_ns) {
  ++st_.polls;
  if (!enabled_ring_) {
    int rc = enable();
    if (rc < 0) return rc;
  }
  // Work queued by API calls since the last poll (gathered sends, re-arms).
  // Room for every record this call can produce: what is queued, up to 4
  // records per CQE reaped (reap() takes at most `max` CQEs), what
  // stream progress below emits, and a WRITE_RELEASE per borrowed block
  // still queued. Failing here loses nothing.
  size_t room = pending_.size() + 4 * static_cast<size_t>(max) + 16 + borrowed_;
  if (!pending_.reserve(room) || !handed_out_.reserve(room) ||
      !retire_ops_.reserve(retire_ops_.size() + max) ||
      !retire_streams_.reserve(retire_streams_.size() + max))
    return -ENOMEM;
  encrypted_unsent_ = 0;
  idle_poll_ = false;
  prompt_ = nullptr;
  // Write blocks freed since the last poll that the caller's writes did not
  // take again: keep the pool's bound (BlockPool).
  wblocks_.trim(BlockPool::kMaxFree, BlockPool::kMaxFreeSmall, BlockPool::kMaxLargeBytes);
  while (dirty_) {
    Stream *s = dirty_;
    dirty_ = s->next_dirty;
    s->next_dirty = nullptr;
    s->dirty = false;
    progress(s);
  }
  flush_recycled();

  uint32_t filled = 0;
  auto drain = [&]() {
    while (filled < max && !pending_.empty()) {
      Pending p = pending_.front();
      pending_.pop_front();
      Stream *s = p.stream;
      if (s && (p.rec.event == KLOOP_EVENT_DATA || p.rec.event == KLOOP_EVENT_EOF ||
                p.rec.event == KLOOP_EVENT_ERROR)) {
        if (s->closing || s->aborting) {  // reading stopped: drop
          if (p.bid >= 0) handed_out_.push_back(static_cast<uint32_t>(p.bid));
          continue;
        }
        if (s->paused) {
          if (s->held.push_back(p)) continue;
          // no memory to hold it: deliver it now rather than lose it
        }
      }
      if (p.rec.event == KLOOP_EVENT_DATA && filled > 0 && out[filled - 1].token == p.rec.token &&
          out[filled - 1].event == KLOOP_EVENT_DATA)
        out[filled - 1].flags |= KLOOP_COMPLETION_DATA_NEXT;  // a binding may join the two
      out[filled++] = p.rec;
      if (p.bid >= 0) handed_out_.push_back(static_cast<uint32_t>(p.bid));
      if (p.retire_op) {
        Op **cur = ops_.find(p.retire_op->token);
        if (cur && *cur == p.retire_op) ops_.erase(p.retire_op->token);
        retire_ops_.push_back(p.retire_op);
      }
      if (p.retire_stream) {
        Stream **cur = streams_.find(p.retire_stream->token);
        if (cur && *cur == p.retire_stream) streams_.erase(p.retire_stream->token);
        retire_streams_.push_back(p.retire_stream);
      }
    }
  };
  drain();
  if (filled < max) {
    bool may_wait = filled == 0 && pending_.empty() && timeout_ns != 0;
    // Nothing was ready: the loop is idle, and whatever it answers next is
    // awaited (Engine::send_prompt).
    idle_poll_ =
        may_wait && send_after_wait_ && io_uring_cq_ready(&ring_) == 0 && !kernel_has_work();
    if (!may_wait) {
      int rc = 0;
      if (io_uring_sq_ready(&ring_) > 0 || kernel_has_work()) {
        ++st_.enters;
        rc = io_uring_submit_and_get_events(&ring_);
      }
      reap(max - filled);
      drain();
      if (filled == 0 && rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) return rc;
    } else {
      // The kernel does not say why a wait ended: a wait that submitted
      // SQEs reports their count even when a signal cut it short, and
      // CQEs that carry nothing (cancel results, timers) end it too. So:
      // records -> return them; a CQE that did work (a wake-up, a send) ->
      // return 0; only record-less internal CQEs -> wait again for the
      // rest of the time; nothing at all before the deadline -> -EINTR.
      //
      // An engine that is about to wait is idle: spare receive buffers it
      // has not used for a while give their pages back (trim_spare()). The
      // wait is cut short for that when it would be longer, and goes on
      // after it; the caller sees one wait.
      int64_t now = timeout_ns > 0 || trim_wanted() ? now_ns() : 0;
      const int64_t deadline = timeout_ns > 0 ? now + timeout_ns : -1;
      int64_t remaining = timeout_ns;
      for (;;) {
        int64_t wait = remaining;
        bool trim_wait = false;
        if (trim_wanted()) {
          trim_spare(now);
          if (trim_wanted()) {
            int64_t due = trim_since_ + kTrimAfterNs - now;
            if (due < 1000000) due = 1000000;
            if (wait < 0 || due < wait) {
              wait = due;
              trim_wait = true;
            }
          }
        }
        uint64_t real_before = st_.cqes;
        uint64_t ignored_before = ignored_cqes_;
        int rc = wait_once(wait);
        reap(max - filled);
        drain();
        if (filled) break;
        if (st_.cqes != real_before) break;
        if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) return rc;
        if (deadline >= 0 || trim_wait) now = now_ns();
        if (deadline >= 0) {
          remaining = deadline - now;
          if (remaining <= 0) break;
        }
        if (ignored_cqes_ != ignored_before || rc == -EBUSY || rc == -EAGAIN) continue;
        if (trim_wait && rc == -ETIME) continue;  // the trim's own time ran out
        return -EINTR;
      }
    }
  }
  st_.completions += filled;
  return static_cast<int>(filled);
}

// Whether completions wait inside the kernel for an io_uring_enter to post
// them (deferred or cooperative task work, CQ overflow). Without
// IORING_SETUP_TASKRUN_FLAG the kernel does not say: assume yes.
bool Engine::kernel_has_work() const {
  if (setup_flags_ & IORING_SETUP_SQPOLL) return false;
  if (!(setup_flags_ & IORING_SETUP_TASKRUN_FLAG))
    return (setup_flags_ & IORING_SETUP_DEFER_TASKRUN) != 0;
  unsigned f = IO_URING_READ_ONCE(*ring_.sq.kflags);
  return (f & (IORING_SQ_TASKRUN | IORING_SQ_CQ_OVERFLOW)) != 0;
}

int64_t Engine::now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// One submit-and-wait call. With IORING_FEAT_EXT_ARG the timeout travels
// with io_uring_enter. Without it (kernels before 5.11, or the capability
// switched off) the engine arms a timer SQE of its own: liburing's fallback
// consumes its timer CQE inside its own wait loop and can then wait forever.
int Engine::wait_once(int64_t timeout_ns) {
  ++st_.enters;
  if (timeout_ns < 0) return io_uring_submit_and_wait(&ring_, 1);
  if (enabled_ & KLOOP_CAP_EXT_ARG) {
    io_uring_cqe *cqe = nullptr;
    __kernel_timespec ts{timeout_ns / 1000000000LL, timeout_ns % 1000000000LL};
    return io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
  }
  if (timer_ && (timer_->state & kOpInKernel)) queue_cancel(timer_);
  Op *t = alloc_op();
  if (!t) return -ENOMEM;
  t->kind = OpKind::Timer;
  t->ts.tv_sec = timeout_ns / 1000000000LL;
  t->ts.tv_nsec = timeout_ns % 1000000000LL;
  timer_ = t;
  arm(t);
  int rc = io_uring_submit_and_wait(&ring_, 1);
  return rc;
}

int Engine::wake() {
  if (wake_pending_.exchange(true, std::memory_order_acq_rel)) return 0;
  uint64_t one = 1;
  ssize_t r;
  do {
    r = write(wake_fd_, &one, sizeof(one));
  } while (r < 0 && errno == EINTR);
  return 0;
}

}  // namespace kl
