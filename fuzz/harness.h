// Shared pieces of the libkloop fuzz targets: an input reader, a tracker of
// live tokens that checks the completion promise of kloop.h, and the
// per-input set of file descriptors.
//
// The promise checked (kloop.h convention 3): a submit that returns 0 gets
// exactly one final completion; one that returns < 0 gets none; nothing
// arrives for a token that is not live; -EEXIST only for a live token.
// A violation calls Fail(), which aborts, so libFuzzer (or the replay main)
// reports the input.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <unordered_map>
#include <vector>

#include "kloop.h"

namespace kfuzz {

[[noreturn]] inline void Fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("kloop fuzz invariant violated: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::abort();
}

// Set KLOOP_FUZZ_TRACE=1 to print every call and record (to debug a crash).
inline bool Tracing() {
  static bool on = std::getenv("KLOOP_FUZZ_TRACE") != nullptr;
  return on;
}

inline void Trace(const char *fmt, ...) {
  if (!Tracing()) return;
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
}

// Reads typed values from the fuzz input; past the end it yields zeros.
class Reader {
 public:
  Reader(const uint8_t *p, size_t n) : p_(p), n_(n) {}
  bool empty() const { return n_ == 0; }
  uint8_t u8() {
    if (n_ == 0) return 0;
    --n_;
    return *p_++;
  }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() { return static_cast<uint32_t>(u16()) | (static_cast<uint32_t>(u16()) << 16); }
  uint64_t u64() { return static_cast<uint64_t>(u32()) | (static_cast<uint64_t>(u32()) << 32); }
  // Pick one of the entries of a table.
  template <typename T, size_t N>
  T pick(const T (&table)[N]) {
    return table[u8() % N];
  }

