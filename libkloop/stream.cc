// Engine-owned streams: reads into the loop's receive buffers, a gathered
// write queue with one send in flight, flow-control marks, graceful close
// and abort. All decisions about what to queue next live in progress().
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#include <new>

#include "engine.h"
#include "tls.h"

#include <openssl/err.h>

namespace kl {

namespace {
inline bool is_read_event(uint32_t ev) {
  return ev == KLOOP_EVENT_DATA || ev == KLOOP_EVENT_EOF || ev == KLOOP_EVENT_ERROR;
}
}  // namespace

Stream *Engine::find_stream(uint64_t token) const {
  Stream *const *found = streams_.find(token);
  return found ? *found : nullptr;
}

// A stream whose CLOSED record is queued but not yet returned keeps its
// token; calls on it answer as for a closing stream.

void Engine::mark_dirty(Stream *s) {
  if (s->dirty) return;
  s->dirty = true;
  s->next_dirty = dirty_;
  dirty_ = s;
}

void Engine::add_starved(Stream *s) {
  s->recv_nobufs = true;
  if (s->starved) return;
  s->starved = true;
  s->next_starved = starved_;
  starved_ = s;
}

namespace {
// Remove s from an intrusive singly linked list threaded through `next`.
void list_remove(Stream **head, Stream *s, Stream *Stream::*next) {
  for (Stream **pp = head; *pp; pp = &((*pp)->*next))
    if (*pp == s) {
      *pp = s->*next;
      break;
    }
  s->*next = nullptr;
}
}  // namespace

// Take s off the intrusive lists before it is freed.
void Engine::unlink(Stream *s) {
  if (s->starved) {
    list_remove(&starved_, s, &Stream::next_starved);
    s->starved = false;
  }
  if (s->dirty) {
    list_remove(&dirty_, s, &Stream::next_dirty);
    s->dirty = false;
  }
}

namespace {
struct ReleaseCtx {
  Engine *eng;
  Stream *s;
};
}  // namespace

void Engine::wq_consume(Stream *s, size_t n) {
  ReleaseCtx ctx{this, s};
  s->wq.consume(n, &wblocks_, &Engine::released, &ctx);
}

void Engine::wq_clear(Stream *s) {
  ReleaseCtx ctx{this, s};
  s->wq.clear(&wblocks_, &Engine::released, &ctx);
}

// Room for this record was reserved: poll() reserves one per borrowed block
// still queued, stream_abort() likewise.
void Engine::released(void *ctx, uint64_t ref) {
  auto *c = static_cast<ReleaseCtx *>(ctx);
  --c->eng->borrowed_;
  c->eng->emit(c->s->token, 0, KLOOP_COMPLETION_MORE, ref, KLOOP_EVENT_WRITE_RELEASE, 0);
}

int Engine::stream_attach(uint64_t token, int fd, uint32_t flags) {
  if (token_in_use(token)) return -EEXIST;
  auto *s = new (std::nothrow) Stream;
  if (!s) return -ENOMEM;
  s->token = token;
  s->fd = fd;
  s->flags = flags;
  s->paused = flags & KLOOP_STREAM_PAUSED;
  // The stream's own operations: their SQEs carry these as user_data.
  auto own = [s](OpHead &op, OpKind kind) {
    op.kind = kind;
    op.stream = s;
  };
  own(s->recv, OpKind::StreamRecv);
  own(s->send, OpKind::StreamSend);
  own(s->shut, OpKind::StreamShutdown);
  own(s->close_op, OpKind::StreamClose);
  if (!streams_.put(token, s)) {
    delete s;
    return -ENOMEM;
  }
  progress(s);
  return 0;
}

void Engine::arm_recv(Stream *s) {
  uint16_t tls_mode = s->tls ? tls_recv_mode(s) : 0;
  if (tls_mode == kOpTlsExact) {
    // Read what OpenSSL asked for, into a TLS buffer.
    if (!s->tls->want) return;  // OpenSSL asks first
    int bid = take_tls_buffer();
    if (bid < 0) {
      if (!s->tls->starved) {
        s->tls->starved = true;
        s->tls->next_starved = tls_starved_;
        tls_starved_ = s;
      }
      return;
    }
    s->recv.bid = static_cast<uint32_t>(bid);
  } else if (!(enabled_ & KLOOP_CAP_BUF_RING) && !tls_mode) {
    int bid = take_own_buffer();
    if (bid < 0) {
      add_starved(s);
      return;
    }
    s->recv.bid = static_cast<uint32_t>(bid);
  }
  s->recv_armed = true;
  s->recv_cancel = false;
  arm(&s->recv);
}

void Engine::submit_send(Stream *s) {
  s->send_inflight = true;
  s->send_cancel = false;
  arm(&s->send);
}

// The iovecs of the send being prepared (at most `limit` bytes): the first
// block in s->iov1 when it is all there is to send, else up to kMaxIov
// blocks in a SendSlot, held until the send ends. Without a slot (no
// memory) the send takes the first block; the rest follows as after a
// short send.
int Engine::send_iov(Stream *s, size_t limit, iovec **iov) {
  if (!s->slot) {
    int n = s->wq.fill_iov(&s->iov1, 1, limit);
    size_t want = s->wq.size() < limit ? s->wq.size() : limit;
    if (n == 0 || s->iov1.iov_len >= want || no_send_gather_ || !(s->slot = take_slot())) {
      *iov = &s->iov1;
      return n;
    }
  }
  *iov = s->slot->iov;
  return s->wq.fill_iov(s->slot->iov, kMaxIov, limit);
}

// The send in flight has ended (completed, failed or cancelled).
void Engine::send_ended(Stream *s) {
  s->send_inflight = false;
  if (s->slot) {
    give_slot(s->slot);
    s->slot = nullptr;
  }
}

// Whether a stream's queued bytes may go before the poll: no send in flight,
// no close or shutdown for the poll to order after them, and no key change
// waiting in its queue.
bool Engine::may_send_before_poll(const Stream *s) {
  return !s->send_inflight && !s->write_failed && !s->closing && !s->aborting && !s->finished &&
         !s->shut_req && !(s->tls && !s->tls->marks.empty());
}

// Hand the sends that wait for the next poll to the kernel now, in one
// io_uring_enter: called once TLS writes have encrypted kSendEarlyBytes
// since the last poll or early send. Only plain sends of a stream's queue
// start here; all else (closing, kernel TLS key marks, shutdown) stays with
// progress() at the next poll, which finds these sends in flight. Their
// completions come from a later poll, like any others.
void Engine::send_early() {
  encrypted_unsent_ = 0;
  if (!enabled_ring_) return;  // the first poll enables the ring
  bool queued = false;
  for (Stream *s = dirty_; s; s = s->next_dirty) {
    if (!may_send_before_poll(s) || s->wq.size() == 0) continue;
    submit_send(s);
    queued = true;
  }
  if (!queued) return;
  ++st_.enters;
  (void)io_uring_submit(&ring_);  // on failure the SQEs wait for the poll's enter
}

// After a poll that waited, the loop is answering peers that wait for it:
// holding a TLS stream's records until the next poll, to share its
// io_uring_enter with the other answers, keeps the peer idle while the loop
// works through the rest of its iteration. So, in such an iteration, a TLS
// stream's records go out when the loop writes to another stream -- its
// callback is over, so what it wrote in one callback still shares a record.
// A busy loop (its poll found completions ready) gathers as before.
void Engine::send_prompt() {
  Stream *s = prompt_;
  prompt_ = nullptr;
  TlsState *t = s->tls;
  if (!may_send_before_poll(s) || t->failed || t->handshaking) return;  // the poll sends
  if (plain_waiting(t) && (!reserve_records(1) || !tls_flush_pt(s))) return;
  if (s->wq.size() == 0) return;
  submit_send(s);
  ++st_.enters;
  (void)io_uring_submit(&ring_);  // on failure the SQE waits for the poll's enter
}

void Engine::drop_held(Stream *s) {
  for (size_t i = 0; i < s->held.size(); ++i)
    if (s->held.at(i).bid >= 0) recycle(static_cast<uint32_t>(s->held.at(i).bid));
  s->held.clear();
  // Read records of this stream still queued for delivery are dropped at
  // delivery time (Engine::poll checks closing/aborting).
}

void Engine::stream_finish(Stream *s, int err) {
  if (s->finished) return;
  s->finished = true;
  if (prompt_ == s) prompt_ = nullptr;
  drop_held(s);
  tls_release(s);
  wq_clear(s);
  // The token stays taken until CLOSED is returned (Engine::poll).
  // The Stream is freed after its CLOSED record is returned: no list may
  // keep pointing at it by then.
  unlink(s);
  Pending p;
  p.rec = kloop_completion{s->token, err, 0, 0, KLOOP_EVENT_CLOSED, 0};
  p.retire_stream = s;
  pending_.push_back(p);
}

void Engine::progress(Stream *s) {
  if (s->finished) return;
  bool kernel_busy = s->recv_armed || s->send_inflight || s->shut_inflight || s->close_inflight;
  if (s->aborting) {
    if (s->recv_armed && !s->recv_cancel) {
      s->recv_cancel = true;
      queue_cancel(&s->recv);
    }
    if (s->send_inflight && !s->send_cancel) {
      s->send_cancel = true;
      queue_cancel(&s->send);
    }
    if (!kernel_busy) {
      if ((s->flags & KLOOP_STREAM_CLOSE_FD) && s->fd >= 0) {
        s->close_inflight = true;
        arm(&s->close_op);
      } else {
        stream_finish(s, -ECANCELED);
      }
    }
    return;
  }

  bool want_read = !(s->flags & KLOOP_STREAM_NO_READ) && !s->paused && !s->read_done && !s->closing;
  if (s->tls) {
    TlsState *t = s->tls;
    // Small writes since the last poll, in as few records as they fit.
    if (plain_waiting(t) && !t->handshaking && !t->failed && reserve_records(1)) tls_flush_pt(s);
    want_read = (want_read && !t->failed) || tls_must_read(s);
    // A recv armed in another mode (multishot before the handshake, exact
    // reads after it) is cancelled and re-armed in the right one.
    if (want_read && s->recv_armed && !s->recv_cancel &&
        (s->recv.state & (kOpTlsExact | kOpTlsRecvmsg)) != tls_recv_mode(s)) {
      s->recv_cancel = true;
      queue_cancel(&s->recv);
    }
    // A graceful close sends close_notify after what was written before it
    // -- unless the socket already reached EOF (asyncio's sslproto does not
    // answer a peer that has closed the connection either).
    if (s->closing && !t->handshaking && !t->failed && !t->sent_close && !s->write_failed &&
        !t->in_eof) {
      t->sent_close = true;
      tls_touch(s);
      clear_ssl_errors();
      SSL_shutdown(t->ssl);  // queues close_notify through the BIO
      clear_ssl_errors();
    }
  }
  if (want_read) {
    if (!s->recv_armed && !s->recv_nobufs) arm_recv(s);
  } else if (s->recv_armed && !s->recv_cancel) {
    s->recv_cancel = true;
    queue_cancel(&s->recv);
  }

  if (s->tls && !s->send_inflight && !s->write_failed && !s->tls->marks.empty())
    tls_apply_tx_key(s);
  if (!s->send_inflight && !s->write_failed && s->wq.size() > 0) submit_send(s);

  if (!s->send_inflight && s->wq.size() == 0 && s->shut_req && !s->shut_inflight && !s->shut_done &&
      !s->write_failed) {
    if (s->flags & KLOOP_STREAM_FILE) {
      // A pipe has no half-close: the write side ends when the fd closes.
      s->shut_done = true;
      emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_WRITE_DONE, 0);
    } else {
      s->shut_inflight = true;
      arm(&s->shut);
    }
  }

