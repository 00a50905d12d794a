// Fuzz target (a): the operation table. The input is decoded into a random
// sequence of submits, polls, cancels and stream calls on one loop with
// real sockets, pipes and a file; tokens come from a small set (so they are
// reused, duplicated and wrap around UINT64_MAX). The tracker checks that
// every successfully submitted token gets exactly one final completion.
//
// Input layout: byte 0 = ring/buffer sizes, byte 1 = capabilities to
// disable, then one opcode byte per step followed by its arguments. The
// kDestroy step ends the input with kloop_destroy() on a busy loop.
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "harness.h"

using namespace kfuzz;

namespace {

constexpr uint64_t kLadder[8] = {KLOOP_CAP_MULTISHOT_RECV, KLOOP_CAP_BUF_RING,
                                 KLOOP_CAP_DEFER_TASKRUN,  KLOOP_CAP_SINGLE_ISSUER,
                                 KLOOP_CAP_WAITID,         KLOOP_CAP_MULTISHOT_ACCEPT,
                                 KLOOP_CAP_MULTISHOT_POLL, KLOOP_CAP_EXT_ARG};

// Bytes that operations send; large enough for every length used below.
const char *Payload() {
  static char buf[65536];
  static bool init = [] {
    for (size_t i = 0; i < sizeof buf; ++i) buf[i] = static_cast<char>(i * 7);
    return true;
  }();
  (void)init;
  return buf;
}

enum Opcode : uint8_t {
  kNop,
  kTimeout,
  kRecv,
  kSend,
  kRecvmsg,
  kSendmsg,
  kRead,
  kWrite,
  kPoll,
  kAccept,
  kConnect,
  kShutdown,
  kCancel,
  kCancelFd,
  kLoopPoll,
  kAttach,
  kStreamWrite,
  kPauseResume,
  kStreamShutdown,
  kStreamClose,
  kStreamAbort,
  kSetLimits,
  kPeerWrite,
  kPeerRead,
  kSplice,
  kClose,
  kChildExit,
  kWriteSize,
  kDestroy,
  kOpcodeCount
};

void Run(Reader &in) {
  uint8_t sizes = in.u8();
  uint8_t dis = in.u8();
  kloop_config cfg;
  kloop_config_init(&cfg);
  cfg.sq_entries = 1u << (sizes & 3);                     // 1..8
  cfg.cq_entries = cfg.sq_entries << ((sizes >> 2) & 3);  // x1..x8
  cfg.buf_count = 1u << ((sizes >> 4) & 3);               // 1..8
  cfg.buf_size = (sizes & 0x40) ? 1024 : 256;
  if (sizes & 0x80) cfg.flags |= KLOOP_CONFIG_NO_DEFER_TASKRUN;
  for (int i = 0; i < 8; ++i)
    if (dis & (1u << i)) cfg.disable |= kLadder[i];

  kloop_t *loop = nullptr;
  int rc = kloop_create(&cfg, &loop);
  if (rc != 0) Fail("kloop_create with a valid config returned %d", rc);

  Fds fds;
  Tracker t(loop);
  const char *payload = Payload();
  std::vector<int> connectors;  // client sockets made for kConnect

  bool destroyed = false;
  for (int step = 0; step < 256 && !in.empty() && !destroyed; ++step) {
    uint8_t op = in.u8() % kOpcodeCount;
    uint64_t tok = TokenOf(in.u8());
    switch (op) {
      case kNop:
        t.Submitted("nop", tok, kloop_submit_nop(loop, tok), {});
        break;
      case kTimeout:
        t.Submitted("timeout", tok, kloop_submit_timeout(loop, tok, in.u8() * 10'000ull), {});
        break;
      case kRecv:
      case kRecvmsg:
      case kRead: {
        int fd = fds.pick(in.u8());
        uint32_t len = in.u16() % 4097;
        Live l;
        l.buf.resize(len);
        void *buf = len ? l.buf.data() : nullptr;
        if (op == kRecv) {
          static const uint32_t flags[] = {0, MSG_PEEK, MSG_DONTWAIT, MSG_WAITALL};
          t.Submitted("recv", tok, kloop_submit_recv(loop, tok, fd, buf, len, in.pick(flags)),
                      std::move(l));
        } else if (op == kRecvmsg) {
          t.Submitted("recvmsg", tok, kloop_submit_recvmsg(loop, tok, fd, buf, len, 0),
                      std::move(l));
        } else {
          uint64_t off = (in.u8() & 1) ? KLOOP_OFFSET_CURRENT : in.u16();
          t.Submitted("read", tok, kloop_submit_read(loop, tok, fd, buf, len, off), std::move(l));
        }
        break;
      }
      case kSend:
      case kSendmsg:
      case kWrite: {
        int fd = fds.pick(in.u8());
        uint32_t len = in.u16();
        if (op == kSend) {
          t.Submitted("send", tok, kloop_submit_send(loop, tok, fd, payload, len, 0), {});
        } else if (op == kSendmsg) {
          const void *addr = nullptr;
          uint32_t alen = 0;
          if (in.u8() & 1) {
            addr = &fds.listen_addr;
            alen = fds.listen_len;
          }
          t.Submitted("sendmsg", tok,
                      kloop_submit_sendmsg(loop, tok, fd, payload, len % 4096, addr, alen, 0), {});
        } else {
          uint64_t off = (in.u8() & 1) ? KLOOP_OFFSET_CURRENT : in.u16();
          t.Submitted("write", tok, kloop_submit_write(loop, tok, fd, payload, len, off), {});
        }
        break;
      }
      case kPoll: {
        int fd = fds.pick(in.u8());
        static const uint32_t ev[] = {POLLIN, POLLOUT, POLLIN | POLLOUT, POLLPRI, POLLRDHUP};
        uint32_t events = in.pick(ev);
        bool multi = in.u8() & 1;
        Live l;
        l.multishot = multi;
        t.Submitted("poll", tok,
                    kloop_submit_poll(loop, tok, fd, events, multi ? KLOOP_OP_MULTISHOT : 0),
                    std::move(l));
        break;
      }
      case kAccept: {
        uint8_t b = in.u8();
        int fd = (b & 0x80) ? fds.pick(b) : fds.fd[Fds::kListener];
        bool multi = b & 1;
        Live l;
        l.multishot = multi;
        l.accept = true;
        t.Submitted("accept", tok,
                    kloop_submit_accept(loop, tok, fd, multi ? KLOOP_OP_MULTISHOT : 0),
                    std::move(l));
        break;
      }
      case kConnect: {
        int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (s < 0) break;
        connectors.push_back(s);
        t.Submitted("connect", tok,
                    kloop_submit_connect(loop, tok, s, &fds.listen_addr, fds.listen_len), {});
        break;
      }
      case kShutdown:
        t.Submitted("shutdown", tok,
                    kloop_submit_shutdown(loop, tok, fds.pick(in.u8()), in.u8() % 4), {});
        break;
      case kCancel:
        t.Cancel(tok);
        break;
      case kCancelFd: {
        int n = kloop_cancel_fd(loop, fds.pick(in.u8()));
        if (n < 0) Fail("cancel_fd returned %d", n);
        break;
      }
      case kLoopPoll: {
        uint8_t b = in.u8();
        t.Poll(1 + (b & 15), (b & 0x10) ? (b >> 5) * 200'000ll : 0);
        break;
      }
      case kAttach: {
        uint8_t b = in.u8();
        static const int which[] = {Fds::kSockA, Fds::kSockB, Fds::kPipeR, Fds::kPipeW,
                                    Fds::kDgramA};
        int src = fds.fd[which[b % 5]];
        uint32_t flags = (b >> 3) & 0x0f;  // the four defined flags
        if (b == 0xff) flags = 1u << 7;    // an unknown flag now and then
        if (which[b % 5] == Fds::kPipeR || which[b % 5] == Fds::kPipeW) flags |= KLOOP_STREAM_FILE;
        int dup = src >= 0 ? ::fcntl(src, F_DUPFD_CLOEXEC, 0) : -1;
        if (dup < 0) break;
        Live l;
        l.stream = true;
        if (!(flags & KLOOP_STREAM_CLOSE_FD)) l.owned_fd = dup;
        int r = kloop_stream_attach(loop, tok, dup, flags);
        if (r != 0 && (flags & KLOOP_STREAM_CLOSE_FD)) ::close(dup);  // not taken over
        t.Submitted("stream_attach", tok, r, std::move(l));
        break;
      }
      case kStreamWrite: {
        uint32_t len = in.u16();
        int64_t r = kloop_stream_write(loop, tok, len ? payload : nullptr, len);
        t.StreamCall("stream_write", tok, r);
        if (r < 0 && r != -ENOENT && r != -EPIPE && r != -ENOMEM)
          Fail("stream_write returned %lld", static_cast<long long>(r));
        break;
      }
      case kPauseResume: {
        int r = (in.u8() & 1) ? kloop_stream_pause(loop, tok) : kloop_stream_resume(loop, tok);
        t.StreamCall("stream_pause/resume", tok, r);
        break;
      }
      case kStreamShutdown:
        t.StreamCall("stream_shutdown", tok, kloop_stream_shutdown(loop, tok));
        break;
      case kStreamClose:
        t.StreamCall("stream_close", tok, kloop_stream_close(loop, tok));
        break;
      case kStreamAbort:
        t.StreamCall("stream_abort", tok, kloop_stream_abort(loop, tok));
        break;
      case kSetLimits: {
        uint64_t hi = in.u16(), lo = in.u16();
        int r = kloop_stream_set_limits(loop, tok, hi, lo);
        t.StreamCall("stream_set_limits", tok, r, lo <= hi);
        if (t.IsStream(tok) && (lo > hi) != (r == -EINVAL))
          Fail("set_limits(%llu, %llu) returned %d", static_cast<unsigned long long>(hi),
               static_cast<unsigned long long>(lo), r);
        break;
      }
      case kWriteSize: {
        int64_t r = kloop_stream_write_size(loop, tok);
        t.StreamCall("stream_write_size", tok, r);
        break;
      }
      case kPeerWrite: {
        int fd = fds.pick(in.u8());
        (void)!::write(fd, payload, in.u16() % 8192);
        break;
      }
      case kPeerRead: {
        static char sink[65536];
        int fd = fds.pick(in.u8());
        (void)!::read(fd, sink, sizeof sink);
        break;
      }
      case kSplice: {
        uint8_t b = in.u8();
        int fin = (b & 1) ? fds.fd[Fds::kFile] : fds.fd[Fds::kPipeR];
        int fout = (b & 1) ? fds.fd[Fds::kPipeW] : fds.fd[Fds::kSockA];
        if (b & 0x80) fin = fds.pick(b >> 1);
        uint64_t off_in = (b & 1) ? in.u16() % 8192 : KLOOP_OFFSET_CURRENT;
        t.Submitted(
            "splice", tok,
            kloop_submit_splice(loop, tok, fin, off_in, fout, KLOOP_OFFSET_CURRENT, in.u16(), 0),
            {});
        break;
      }
      case kClose: {
        int src = fds.pick(in.u8());
        int dup = src >= 0 ? ::fcntl(src, F_DUPFD_CLOEXEC, 0) : -1;
        if (dup < 0) break;
        Live l;
        int r = kloop_submit_close(loop, tok, dup);
        if (r != 0) l.owned_fd = dup;  // closed by Submitted()
        t.Submitted("close", tok, r, std::move(l));
        break;
      }
      case kDestroy: {
        // Destroy with whatever is in flight: it must cancel everything,
        // wait for the kernel and free all (ASan/LSan check the rest).
        rc = kloop_destroy(loop);
        if (rc != 0) Fail("kloop_destroy with work in flight returned %d", rc);
        t.Abandon();
        destroyed = true;
        break;
      }
      case kChildExit:
        // Not our child: must complete with an error, never hang.
        t.Submitted("child_exit", tok,
                    kloop_submit_child_exit(loop, tok, (in.u8() & 1) ? 1 : ::getpid()), {});
        break;
    }
  }
  if (!destroyed) {
    // Let what is in flight progress a little, then end everything.
    t.Poll(32, 0);
    t.Finish();
    // Nothing may arrive after every token completed.
    if (t.Poll(32, 1'000'000) != 0) Fail("records after every token had completed");
    rc = kloop_destroy(loop);
    if (rc != 0) Fail("kloop_destroy returned %d", rc);
  }
  for (int s : connectors) ::close(s);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  IgnoreSigpipe();
  std::set<int> before = OpenFds();
  {
    Reader in(data, size);
    Run(in);
  }
  CloseNewFds(before);
  return 0;
}
