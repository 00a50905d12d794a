#include "common.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#include <atomic>
#include <cstdio>
#include <thread>

namespace kt {

std::string Describe(const Event &e) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "{token=%llu result=%d flags=%#x event=%u aux=%#x data=%#llx}",
                static_cast<unsigned long long>(e.token), e.result, e.flags, e.event, e.aux,
                static_cast<unsigned long long>(e.data));
  return buf;
}

namespace {

// A kloop_poll() with a finite timeout that does not come back is an engine
// bug; rather than hang the whole suite, interrupt it with a signal aimed at
// the polling thread (the engine must then return -EINTR) and fail.
volatile sig_atomic_t g_overrun = 0;

class PollGuard {
 public:
  PollGuard() {
    static bool installed = [] {
      struct sigaction sa {};
      sa.sa_handler = [](int) { g_overrun = 1; };
      sigemptyset(&sa.sa_mask);
      sa.sa_flags = 0;  // no SA_RESTART
      ::sigaction(SIGALRM, &sa, nullptr);
      return true;
    }();
    (void)installed;
    sigevent sev{};
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGALRM;
    sev._sigev_un._tid = ::gettid();
    ok_ = ::timer_create(CLOCK_MONOTONIC, &sev, &timer_) == 0;
  }
  ~PollGuard() {
    if (ok_) ::timer_delete(timer_);
  }
  void Arm(int64_t timeout_ns) {
    if (!ok_ || timeout_ns < 0) return;
    int64_t ns = timeout_ns + 3'000'000'000LL;
    itimerspec its{};
    its.it_value.tv_sec = ns / 1'000'000'000LL;
    its.it_value.tv_nsec = ns % 1'000'000'000LL;
    ::timer_settime(timer_, 0, &its, nullptr);
  }
  void Disarm() {
    if (!ok_) return;
    itimerspec its{};
    ::timer_settime(timer_, 0, &its, nullptr);
  }

 private:
  timer_t timer_{};
  bool ok_ = false;
};

}  // namespace

int Driver::Poll(int64_t timeout_ns, uint32_t max) {
  static thread_local PollGuard guard;
  std::vector<kloop_completion> out(max);
  g_overrun = 0;
  guard.Arm(timeout_ns);
  int n = kloop_poll(loop_, out.data(), max, timeout_ns);
  guard.Disarm();
  if (g_overrun) {
    ADD_FAILURE() << "kloop_poll(timeout " << timeout_ns
                  << " ns) did not return within its timeout + 3 s"
                  << " (returned " << n << " after the watchdog signal)";
    g_overrun = 0;
  }
  if (n <= 0) return n;
  EXPECT_LE(static_cast<uint32_t>(n), max) << "kloop_poll filled more records than asked";
  for (int i = 0; i < n; ++i) {
    const kloop_completion &c = out[i];
    if (on_record) on_record(c);
    Event e;
    e.token = c.token;
    e.result = c.result;
    e.flags = c.flags;
    e.data = c.data;
    e.event = c.event;
    e.aux = c.aux;
    if (c.data != 0) {
      const char *p = reinterpret_cast<const char *>(c.data);
      if (c.event == KLOOP_EVENT_DATA) {
        if (c.result > 0) {
          data_bytes_[c.token] += static_cast<size_t>(c.result);
          if (store_data_) e.bytes.assign(p, static_cast<size_t>(c.result));
        }
      } else {
        e.bytes.assign(p, c.aux & 0xffffu);
      }
    }
    // Exactly once: nothing may follow a final completion of the same token
    // unless the test re-armed it with Forget().
    EXPECT_EQ(FinalCount(c.token), 0) << "record after the final completion: " << Describe(e);
    if (!e.more()) finals_[c.token]++;
    events_.push_back(std::move(e));
  }
  return n;
}

bool Driver::RunUntil(const std::function<bool()> &pred, std::chrono::nanoseconds limit) {
  auto end = Clock::now() + limit;
  while (!pred()) {
    auto left = end - Clock::now();
    if (left <= 0ns) return pred();
    int64_t t = std::min<int64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(left).count(), 50 * kMs);
    int n = Poll(t);
    if (n < 0 && n != -EINTR) {
      ADD_FAILURE() << "kloop_poll failed: " << n << " (" << kloop_strerror(n) << ")";
      return pred();
    }
  }
  return true;
}