  if (s->closing) {
    bool flushed = !s->send_inflight && (s->wq.size() == 0 || s->write_failed) && !s->shut_inflight;
    if (flushed && !s->recv_armed && !s->close_inflight) {
      if ((s->flags & KLOOP_STREAM_CLOSE_FD) && s->fd >= 0) {
        s->close_inflight = true;
        arm(&s->close_op);
      } else {
        stream_finish(s, s->close_err);
      }
    }
  }
}

void Engine::handle_stream_cqe(OpHead *op, int res, uint32_t cflags) {
  Stream *s = op->stream;
  bool more = cflags & IORING_CQE_F_MORE;
  switch (op->kind) {
    case OpKind::StreamRecv: {
      if ((op->state & (kOpTlsExact | kOpTlsRecvmsg)) && tls_recv_cqe(s, op, res, cflags)) return;
      if (op->state & kOpPollRetry) {
        op->state &= static_cast<uint16_t>(~kOpPollRetry);
        if (res < 0 || s->recv_cancel || s->finished) {
          s->recv_armed = false;
          if (!(enabled_ & KLOOP_CAP_BUF_RING)) recycle(op->bid);
          if (res < 0 && res != -ECANCELED && !s->read_done && !s->closing && !s->aborting) {
            s->read_done = true;
            emit(s->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_ERROR, KLOOP_ERROR_READ, -1,
                 s);
          }
          progress(s);
        } else {
          arm(op);  // fd readable: read again
        }
        return;
      }
      int32_t bid = -1;
      if (cflags & IORING_CQE_F_BUFFER) {
        bid = static_cast<int32_t>(cflags >> IORING_CQE_BUFFER_SHIFT);
        took_ring_buffer();
      } else if (!(enabled_ & KLOOP_CAP_BUF_RING)) {
        bid = static_cast<int32_t>(op->bid);  // own buffer, counted when taken
      }
      if (res > 0 && s->tls) {
        tls_input(s, bid, 0, static_cast<uint32_t>(res));
        if (more) progress(s);  // TLS may have written (handshake, alerts) or finished reading
      } else if (res > 0) {
        emit(s->token, res, KLOOP_COMPLETION_MORE,
             reinterpret_cast<uint64_t>(buf_addr(static_cast<uint32_t>(bid))), KLOOP_EVENT_DATA, 0,
             bid, s);
      } else {
        if (bid >= 0) recycle(static_cast<uint32_t>(bid));
        if (res == 0 && s->tls) {
          if (!s->read_done) tls_socket_eof(s);
        } else if (res == 0) {
          s->read_done = true;
          emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_EOF, 0, -1, s);
        } else if (res == -ENOBUFS) {
          ++st_.enobufs;
          add_starved(s);
        } else if (res == -EAGAIN && !s->recv_cancel && (s->flags & KLOOP_STREAM_FILE)) {
          // O_NONBLOCK pipe or tty: wait for readability, then read again.
          if (!(enabled_ & KLOOP_CAP_BUF_RING)) {
            // keep the own buffer reserved: recycle() above returned it, take it again
            int nb = take_own_buffer();
            op->bid = static_cast<uint32_t>(nb < 0 ? 0 : nb);
            if (nb < 0) {
              s->recv_armed = false;
              add_starved(s);
              return;
            }
          }
          op->state |= kOpPollRetry;  // prep_stream polls for POLLIN
          arm(op);
          return;
        } else if (res != -ECANCELED || !s->recv_cancel) {
          if (!s->read_done && s->tls) {
            tls_socket_error(s, res);
          } else if (!s->read_done) {
            s->read_done = true;
            emit(s->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_ERROR, KLOOP_ERROR_READ, -1,
                 s);
          }
        }
      }
      if (!more) {
        s->recv_armed = false;
        s->recv_cancel = false;
        progress(s);
      }
      return;
    }
    case OpKind::StreamSend: {
      if (op->state & kOpPollRetry) {
        op->state &= static_cast<uint16_t>(~kOpPollRetry);
        if (res < 0 || s->send_cancel) {
          send_ended(s);
          if (res < 0 && res != -ECANCELED) {
            s->write_failed = true;
            wq_clear(s);
            if (s->closing)
              s->close_err = res;
            else if (!s->aborting && !(s->tls && s->tls->failed))  // TLS: reported already
              emit(s->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_ERROR, KLOOP_ERROR_WRITE);
          }
          progress(s);
        } else {
          arm(op);
        }
        return;
      }
      if (res == -EAGAIN && !s->send_cancel) {
        op->state |= kOpPollRetry;  // prep_stream polls for POLLOUT
        arm(op);
        return;
      }
      send_ended(s);
      s->send_cancel = false;
      if (s->aborting) {
        wq_clear(s);
        progress(s);
        return;
      }
      if (res > 0) {
        wq_consume(s, static_cast<size_t>(res));
        if (s->tls) tls_sent(s, static_cast<size_t>(res));
        if (s->over_high && s->wq.size() <= s->low && !s->aborting) {
          s->over_high = false;
          emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_WRITE_LOW, 0);
        }
      } else if (res < 0 && !(res == -ECANCELED && s->aborting)) {
        s->write_failed = true;
        wq_clear(s);
        if (s->closing)
          s->close_err = res;
        else if (!s->aborting && !(s->tls && s->tls->failed))  // TLS: reported already
          emit(s->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_ERROR, KLOOP_ERROR_WRITE);
      }
      progress(s);
      return;
    }
    case OpKind::StreamShutdown:
      s->shut_inflight = false;
      s->shut_done = true;
      if (!s->aborting) emit(s->token, res, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_WRITE_DONE, 0);
      progress(s);
      return;
    case OpKind::StreamClose:
      s->close_inflight = false;
      s->fd = -1;
      stream_finish(s, s->aborting ? -ECANCELED : (res < 0 ? res : s->close_err));
      return;
    default:
      return;
  }
}