 private:
  const uint8_t *p_;
  size_t n_;
};

// Tokens come from a small set so that reuse, duplicates and wrap-around
// (values next to UINT64_MAX) are frequent.
inline uint64_t TokenOf(uint8_t b) {
  if (b & 0x80) return UINT64_MAX - (b & 7);
  return b & 15;
}

// What the harness keeps for a live token.
struct Live {
  bool stream = false;
  bool multishot = false;
  bool accept = false;    // result >= 0 is a new fd the harness must close
  int owned_fd = -1;      // stream fd the harness closes after CLOSED
  std::vector<char> buf;  // caller-pinned buffer of recv/read/...
  bool cancel_asked = false;
};

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class Tracker {
 public:
  explicit Tracker(kloop_t *loop) : loop_(loop) {
    uint64_t base = 0, size = 0;
    if (kloop_buffer_arena(loop, &base, &size) == 0) {
      arena_base_ = base;
      arena_size_ = size;
    }
  }

  bool IsLive(uint64_t tok) const { return live_.count(tok) != 0; }
  bool IsStream(uint64_t tok) const {
    auto it = live_.find(tok);
    return it != live_.end() && it->second.stream;
  }

  // Record the outcome of a submit or attach.
  void Submitted(const char *what, uint64_t tok, int64_t rc, Live &&l) {
    Trace("%s tok=%llu -> %lld", what, ULL(tok), static_cast<long long>(rc));
    if (rc > 0) Fail("%s returned %lld (> 0)", what, static_cast<long long>(rc));
    if (rc == 0) {
      if (IsLive(tok)) Fail("%s accepted token %llu that is live", what, ULL(tok));
      live_.emplace(tok, std::move(l));
      return;
    }
    if (rc < -4095) Fail("%s returned %lld, not a -errno", what, static_cast<long long>(rc));
    if (rc == -EEXIST && !IsLive(tok)) Fail("%s gave -EEXIST for free token %llu", what, ULL(tok));
    if (l.owned_fd >= 0) ::close(l.owned_fd);
  }

  // Check a call addressed to a stream token. With invalid other arguments
  // (args_ok false) -EINVAL may come before the token lookup.
  void StreamCall(const char *what, uint64_t tok, int64_t rc, bool args_ok = true) {
    Trace("%s tok=%llu -> %lld", what, ULL(tok), static_cast<long long>(rc));
    if (!args_ok && rc == -EINVAL) return;
    if (!IsStream(tok) && rc != -ENOENT)
      Fail("%s on token %llu that is no stream returned %lld", what, ULL(tok),
           static_cast<long long>(rc));
    if (IsStream(tok) && rc == -ENOENT)
      Fail("%s on live stream %llu returned -ENOENT", what, ULL(tok));
  }

  void Cancel(uint64_t tok) {
    int rc = kloop_cancel(loop_, tok);
    Trace("cancel tok=%llu -> %d", ULL(tok), rc);
    if (!IsLive(tok) && rc != -ENOENT) Fail("cancel of free token %llu returned %d", ULL(tok), rc);
    if (rc == 0) live_[tok].cancel_asked = true;
    if (rc != 0 && rc != -ENOENT && rc != -EALREADY) Fail("cancel returned %d", rc);
  }

  // One kloop_poll() with its records checked.
  int Poll(uint32_t max, int64_t timeout_ns) {
    if (max == 0 || max > kMaxRecords) max = kMaxRecords;
    int n = kloop_poll(loop_, out_, max, timeout_ns);
    Trace("poll(max %u, %lld ns) -> %d", max, static_cast<long long>(timeout_ns), n);
    if (n == -EINTR) return 0;
    if (n < 0) Fail("kloop_poll returned %d", n);
    if (static_cast<uint32_t>(n) > max) Fail("kloop_poll filled %d > max %u", n, max);
    for (int i = 0; i < n; ++i) {
      // DATA_NEXT: set exactly when the next record of this array is DATA
      // of the same stream.
      bool next_same = i + 1 < n && out_[i].event == KLOOP_EVENT_DATA &&
                       out_[i + 1].event == KLOOP_EVENT_DATA && out_[i + 1].token == out_[i].token;
      if (((out_[i].flags & KLOOP_COMPLETION_DATA_NEXT) != 0) != next_same)
        Fail("record %d of %d (token %llu event %u): DATA_NEXT flag %#x", i, n, ULL(out_[i].token),
             out_[i].event, out_[i].flags);
      Record(out_[i]);
    }
    return n;
  }

  // Cancel everything, then poll until every live token has completed.
  void Finish(int64_t limit_ns = 3'000'000'000LL) {
    for (auto &[tok, l] : live_) {
      if (l.stream) {
        int rc = kloop_stream_abort(loop_, tok);
        if (rc != 0 && rc != -EALREADY) Fail("abort of live stream %llu returned %d", ULL(tok), rc);
      } else {
        int rc = kloop_cancel(loop_, tok);
        if (rc != 0 && rc != -EALREADY && rc != -ENOENT)
          Fail("final cancel of %llu returned %d", ULL(tok), rc);
      }
    }
    int64_t end = NowNs() + limit_ns;
    while (!live_.empty()) {
      if (NowNs() > end)
        Fail("%zu live token(s) never got a final completion, e.g. %llu (%s)", live_.size(),
             ULL(live_.begin()->first), live_.begin()->second.stream ? "stream" : "op");
      Poll(kMaxRecords, 5'000'000);
    }
  }

  // After kloop_destroy(): the engine dropped the remaining completions;
  // release what the harness kept for them.
  void Abandon() {
    for (auto &[tok, l] : live_)
      if (l.owned_fd >= 0) ::close(l.owned_fd);
    live_.clear();
  }

  uint64_t checksum() const { return sum_; }

 private:
  static unsigned long long ULL(uint64_t v) { return static_cast<unsigned long long>(v); }

  void Record(const kloop_completion &c) {
    Trace("  record tok=%llu event=%u result=%d flags=%#x aux=%#x", ULL(c.token), c.event, c.result,
          c.flags, c.aux);
    auto it = live_.find(c.token);
    if (it == live_.end())
      Fail("completion for token %llu that is not live (event %u result %d flags %#x)",
           ULL(c.token), c.event, c.result, c.flags);
    Live &l = it->second;
    bool more = c.flags & KLOOP_COMPLETION_MORE;
    if (c.flags & ~(KLOOP_COMPLETION_MORE | KLOOP_COMPLETION_DATA_NEXT))
      Fail("unknown completion flags %#x", c.flags);
    if (l.stream) {
      if (c.event == KLOOP_EVENT_OP || c.event > KLOOP_EVENT_WRITE_DONE)
        Fail("stream %llu got event %u", ULL(c.token), c.event);
      if ((c.event == KLOOP_EVENT_CLOSED) == more)
        Fail("stream %llu: event %u with flags %#x", ULL(c.token), c.event, c.flags);
      if (c.event == KLOOP_EVENT_DATA) {
        if (c.result <= 0) Fail("DATA with result %d", c.result);
        if (c.data < arena_base_ ||
            c.data + static_cast<uint64_t>(c.result) > arena_base_ + arena_size_)
          Fail("DATA outside the buffer arena");
        // Touch every byte: the record must point at readable memory.
        const unsigned char *p = reinterpret_cast<const unsigned char *>(c.data);
        for (int32_t i = 0; i < c.result; ++i) sum_ += p[i];
      }
    } else {
      if (c.event != KLOOP_EVENT_OP) Fail("operation %llu got event %u", ULL(c.token), c.event);
      if (more && !l.multishot) Fail("one-shot operation %llu got a MORE completion", ULL(c.token));
      if (l.accept && c.result >= 0) ::close(c.result);
      if (c.data != 0) {
        const unsigned char *p = reinterpret_cast<const unsigned char *>(c.data);
        for (uint32_t i = 0; i < (c.aux & 0xffff) && i < 128; ++i) sum_ += p[i];
      }
    }
    if (!more) {
      if (l.owned_fd >= 0) ::close(l.owned_fd);
      live_.erase(it);
    }
  }

  static constexpr uint32_t kMaxRecords = 32;
  kloop_t *loop_;
  std::unordered_map<uint64_t, Live> live_;
  kloop_completion out_[kMaxRecords];
  uint64_t arena_base_ = 0, arena_size_ = 0;
  uint64_t sum_ = 0;
};

// Once per process: the peer side writes into sockets and pipes whose other
// end may be shut down; that must give EPIPE, not kill the fuzzer.
// After the one stream of an input reported CLOSED (and the poll after
// it returned its buffers): no stream is left and no receive or plaintext
// buffer is in use (one the stream kept would be a leak).
inline void CheckStreamGone(kloop_t *loop) {
  kloop_stats st{};
  st.size = sizeof st;
  if (kloop_get_stats(loop, &st) != 0) Fail("kloop_get_stats failed");
  if (st.streams != 0)
    Fail("%llu stream(s) left after CLOSED", static_cast<unsigned long long>(st.streams));
  if (st.buffers_in_use != 0)
    Fail("%llu buffer(s) in use after the stream closed",
         static_cast<unsigned long long>(st.buffers_in_use));
}

inline void IgnoreSigpipe() {
  static bool done = [] {
    ::signal(SIGPIPE, SIG_IGN);
    return true;
  }();
  (void)done;
}

// The open file descriptors of this process (to close what an input leaked,
// e.g. accepted fds whose completion was dropped by kloop_destroy()).
inline std::set<int> OpenFds() {
  std::set<int> fds;
  DIR *d = ::opendir("/proc/self/fd");
  if (!d) return fds;
  int self = ::dirfd(d);
  while (dirent *e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    int fd = std::atoi(e->d_name);
    if (fd != self) fds.insert(fd);
  }
  ::closedir(d);
  return fds;
}

inline void CloseNewFds(const std::set<int> &before) {
  for (int fd : OpenFds())
    if (!before.count(fd)) ::close(fd);
}

// The descriptors an input plays with. Index 0..kCount-1.
struct Fds {
  enum { kSockA, kSockB, kDgramA, kDgramB, kPipeR, kPipeW, kFile, kListener, kCount };
  int fd[kCount];
  sockaddr_un listen_addr{};
  socklen_t listen_len = 0;