Event Driver::WaitFinal(uint64_t token, std::chrono::nanoseconds limit) {
  if (!RunUntil([&] { return HasFinal(token); }, limit)) {
    ADD_FAILURE() << "no final completion for token " << token;
    Event e;
    e.token = ~0ull;
    e.result = INT32_MIN;
    return e;
  }
  for (auto it = events_.rbegin(); it != events_.rend(); ++it)
    if (it->token == token && !it->more()) return *it;
  return {};
}

Event Driver::WaitEvent(uint64_t token, uint32_t event, std::chrono::nanoseconds limit) {
  auto key = std::make_pair(token, event);
  size_t seen = consumed_[key];
  auto count = [&] { return Of(token, event).size(); };
  if (!RunUntil([&] { return count() > seen; }, limit)) {
    ADD_FAILURE() << "no event " << event << " for token " << token;
    Event e;
    e.token = ~0ull;
    e.result = INT32_MIN;
    return e;
  }
  consumed_[key] = seen + 1;
  return Of(token, event)[seen];
}

void Driver::Drain(std::chrono::nanoseconds d) {
  auto end = Clock::now() + d;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(end - Clock::now()).count();
    if (left <= 0) break;
    Poll(left);
  }
}

std::vector<Event> Driver::Of(uint64_t token) const {
  std::vector<Event> r;
  for (const auto &e : events_)
    if (e.token == token) r.push_back(e);
  return r;
}

std::vector<Event> Driver::Of(uint64_t token, uint32_t event) const {
  std::vector<Event> r;
  for (const auto &e : events_)
    if (e.token == token && e.event == event) r.push_back(e);
  return r;
}

std::string Driver::DataOf(uint64_t token) const {
  std::string s;
  for (const auto &e : events_)
    if (e.token == token && e.event == KLOOP_EVENT_DATA) s += e.bytes;
  return s;
}

size_t Driver::DataSizeOf(uint64_t token) const {
  auto it = data_bytes_.find(token);
  return it == data_bytes_.end() ? 0 : it->second;
}

void Driver::Forget(uint64_t token) {
  std::erase_if(events_, [&](const Event &e) { return e.token == token; });
  finals_.erase(token);
  data_bytes_.erase(token);
  std::erase_if(consumed_, [&](const auto &kv) { return kv.first.first == token; });
}

// ---- sockets ------------------------------------------------------------

int Addr::port() const {
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in *>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6 *>(&ss)->sin6_port);
  return -1;
}

Addr LocalAddr(int fd) {
  Addr a;
  a.len = sizeof a.ss;
  if (::getsockname(fd, reinterpret_cast<sockaddr *>(&a.ss), &a.len) != 0) a.len = 0;
  return a;
}

Addr PeerAddr(int fd) {
  Addr a;
  a.len = sizeof a.ss;
  if (::getpeername(fd, reinterpret_cast<sockaddr *>(&a.ss), &a.len) != 0) a.len = 0;
  return a;
}

Addr Loopback(int family, int port) {
  Addr a;
  if (family == AF_INET) {
    auto *s = reinterpret_cast<sockaddr_in *>(&a.ss);
    s->sin_family = AF_INET;
    s->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    s->sin_port = htons(static_cast<uint16_t>(port));
    a.len = sizeof *s;
  } else {
    auto *s = reinterpret_cast<sockaddr_in6 *>(&a.ss);
    s->sin6_family = AF_INET6;
    s->sin6_addr = in6addr_loopback;
    s->sin6_port = htons(static_cast<uint16_t>(port));
    a.len = sizeof *s;
  }
  return a;
}

Fd TcpListener(int family, Addr *addr) {
  Fd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd < 0) return fd;
  Addr a = Loopback(family);
  if (::bind(fd, a.sa(), a.len) != 0 || ::listen(fd, 64) != 0) return Fd();
  if (addr) *addr = LocalAddr(fd);
  return fd;
}

std::pair<Fd, Fd> TcpPair(int family) {
  Addr a;
  Fd l = TcpListener(family, &a);
  Fd c(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (l < 0 || c < 0 || ::connect(c, a.sa(), a.len) != 0) return {};
  Fd s(::accept4(l, nullptr, nullptr, SOCK_CLOEXEC));
  int one = 1;
  ::setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return {std::move(s), std::move(c)};
}

std::pair<Fd, Fd> UnixPair(int type) {
  int sv[2];
  if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) return {};
  return {Fd(sv[0]), Fd(sv[1])};
}