int Engine::stream_pause(uint64_t token, bool pause) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (s->closing || s->aborting || s->finished) return -EPIPE;
  if (pause == s->paused) return 0;
  s->paused = pause;
  if (pause) {
    // Read records already queued for delivery wait with the held ones.
    // A record that cannot be held for lack of memory stays queued: it is
    // then delivered (late) rather than lost.
    Fifo<Pending> &held = s->held;
    pending_.partition(
        [&](const Pending &p) {
          return !(p.stream == s && is_read_event(p.rec.event)) || !held.push_back(p);
        },
        [](const Pending &) {});
  } else {
    if (!reserve_records(s->held.size() + 2)) {
      s->paused = true;
      return -ENOMEM;
    }
    while (!s->held.empty()) {
      pending_.push_back(s->held.front());
      s->held.pop_front();
    }
    if (s->tls) {  // decrypt what waited while paused
      if (!reserve_records(tls_buf_count_ + 4)) {
        s->paused = true;
        return -ENOMEM;
      }
      tls_pump(s);
    }
  }
  progress(s);
  return 0;
}

// A large write to a socket stream with nothing queued and no send in
// flight goes to the kernel at once, from the caller's memory: a send(2)
// then costs less than copying the bytes into the queue (and, for a lent
// block, than keeping the caller's object alive until a later poll).
// Returns the bytes the kernel took; the rest is queued as usual. Any
// error (EAGAIN, or a broken connection) leaves everything to the queued
// send, which reports a broken connection the usual way.
size_t Engine::direct_send(Stream *s, const void *buf, size_t len) {
  if (len < kDirectSendMin || no_direct_send_ || s->send_inflight || s->wq.size() || s->closing ||
      (s->flags & KLOOP_STREAM_FILE))
    return 0;
  ssize_t n = ::send(s->fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n <= 0) return 0;
  ++st_.direct_sends;
  return static_cast<size_t>(n);
}