  Fds() {
    for (int &f : fd) f = -1;
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0) {
      fd[kSockA] = sv[0];
      fd[kSockB] = sv[1];
    }
    if (::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) == 0) {
      fd[kDgramA] = sv[0];
      fd[kDgramB] = sv[1];
    }
    if (::pipe2(sv, O_CLOEXEC | O_NONBLOCK) == 0) {
      fd[kPipeR] = sv[0];
      fd[kPipeW] = sv[1];
    }
    fd[kFile] = ::memfd_create("kloop-fuzz", MFD_CLOEXEC);
    if (fd[kFile] >= 0) {
      static char page[4096];
      if (page[0] == 0) std::memset(page, 'f', sizeof page);
      (void)!::write(fd[kFile], page, sizeof page);
    }
    static unsigned counter = 0;
    listen_addr.sun_family = AF_UNIX;
    int n = std::snprintf(listen_addr.sun_path + 1, sizeof listen_addr.sun_path - 1,
                          "kloop-fuzz-%d-%u", ::getpid(), counter++);
    listen_len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    fd[kListener] = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd[kListener] >= 0 &&
        (::bind(fd[kListener], reinterpret_cast<sockaddr *>(&listen_addr), listen_len) != 0 ||
         ::listen(fd[kListener], 16) != 0)) {
      ::close(fd[kListener]);
      fd[kListener] = -1;
    }
  }
  ~Fds() {
    for (int f : fd)
      if (f >= 0) ::close(f);
  }
  int pick(uint8_t b) const { return fd[b % kCount]; }
};

}  // namespace kfuzz