Fd UdpSocket(int family, Addr *addr) {
  Fd fd(::socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  Addr a = Loopback(family);
  if (fd < 0 || ::bind(fd, a.sa(), a.len) != 0) return Fd();
  if (addr) *addr = LocalAddr(fd);
  return fd;
}

Fd UnixDgram(Addr *addr) {
  static std::atomic<int> counter{0};
  Fd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  Addr a;
  auto *un = reinterpret_cast<sockaddr_un *>(&a.ss);
  un->sun_family = AF_UNIX;
  // Abstract name: leading NUL, no file left behind.
  int n = std::snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "kloop-test-%d-%d", ::getpid(),
                        counter++);
  a.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  if (fd < 0 || ::bind(fd, a.sa(), a.len) != 0) return Fd();
  if (addr) *addr = a;
  return fd;
}

std::pair<Fd, Fd> Pipe(int flags) {
  int p[2];
  if (::pipe2(p, flags) != 0) return {};
  return {Fd(p[0]), Fd(p[1])};
}

Fd TempFile(const std::string &content) {
  Fd fd(::memfd_create("kloop-test", MFD_CLOEXEC));
  if (fd >= 0 && !content.empty()) {
    if (!WriteAll(fd, content)) return Fd();
    ::lseek(fd, 0, SEEK_SET);
  }
  return fd;
}

void ShrinkBuffers(int fd, int peer) {
  // Only the sender's buffer: a tiny TCP receive window makes loopback
  // crawl at timer speed (silly-window avoidance), which tests nothing.
  (void)peer;
  int small = 32768;
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
}

bool WriteAll(int fd, const void *buf, size_t len) {
  const char *p = static_cast<const char *>(buf);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      pollfd pf{fd, POLLOUT, 0};
      ::poll(&pf, 1, 1000);
      continue;
    }
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

bool WaitReadable(int fd, std::chrono::nanoseconds limit) {
  pollfd pf{fd, POLLIN, 0};
  int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(limit).count());
  for (;;) {
    int r = ::poll(&pf, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    return r > 0;
  }
}

std::string ReadN(int fd, size_t n, std::chrono::nanoseconds limit) {
  std::string s;
  auto end = Clock::now() + limit;
  char buf[65536];
  while (s.size() < n) {
    auto left = end - Clock::now();
    if (left <= 0ns || !WaitReadable(fd, left)) break;
    ssize_t r = ::recv(fd, buf, std::min(sizeof buf, n - s.size()), MSG_DONTWAIT);
    if (r < 0 && errno == ENOTSOCK) r = ::read(fd, buf, std::min(sizeof buf, n - s.size()));
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (r <= 0) break;
    s.append(buf, static_cast<size_t>(r));
  }
  return s;
}

std::string ReadToEof(int fd, std::chrono::nanoseconds limit) {
  std::string s;
  auto end = Clock::now() + limit;
  char buf[65536];
  for (;;) {
    auto left = end - Clock::now();
    if (left <= 0ns || !WaitReadable(fd, left)) break;
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (r <= 0) break;
    s.append(buf, static_cast<size_t>(r));
  }
  return s;
}

std::string ReadAvailable(int fd) {
  std::string s;
  char buf[65536];
  for (;;) {
    pollfd pf{fd, POLLIN, 0};
    if (::poll(&pf, 1, 0) <= 0 || !(pf.revents & POLLIN)) break;
    ssize_t r = ::read(fd, buf, sizeof buf);
    if (r <= 0) break;
    s.append(buf, static_cast<size_t>(r));
  }
  return s;
}

std::string Pattern(uint64_t start, size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(PatternByte(start + i));
  return s;
}

size_t ResidentPages(const std::set<uint64_t> &addrs) {
  const long page = sysconf(_SC_PAGESIZE);
  size_t n = 0;
  for (uint64_t a : addrs) {
    unsigned char v = 0;
    void *p = reinterpret_cast<void *>(a & ~static_cast<uint64_t>(page - 1));
    EXPECT_EQ(::mincore(p, 1, &v), 0) << strerror(errno);
    n += v & 1;
  }
  return n;
}

volatile sig_atomic_t SignalGuard::hits = 0;

SignalGuard::SignalGuard(int sig) : sig_(sig) {
  struct sigaction sa {};
  sa.sa_handler = [](int) { hits = hits + 1; };
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: the wait must come back with EINTR
  ::sigaction(sig, &sa, &old_);
}

SignalGuard::~SignalGuard() { ::sigaction(sig_, &old_, nullptr); }

}  // namespace kt