int64_t Engine::stream_write(uint64_t token, const void *buf, size_t len) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  // A closing stream still takes writes until it has flushed (asyncio's
  // transports do the same: close() stops reading, not writing).
  if (s->shut_req || s->aborting || s->write_failed || s->finished) return -EPIPE;
  if (idle_poll_ && prompt_ != s) {
    if (prompt_) send_prompt();
    if (s->tls) prompt_ = s;
  }
  if (s->tls) {
    TlsState *t = s->tls;
    if (t->failed || t->sent_close) return -EPIPE;
    if (!len) {
    } else if (t->handshaking) {
      if (!t->pt.append(buf, len, &wblocks_)) return -ENOMEM;
    } else if (t->tx_offload && !t->seal && !t->ctrl_type && !plain_waiting(t)) {
      // The kernel encrypts: plaintext goes to the socket as it is.
      if (!s->wq.append(buf, len, &wblocks_)) return -ENOMEM;
      t->appended += len;
      if (!s->send_inflight) mark_dirty(s);
    } else if (!t->pt.size() && t->stage_len + len <= kTlsRecordMax) {
      // Waits for the poll, to share a record with the iteration's other
      // small writes (tls_flush_pt()).
      if (!reserve_records(1) || !tls_stage(t, buf, len)) return -ENOMEM;
      mark_dirty(s);
    } else {
      if (!reserve_records(1)) return -ENOMEM;
      if (!tls_flush_pt(s) || !tls_encrypt(s, buf, len)) return t->failed ? -EPIPE : -ENOMEM;
      encrypted_unsent_ += len;
      if (encrypted_unsent_ >= kSendEarlyBytes) send_early();
    }
  } else if (len) {
    size_t sent = direct_send(s, buf, len);
    buf = static_cast<const char *>(buf) + sent;
    len -= sent;
    if (len) {
      if (!s->wq.append(buf, len, &wblocks_)) return -ENOMEM;
      if (!s->send_inflight) mark_dirty(s);
    }
  }
  uint64_t size = s->wq.size() + (s->tls ? plain_waiting(s->tls) : 0);
  if (size > s->high) s->over_high = true;
  return static_cast<int64_t>(size);
}

