// Helpers shared by the libkloop engine tests: a loop owner, a completion
// collector that copies out everything a record points at (it is only valid
// until the next kloop_poll), and real sockets/pipes to drive the engine.
//
// The tests are black-box: they use nothing but kloop.h and the kernel.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kloop.h"

namespace kt {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

inline constexpr int64_t kMs = 1000 * 1000;
// Upper bound for anything the tests wait on; a healthy engine answers in
// microseconds, so hitting it means a completion was lost.
inline constexpr auto kDeadline = 5s;

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd &) = delete;
  Fd &operator=(const Fd &) = delete;
  Fd(Fd &&o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd &operator=(Fd &&o) noexcept {
    reset(std::exchange(o.fd_, -1));
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  operator int() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// True when fd is an open descriptor of this process.
inline bool FdOpen(int fd) { return ::fcntl(fd, F_GETFD) != -1 || errno != EBADF; }

// One completion record with the bytes it pointed at copied out.
struct Event {
  uint64_t token = 0;
  int32_t result = 0;
  uint32_t flags = 0;
  uint64_t data = 0;
  uint32_t event = 0;
  uint32_t aux = 0;
  std::string bytes;  // DATA: the payload; else the address `data` points at
  bool more() const { return (flags & KLOOP_COMPLETION_MORE) != 0; }
};

std::string Describe(const Event &e);

// Owns a loop and drives kloop_poll(), keeping every record it returned.
// It checks the exactly-once promise as it goes: a token whose final
// completion was seen must not produce another record until the test says
// it has been reused (Expect()).
class Driver {
 public:
  Driver() = default;
  explicit Driver(const kloop_config *cfg) { Create(cfg); }
  ~Driver() { Destroy(); }
  Driver(const Driver &) = delete;
  Driver &operator=(const Driver &) = delete;

  int Create(const kloop_config *cfg) {
    create_rc_ = kloop_create(cfg, &loop_);
    return create_rc_;
  }
  int create_rc() const { return create_rc_; }
  int Destroy() {
    int rc = 0;
    if (loop_) rc = kloop_destroy(loop_);
    loop_ = nullptr;
    return rc;
  }
  kloop_t *loop() const { return loop_; }
  operator kloop_t *() const { return loop_; }

  // One kloop_poll(); returns its result and appends the records.
  int Poll(int64_t timeout_ns, uint32_t max = 64);
  // Poll until pred() holds or the deadline passes; returns pred().
  bool RunUntil(const std::function<bool()> &pred, std::chrono::nanoseconds limit = kDeadline);
  // Poll until the final completion of token arrives; returns it. Fails the
  // test (and returns a record with token ~0 and result INT32_MIN) if it does
  // not come in time.
  Event WaitFinal(uint64_t token, std::chrono::nanoseconds limit = kDeadline);
  // Poll until a record of `token` with this event kind arrives (not yet
  // consumed by an earlier call); returns it.
  Event WaitEvent(uint64_t token, uint32_t event, std::chrono::nanoseconds limit = kDeadline);
  // Poll for `d` and collect whatever comes.
  void Drain(std::chrono::nanoseconds d);

  // Records of this token so far (in order).
  std::vector<Event> Of(uint64_t token) const;
  std::vector<Event> Of(uint64_t token, uint32_t event) const;
  // Concatenated DATA payload of a stream token.
  std::string DataOf(uint64_t token) const;
  size_t DataSizeOf(uint64_t token) const;
  bool HasFinal(uint64_t token) const { return finals_.count(token) != 0 && finals_.at(token) > 0; }
  int FinalCount(uint64_t token) const {
    auto it = finals_.find(token);
    return it == finals_.end() ? 0 : it->second;
  }
  // Forget the history of a token before reusing it.
  void Forget(uint64_t token);
  const std::vector<Event> &events() const { return events_; }

  // When set, DATA payloads are only counted, not stored (large transfers).
  void set_store_data(bool v) { store_data_ = v; }
  // Called for every record as it is collected (payload still valid).
  std::function<void(const kloop_completion &)> on_record;

 private:
  kloop_t *loop_ = nullptr;
  int create_rc_ = -1;
  bool store_data_ = true;
  std::vector<Event> events_;
  std::map<uint64_t, int> finals_;
  std::map<uint64_t, size_t> data_bytes_;
  std::map<std::pair<uint64_t, uint32_t>, size_t> consumed_;
};

// A config with the defaults, then modified by the caller.
inline kloop_config DefaultConfig() {
  kloop_config c;
  std::memset(&c, 0xA5, sizeof c);
  kloop_config_init(&c);
  return c;
}

// kloop_caps.enabled as kloop.h defines it: kernel minus config.disable,
// minus what depends on an absent bit.
inline uint64_t ExpectedEnabled(uint64_t kernel, uint64_t disable, uint32_t flags) {
  uint64_t en = kernel & ~disable;
  if (flags & KLOOP_CONFIG_NO_DEFER_TASKRUN)
    en &= ~(KLOOP_CAP_SINGLE_ISSUER | KLOOP_CAP_DEFER_TASKRUN);
  if (flags & KLOOP_CONFIG_SQPOLL) en &= ~KLOOP_CAP_DEFER_TASKRUN;
  if (!(en & KLOOP_CAP_SINGLE_ISSUER)) en &= ~(KLOOP_CAP_DEFER_TASKRUN | KLOOP_CAP_REG_RING_FD);
  if (!(en & KLOOP_CAP_BUF_RING))
    en &= ~(KLOOP_CAP_MULTISHOT_RECV | KLOOP_CAP_RECV_BUNDLE | KLOOP_CAP_BUF_RING_INC);
  return en;
}

inline kloop_caps GetCaps(kloop_t *loop) {
  kloop_caps c{};
  c.size = sizeof c;
  kloop_get_caps(loop, &c);
  return c;
}

inline kloop_stats GetStats(kloop_t *loop) {
  kloop_stats s{};
  s.size = sizeof s;
  kloop_get_stats(loop, &s);
  return s;
}

// ---- sockets ----------------------------------------------------------

struct Addr {
  sockaddr_storage ss{};
  socklen_t len = 0;
  const sockaddr *sa() const { return reinterpret_cast<const sockaddr *>(&ss); }
  int family() const { return ss.ss_family; }
  int port() const;
};

Addr LocalAddr(int fd);
Addr PeerAddr(int fd);
Addr Loopback(int family, int port = 0);

// A listening TCP socket on the loopback address of `family`.
Fd TcpListener(int family = AF_INET, Addr *addr = nullptr);
// A connected TCP pair over loopback: first is the "engine" side (accepted),
// second the "peer" side. Both are blocking.
std::pair<Fd, Fd> TcpPair(int family = AF_INET);
// A connected AF_UNIX pair of `type`.
std::pair<Fd, Fd> UnixPair(int type = SOCK_STREAM);
// A UDP socket bound to the loopback of `family`.
Fd UdpSocket(int family, Addr *addr = nullptr);
// An AF_UNIX datagram socket bound to a unique abstract name.
Fd UnixDgram(Addr *addr);
// pipe2(O_CLOEXEC): first = read end, second = write end.
std::pair<Fd, Fd> Pipe(int flags = O_CLOEXEC);
// An anonymous regular file with `content`.
Fd TempFile(const std::string &content = {});

// Make the kernel's buffering small so that the write queue cannot be
// swallowed whole by it: small send buffer on `fd` (the engine's side).
void ShrinkBuffers(int fd, int peer);

// Blocking helpers for the peer side.
bool WriteAll(int fd, const void *buf, size_t len);
inline bool WriteAll(int fd, const std::string &s) { return WriteAll(fd, s.data(), s.size()); }
// Read exactly n bytes (or until EOF/error); waits at most `limit`.
std::string ReadN(int fd, size_t n, std::chrono::nanoseconds limit = kDeadline);
// Read until EOF; waits at most `limit`.
std::string ReadToEof(int fd, std::chrono::nanoseconds limit = kDeadline);
// Bytes readable right now without blocking (drains them).
std::string ReadAvailable(int fd);
// Wait until fd is readable (or hung up).
bool WaitReadable(int fd, std::chrono::nanoseconds limit = kDeadline);

// Deterministic pattern for large transfers.
inline uint8_t PatternByte(uint64_t i) { return static_cast<uint8_t>((i * 131u) ^ (i >> 11)); }
std::string Pattern(uint64_t start, size_t n);

// How many of the pages holding these addresses are in memory (mincore).
size_t ResidentPages(const std::set<uint64_t> &addrs);

// A signal handler installed without SA_RESTART; restores the old one.
class SignalGuard {
 public:
  explicit SignalGuard(int sig);
  ~SignalGuard();
  static volatile sig_atomic_t hits;

 private:
  int sig_;
  struct sigaction old_ {};
};

}  // namespace kt