int64_t Engine::stream_write_ref(uint64_t token, const void *buf, size_t len, uint64_t ref) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (s->shut_req || s->aborting || s->write_failed || s->finished) return -EPIPE;
  // TLS encrypts into the queue (a copy anyway) and kernel TLS is fed at
  // record boundaries the engine tracks by its own blocks: copy there.
  if (s->tls) return -EOPNOTSUPP;
  if (len && reserve_records(1)) {
    size_t sent = direct_send(s, buf, len);
    if (sent == len) {
      // All of it is with the kernel already: released at once.
      emit(s->token, 0, KLOOP_COMPLETION_MORE, ref, KLOOP_EVENT_WRITE_RELEASE, 0);
      return 0;
    }
    buf = static_cast<const char *>(buf) + sent;
    len -= sent;
  }
  if (!s->wq.append_borrowed(buf, len, ref)) return -ENOMEM;
  ++borrowed_;
  if (!s->send_inflight) mark_dirty(s);
  uint64_t size = s->wq.size();
  if (size > s->high) s->over_high = true;
  return static_cast<int64_t>(size);
}

int Engine::stream_set_limits(uint64_t token, uint64_t high, uint64_t low) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (low > high) return -EINVAL;
  s->high = high;
  s->low = low;
  if (s->wq.size() > high) s->over_high = true;
  return 0;
}

int64_t Engine::stream_write_size(uint64_t token) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  return static_cast<int64_t>(s->wq.size() + (s->tls ? plain_waiting(s->tls) : 0));
}

int Engine::stream_shutdown(uint64_t token) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (s->shut_req || s->closing || s->aborting || s->finished) return -EPIPE;
  if (s->tls) return -EOPNOTSUPP;
  s->shut_req = true;
  mark_dirty(s);
  return 0;
}

int Engine::stream_close(uint64_t token) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (s->closing || s->aborting || s->finished) return -EALREADY;
  s->closing = true;
  drop_held(s);
  // Decided at the next poll, so writes made after close() in the same
  // iteration still go out before the stream ends.
  mark_dirty(s);
  return 0;
}

int Engine::stream_abort(uint64_t token) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (s->aborting) return -EALREADY;
  if (s->finished) return 0;  // a close already finished; its CLOSED is on the way
  // CLOSED, an ERROR, and a WRITE_RELEASE per borrowed block dropped here.
  if (!reserve_records(2 + borrowed_)) return -ENOMEM;
  s->aborting = true;
  // A send may be prepared or in flight: its iovecs point into the queue,
  // which is freed when that send completes (or when the stream finishes).
  if (!s->send_inflight) wq_clear(s);
  drop_held(s);
  progress(s);
  return 0;
}

}  // namespace kl
