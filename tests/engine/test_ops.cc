// One-shot and multishot operations: each gives exactly one final
// completion carrying its token, with the result the kernel would give.
#include <sys/wait.h>

#include <thread>

#include "common.h"

using namespace kt;

namespace {

class Ops : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(d.Create(nullptr), 0); }
  Driver d;
};

TEST_F(Ops, NopCompletesOnceWithZero) {
  ASSERT_EQ(kloop_submit_nop(d, 42), 0);
  Event e = d.WaitFinal(42);
  EXPECT_EQ(e.result, 0);
  EXPECT_EQ(e.flags, 0u);
  EXPECT_EQ(e.event, KLOOP_EVENT_OP);
  EXPECT_EQ(e.data, 0u);
  EXPECT_EQ(e.aux, 0u);
  d.Drain(10ms);
  EXPECT_EQ(d.Of(42).size(), 1u);
}

TEST_F(Ops, ExtremeTokens) {
  for (uint64_t t : {uint64_t{0}, ~uint64_t{0}, uint64_t{1} << 63}) {
    ASSERT_EQ(kloop_submit_nop(d, t), 0);
    EXPECT_EQ(d.WaitFinal(t).token, t);
  }
}

void CheckAcceptOneShot(Driver &d, int family) {
  Addr la;
  Fd l = TcpListener(family, &la);
  ASSERT_GE(l, 0);
  ASSERT_EQ(kloop_submit_accept(d, 1, l, 0), 0);
  EXPECT_EQ(d.Poll(0), 0) << "accept completed without a client";
  Fd c(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c, la.sa(), la.len), 0);
  Event e = d.WaitFinal(1);
  ASSERT_GE(e.result, 0) << kloop_strerror(e.result);
  Fd s(e.result);
  EXPECT_EQ(e.event, KLOOP_EVENT_OP);
  EXPECT_NE(e.data, 0u);
  Addr cl = LocalAddr(c);
  ASSERT_EQ(e.aux, cl.len);
  ASSERT_EQ(e.bytes.size(), cl.len);
  auto *peer = reinterpret_cast<const sockaddr *>(e.bytes.data());
  EXPECT_EQ(peer->sa_family, family);
  EXPECT_EQ(std::memcmp(e.bytes.data(), &cl.ss, cl.len), 0) << "peer address differs";
  // New fds are SOCK_CLOEXEC | SOCK_NONBLOCK.
  EXPECT_TRUE(::fcntl(s, F_GETFD) & FD_CLOEXEC);
  EXPECT_TRUE(::fcntl(s, F_GETFL) & O_NONBLOCK);
  // It is the connection.
  ASSERT_TRUE(WriteAll(c, "ping"));
  EXPECT_EQ(ReadN(s, 4), "ping");
}

TEST_F(Ops, AcceptOneShotIPv4) { CheckAcceptOneShot(d, AF_INET); }
TEST_F(Ops, AcceptOneShotIPv6) { CheckAcceptOneShot(d, AF_INET6); }

TEST_F(Ops, AcceptOneShotUnix) {
  Addr a;
  auto *un = reinterpret_cast<sockaddr_un *>(&a.ss);
  un->sun_family = AF_UNIX;
  int n = std::snprintf(un->sun_path + 1, sizeof un->sun_path - 1, "kloop-acc-%d", ::getpid());
  a.len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  Fd l(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::bind(l, a.sa(), a.len), 0);
  ASSERT_EQ(::listen(l, 8), 0);
  ASSERT_EQ(kloop_submit_accept(d, 1, l, 0), 0);
  Fd c(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(c, a.sa(), a.len), 0);
  Event e = d.WaitFinal(1);
  ASSERT_GE(e.result, 0);
  Fd s(e.result);
  EXPECT_GE(e.aux, sizeof(sa_family_t));  // unnamed peer: just the family
}

TEST_F(Ops, AcceptMultishotUntilCancel) {
  Addr la;
  Fd l = TcpListener(AF_INET, &la);
  ASSERT_EQ(kloop_submit_accept(d, 9, l, KLOOP_OP_MULTISHOT), 0);
  std::vector<Fd> clients;
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(clients.back(), la.sa(), la.len), 0);
  }
  ASSERT_TRUE(d.RunUntil([&] { return d.Of(9).size() >= 3; }));
  std::vector<Fd> accepted;
  for (const Event &e : d.Of(9)) {
    EXPECT_TRUE(e.more()) << Describe(e);
    EXPECT_EQ(e.event, KLOOP_EVENT_OP);
    EXPECT_EQ(e.data, 0u);
    ASSERT_GE(e.result, 0) << kloop_strerror(e.result);
    accepted.emplace_back(e.result);
    EXPECT_TRUE(::fcntl(e.result, F_GETFL) & O_NONBLOCK);
  }
  EXPECT_FALSE(d.HasFinal(9));
  // More connections keep coming while armed.
  clients.emplace_back(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(clients.back(), la.sa(), la.len), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.Of(9).size() >= 4; }));
  for (size_t i = 3; i < d.Of(9).size(); ++i) {
    EXPECT_TRUE(d.Of(9)[i].more());
    if (d.Of(9)[i].result >= 0) accepted.emplace_back(d.Of(9)[i].result);
  }
  ASSERT_EQ(kloop_cancel(d, 9), 0);
  Event fin = d.WaitFinal(9);
  EXPECT_FALSE(fin.more());
  EXPECT_EQ(fin.result, -ECANCELED);
  d.Drain(20ms);
  EXPECT_EQ(d.FinalCount(9), 1);
  EXPECT_EQ(kloop_cancel(d, 9), -ENOENT);
}

TEST_F(Ops, ConnectSucceeds) {
  Addr la;
  Fd l = TcpListener(AF_INET, &la);
  Fd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  ASSERT_EQ(kloop_submit_connect(d, 5, c, la.sa(), la.len), 0);
  Event e = d.WaitFinal(5);
  EXPECT_EQ(e.result, 0) << kloop_strerror(e.result);
  EXPECT_EQ(PeerAddr(c).port(), la.port());
}

TEST_F(Ops, ConnectAddressIsCopied) {
  Addr la;
  Fd l = TcpListener(AF_INET6, &la);
  Fd c(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  {
    Addr tmp = la;
    ASSERT_EQ(kloop_submit_connect(d, 5, c, tmp.sa(), tmp.len), 0);
    std::memset(static_cast<void *>(&tmp.ss), 0xEE,
                sizeof tmp.ss);  // the engine must have its own copy
  }
  EXPECT_EQ(d.WaitFinal(5).result, 0);
}

TEST_F(Ops, ConnectRefused) {
  // A bound but not listening socket reserves the port and answers RST.
  Fd holder(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  Addr a = Loopback(AF_INET);
  ASSERT_EQ(::bind(holder, a.sa(), a.len), 0);
  a = LocalAddr(holder);
  Fd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(kloop_submit_connect(d, 6, c, a.sa(), a.len), 0);
  EXPECT_EQ(d.WaitFinal(6).result, -ECONNREFUSED);
}

TEST_F(Ops, SendThenRecv) {
  auto [a, b] = UnixPair();
  const char msg[] = "hello";
  char buf[64] = {};
  ASSERT_EQ(kloop_submit_send(d, 1, a, msg, 5, 0), 0);
  ASSERT_EQ(kloop_submit_recv(d, 2, b, buf, sizeof buf, 0), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 5);
  EXPECT_EQ(d.WaitFinal(2).result, 5);
  EXPECT_EQ(std::string(buf, 5), "hello");
}

TEST_F(Ops, RecvWaitsForData) {
  auto [a, b] = TcpPair();
  char buf[64] = {};
  ASSERT_EQ(kloop_submit_recv(d, 2, a, buf, sizeof buf, 0), 0);
  d.Drain(20ms);
  EXPECT_FALSE(d.HasFinal(2));
  ASSERT_TRUE(WriteAll(b, "late"));
  EXPECT_EQ(d.WaitFinal(2).result, 4);
  EXPECT_EQ(std::string(buf, 4), "late");
}

TEST_F(Ops, RecvEofIsZero) {
  auto [a, b] = TcpPair();
  char buf[16];
  ASSERT_EQ(kloop_submit_recv(d, 2, a, buf, sizeof buf, 0), 0);
  ::shutdown(b, SHUT_WR);
  EXPECT_EQ(d.WaitFinal(2).result, 0);
}

TEST_F(Ops, RecvMsgFlagsArePassed) {
  auto [a, b] = UnixPair();
  ASSERT_TRUE(WriteAll(b, "peekaboo"));
  char buf[16] = {};
  ASSERT_EQ(kloop_submit_recv(d, 1, a, buf, 4, MSG_PEEK), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 4);
  EXPECT_EQ(ReadN(a, 8), "peekaboo") << "MSG_PEEK consumed the data";
}

TEST_F(Ops, SendToClosedPeerIsEpipeNotSigpipe) {
  auto [a, b] = UnixPair();
  b.reset();
  ASSERT_EQ(kloop_submit_send(d, 1, a, "x", 1, 0), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -EPIPE);  // and the process is still alive
}

TEST_F(Ops, ZeroLengthSendAndRecv) {
  auto [a, b] = UnixPair();
  ASSERT_EQ(kloop_submit_send(d, 1, a, nullptr, 0, 0), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
  ASSERT_TRUE(WriteAll(b, "x"));
  char buf[1];
  ASSERT_EQ(kloop_submit_recv(d, 2, a, buf, 0, 0), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 0);
}

void CheckDatagram(Driver &d, Fd &s1, const Addr &a1, Fd &s2, const Addr &a2) {
  const char msg[] = "datagram!";
  char buf[64] = {};
  ASSERT_EQ(kloop_submit_recvmsg(d, 2, s2, buf, sizeof buf, 0), 0);
  ASSERT_EQ(kloop_submit_sendmsg(d, 1, s1, msg, 9, a2.sa(), a2.len, 0), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 9);
  Event r = d.WaitFinal(2);
  ASSERT_EQ(r.result, 9) << kloop_strerror(r.result);
  EXPECT_EQ(std::string(buf, 9), "datagram!");
  EXPECT_NE(r.data, 0u);
  EXPECT_EQ(r.aux >> 16, 0u) << "msg_flags";
  ASSERT_EQ(r.aux & 0xffff, a1.len);
  EXPECT_EQ(std::memcmp(r.bytes.data(), &a1.ss, a1.len), 0) << "source address differs";

  // Truncation is reported through msg_flags.
  ASSERT_EQ(kloop_submit_recvmsg(d, 4, s2, buf, 3, 0), 0);
  ASSERT_EQ(kloop_submit_sendmsg(d, 3, s1, msg, 9, a2.sa(), a2.len, 0), 0);
  EXPECT_EQ(d.WaitFinal(3).result, 9);
  r = d.WaitFinal(4);
  EXPECT_EQ(r.result, 3);
  EXPECT_TRUE((r.aux >> 16) & MSG_TRUNC) << std::hex << r.aux;
}

TEST_F(Ops, UdpIPv4RecvmsgSendmsg) {
  Addr a1, a2;
  Fd s1 = UdpSocket(AF_INET, &a1), s2 = UdpSocket(AF_INET, &a2);
  CheckDatagram(d, s1, a1, s2, a2);
}

TEST_F(Ops, UdpIPv6RecvmsgSendmsg) {
  Addr a1, a2;
  Fd s1 = UdpSocket(AF_INET6, &a1), s2 = UdpSocket(AF_INET6, &a2);
  ASSERT_GE(s1, 0);
  CheckDatagram(d, s1, a1, s2, a2);
}

TEST_F(Ops, UnixDatagramRecvmsgSendmsg) {
  Addr a1, a2;
  Fd s1 = UnixDgram(&a1), s2 = UnixDgram(&a2);
  ASSERT_GE(s1, 0);
  ASSERT_GE(s2, 0);
  CheckDatagram(d, s1, a1, s2, a2);
}

TEST_F(Ops, SendmsgOnConnectedSocketWithoutAddress) {
  Addr a1, a2;
  Fd s1 = UdpSocket(AF_INET, &a1), s2 = UdpSocket(AF_INET, &a2);
  ASSERT_EQ(::connect(s1, a2.sa(), a2.len), 0);
  ASSERT_EQ(kloop_submit_sendmsg(d, 1, s1, "abc", 3, nullptr, 0, 0), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 3);
  EXPECT_EQ(ReadN(s2, 3), "abc");
}

TEST_F(Ops, PipeWriteThenRead) {
  auto [r, w] = Pipe();
  char buf[16] = {};
  ASSERT_EQ(kloop_submit_read(d, 2, r, buf, sizeof buf, KLOOP_OFFSET_CURRENT), 0);
  d.Drain(10ms);
  EXPECT_FALSE(d.HasFinal(2));
  ASSERT_EQ(kloop_submit_write(d, 1, w, "abc", 3, KLOOP_OFFSET_CURRENT), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 3);
  EXPECT_EQ(d.WaitFinal(2).result, 3);
  EXPECT_EQ(std::string(buf, 3), "abc");
  // EOF on the read side once the writer is gone.
  w.reset();
  ASSERT_EQ(kloop_submit_read(d, 3, r, buf, sizeof buf, KLOOP_OFFSET_CURRENT), 0);
  EXPECT_EQ(d.WaitFinal(3).result, 0);
}

TEST_F(Ops, FileReadWriteAtOffsets) {
  Fd f = TempFile("0123456789");
  ASSERT_GE(f, 0);
  ASSERT_EQ(kloop_submit_write(d, 1, f, "XY", 2, 4), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 2);
  char buf[16] = {};
  ASSERT_EQ(kloop_submit_read(d, 2, f, buf, 4, 3), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 4);
  EXPECT_EQ(std::string(buf, 4), "3XY6");
  EXPECT_EQ(::lseek(f, 0, SEEK_CUR), 0) << "positional I/O moved the file position";
  // Reading past the end gives 0.
  ASSERT_EQ(kloop_submit_read(d, 3, f, buf, 4, 100), 0);
  EXPECT_EQ(d.WaitFinal(3).result, 0);
  // Writing beyond the end extends the file.
  ASSERT_EQ(kloop_submit_write(d, 4, f, "Z", 1, 12), 0);
  EXPECT_EQ(d.WaitFinal(4).result, 1);
  char all[16] = {};
  EXPECT_EQ(::pread(f, all, sizeof all, 0), 13);
  EXPECT_EQ(std::string(all, 13), std::string("0123XY6789\0\0Z", 13));
}

TEST_F(Ops, FileReadWriteAtCurrentPosition) {
  Fd f = TempFile("abcdefgh");
  char buf[8] = {};
  ASSERT_EQ(kloop_submit_read(d, 1, f, buf, 3, KLOOP_OFFSET_CURRENT), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 3);
  EXPECT_EQ(std::string(buf, 3), "abc");
  EXPECT_EQ(::lseek(f, 0, SEEK_CUR), 3);
  ASSERT_EQ(kloop_submit_write(d, 2, f, "!!", 2, KLOOP_OFFSET_CURRENT), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 2);
  EXPECT_EQ(::lseek(f, 0, SEEK_CUR), 5);
  char all[8] = {};
  ASSERT_EQ(::pread(f, all, 8, 0), 8);
  EXPECT_EQ(std::string(all, 8), "abc!!fgh");
}

TEST_F(Ops, PollOneShot) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_poll(d, 1, r, POLLIN, 0), 0);
  d.Drain(20ms);
  EXPECT_FALSE(d.HasFinal(1)) << "poll fired on an empty pipe";
  ASSERT_TRUE(WriteAll(w, "x"));
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(e.result & POLLIN) << e.result;
  EXPECT_EQ(e.aux, static_cast<uint32_t>(e.result));
  EXPECT_FALSE(e.more());
  d.Drain(10ms);
  EXPECT_EQ(d.Of(1).size(), 1u);
}

TEST_F(Ops, PollOutIsImmediatelyReady) {
  auto [a, b] = UnixPair();
  ASSERT_EQ(kloop_submit_poll(d, 1, a, POLLOUT, 0), 0);
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(e.result & POLLOUT);
}

TEST_F(Ops, PollHangupReported) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_poll(d, 1, r, POLLIN, 0), 0);
  w.reset();
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(e.result & POLLHUP) << e.result;
}

TEST_F(Ops, PollMultishotFiresAgainWhileReadable) {
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_submit_poll(d, 1, r, POLLIN, KLOOP_OP_MULTISHOT), 0);
  d.Drain(10ms);
  EXPECT_TRUE(d.Of(1).empty());
  ASSERT_TRUE(WriteAll(w, "a"));
  ASSERT_TRUE(d.RunUntil([&] { return d.Of(1).size() >= 1; }));
  size_t first = d.Of(1).size();
  // The data is still unread: the fd is still readable and becomes ready
  // again with more data; the poll must report again.
  ASSERT_TRUE(WriteAll(w, "b"));
  ASSERT_TRUE(d.RunUntil([&] { return d.Of(1).size() > first; }));
  for (const Event &e : d.Of(1)) {
    EXPECT_TRUE(e.more()) << Describe(e);
    EXPECT_TRUE(e.result & POLLIN);
    EXPECT_EQ(e.aux, static_cast<uint32_t>(e.result));
  }
  EXPECT_FALSE(d.HasFinal(1));
  ASSERT_EQ(kloop_cancel(d, 1), 0);
  Event fin = d.WaitFinal(1);
  EXPECT_FALSE(fin.more());
  EXPECT_EQ(fin.result, -ECANCELED);
  d.Drain(10ms);
  EXPECT_EQ(d.FinalCount(1), 1);
}

TEST_F(Ops, TimeoutExpires) {
  auto t0 = Clock::now();
  ASSERT_EQ(kloop_submit_timeout(d, 1, 30 * kMs), 0);
  Event e = d.WaitFinal(1);
  auto dt = Clock::now() - t0;
  EXPECT_EQ(e.result, 0);
  EXPECT_GE(dt, 29ms);
  EXPECT_LT(dt, 2s);
}

TEST_F(Ops, TimeoutZeroExpiresAtOnce) {
  ASSERT_EQ(kloop_submit_timeout(d, 1, 0), 0);
  EXPECT_EQ(d.WaitFinal(1, 1s).result, 0);
}

TEST_F(Ops, TimeoutsCompleteInOrder) {
  ASSERT_EQ(kloop_submit_timeout(d, 3, 60 * kMs), 0);
  ASSERT_EQ(kloop_submit_timeout(d, 1, 20 * kMs), 0);
  ASSERT_EQ(kloop_submit_timeout(d, 2, 40 * kMs), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.events().size() == 3; }));
  EXPECT_EQ(d.events()[0].token, 1u);
  EXPECT_EQ(d.events()[1].token, 2u);
  EXPECT_EQ(d.events()[2].token, 3u);
}

TEST_F(Ops, TimeoutCancelled) {
  ASSERT_EQ(kloop_submit_timeout(d, 1, 10'000 * kMs), 0);
  EXPECT_EQ(d.Poll(0), 0);
  auto t0 = Clock::now();
  ASSERT_EQ(kloop_cancel(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ECANCELED);
  EXPECT_LT(Clock::now() - t0, 1s);
}

TEST_F(Ops, CancelBeforeFirstPoll) {
  // Cancel of an operation still queued in user space.
  ASSERT_EQ(kloop_submit_timeout(d, 1, 10'000 * kMs), 0);
  ASSERT_EQ(kloop_cancel(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ECANCELED);
  d.Drain(10ms);
  EXPECT_EQ(d.FinalCount(1), 1);
}

TEST_F(Ops, CancelUnknownToken) {
  EXPECT_EQ(kloop_cancel(d, 12345), -ENOENT);
  ASSERT_EQ(kloop_submit_nop(d, 1), 0);
  d.WaitFinal(1);
  EXPECT_EQ(kloop_cancel(d, 1), -ENOENT) << "cancel of a finished token";
}

TEST_F(Ops, CancelTwiceIsEalready) {
  auto [a, b] = TcpPair();
  char buf[8];
  ASSERT_EQ(kloop_submit_recv(d, 1, a, buf, sizeof buf, 0), 0);
  EXPECT_EQ(d.Poll(0), 0);
  ASSERT_EQ(kloop_cancel(d, 1), 0);
  EXPECT_EQ(kloop_cancel(d, 1), -EALREADY);
  EXPECT_EQ(d.WaitFinal(1).result, -ECANCELED);
}

TEST_F(Ops, CancelledRecvReportsDataThatArrived) {
  // A recv that completed before its cancel took effect keeps its result.
  auto [a, b] = UnixPair();
  ASSERT_TRUE(WriteAll(b, "data"));
  char buf[8] = {};
  ASSERT_EQ(kloop_submit_recv(d, 1, a, buf, sizeof buf, 0), 0);
  int rc = kloop_cancel(d, 1);
  EXPECT_TRUE(rc == 0 || rc == -ENOENT) << rc;
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(e.result == 4 || e.result == -ECANCELED) << e.result;
  if (e.result == 4) {
    EXPECT_EQ(std::string(buf, 4), "data");
  } else {
    EXPECT_EQ(ReadN(a, 4), "data") << "a cancelled recv lost data";
  }
}

TEST_F(Ops, CancelFdCancelsEveryOpOnIt) {
  auto [a, b] = TcpPair();
  char b1[8], b2[8];
  ASSERT_EQ(kloop_submit_recv(d, 1, a, b1, sizeof b1, 0), 0);
  ASSERT_EQ(kloop_submit_recv(d, 2, a, b2, sizeof b2, 0), 0);
  ASSERT_EQ(kloop_submit_poll(d, 3, a, POLLIN, KLOOP_OP_MULTISHOT), 0);
  char b3[8];
  ASSERT_EQ(kloop_submit_recv(d, 4, b, b3, sizeof b3, 0), 0);  // other fd: untouched
  EXPECT_EQ(d.Poll(0), 0);
  EXPECT_EQ(kloop_cancel_fd(d, a), 3);
  for (uint64_t t : {1, 2, 3}) EXPECT_EQ(d.WaitFinal(t).result, -ECANCELED) << "token " << t;
  d.Drain(10ms);
  EXPECT_FALSE(d.HasFinal(4));
  EXPECT_EQ(kloop_cancel_fd(d, a), 0);
  EXPECT_EQ(kloop_cancel_fd(d, b), 1);
  EXPECT_EQ(d.WaitFinal(4).result, -ECANCELED);
}

TEST_F(Ops, ShutdownWrite) {
  auto [a, b] = TcpPair();
  ASSERT_EQ(kloop_submit_shutdown(d, 1, a, SHUT_WR), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
  EXPECT_EQ(ReadToEof(b, 1s), "");
  char c;
  EXPECT_EQ(::read(b, &c, 1), 0) << "peer did not see EOF";
}

TEST_F(Ops, ShutdownNotConnected) {
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(kloop_submit_shutdown(d, 1, s, SHUT_RDWR), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ENOTCONN);
}

TEST_F(Ops, CloseClosesTheFd) {
  auto [r, w] = Pipe();
  int fd = w.release();
  ASSERT_EQ(kloop_submit_close(d, 1, fd), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
  EXPECT_FALSE(FdOpen(fd));
}

TEST_F(Ops, CloseWaitsForInFlightOpsOnTheFd) {
  auto [a, b] = TcpPair();
  int fd = a.release();
  char buf[8];
  ASSERT_EQ(kloop_submit_recv(d, 1, fd, buf, sizeof buf, 0), 0);
  ASSERT_EQ(kloop_submit_poll(d, 2, fd, POLLIN, 0), 0);
  EXPECT_EQ(d.Poll(0), 0);
  ASSERT_EQ(kloop_submit_close(d, 3, fd), 0);
  d.WaitFinal(3);
  // The victims completed (cancelled) before the close did.
  auto pos = [&](uint64_t t) {
    for (size_t i = 0; i < d.events().size(); ++i)
      if (d.events()[i].token == t && !d.events()[i].more()) return static_cast<int>(i);
    return -1;
  };
  ASSERT_GE(pos(1), 0) << "recv had no final completion when close completed";
  ASSERT_GE(pos(2), 0) << "poll had no final completion when close completed";
  EXPECT_LT(pos(1), pos(3));
  EXPECT_LT(pos(2), pos(3));
  EXPECT_EQ(d.Of(1)[0].result, -ECANCELED);
  EXPECT_EQ(d.Of(3)[0].result, 0);
  EXPECT_FALSE(FdOpen(fd));
  // The peer sees the connection closed.
  EXPECT_EQ(ReadToEof(b, 1s), "");
}

TEST_F(Ops, SpliceFileToPipeToSocket) {
  const size_t kSize = 200 * 1024 + 17;
  std::string content = Pattern(0, kSize);
  Fd f = TempFile(content);
  auto [pr, pw] = Pipe();
  auto [s, peer] = UnixPair();
  std::string got;
  std::thread reader([&, p = peer.get()] { got = ReadN(p, kSize); });
  uint64_t off = 0;
  uint64_t tok = 100;
  for (;;) {
    ASSERT_EQ(kloop_submit_splice(d, tok, f, off, pw, KLOOP_OFFSET_CURRENT, 65536, 0), 0);
    Event in = d.WaitFinal(tok++);
    ASSERT_GE(in.result, 0) << kloop_strerror(in.result);
    if (in.result == 0) break;
    off += static_cast<uint64_t>(in.result);
    int left = in.result;
    while (left > 0) {
      ASSERT_EQ(kloop_submit_splice(d, tok, pr, KLOOP_OFFSET_CURRENT, s, KLOOP_OFFSET_CURRENT,
                                    static_cast<uint32_t>(left), 0),
                0);
      Event out = d.WaitFinal(tok++);
      ASSERT_GT(out.result, 0) << kloop_strerror(out.result);
      left -= out.result;
    }
  }
  reader.join();
  EXPECT_EQ(off, kSize);
  EXPECT_EQ(got.size(), kSize);
  EXPECT_TRUE(got == content) << "spliced bytes differ";
  EXPECT_EQ(::lseek(f, 0, SEEK_CUR), 0) << "splice with an offset moved the file position";
}

TEST_F(Ops, SpliceWithoutPipeFails) {
  Fd f1 = TempFile("abc"), f2 = TempFile();
  int rc = kloop_submit_splice(d, 1, f1, 0, f2, 0, 3, 0);
  if (rc == 0) {
    EXPECT_EQ(d.WaitFinal(1).result, -EINVAL);
  } else {
    EXPECT_EQ(rc, -EINVAL);
  }
}

pid_t ForkExit(int code) {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(code);
  return pid;
}

TEST_F(Ops, ChildExitStatus) {
  pid_t pid = ForkExit(7);
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kloop_submit_child_exit(d, 1, pid), 0);
  Event e = d.WaitFinal(1);
  ASSERT_GE(e.result, 0) << kloop_strerror(e.result);
  EXPECT_TRUE(WIFEXITED(e.result)) << std::hex << e.result;
  EXPECT_EQ(WEXITSTATUS(e.result), 7);
  // Reaped: no zombie left for us.
  errno = 0;
  EXPECT_EQ(::waitpid(pid, nullptr, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST_F(Ops, ChildExitAlreadyExited) {
  pid_t pid = ForkExit(3);
  ASSERT_GT(pid, 0);
  // Wait until it is a zombie, then ask.
  siginfo_t si{};
  ASSERT_EQ(::waitid(P_PID, static_cast<id_t>(pid), &si, WEXITED | WNOWAIT), 0);
  ASSERT_EQ(kloop_submit_child_exit(d, 1, pid), 0);
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(WIFEXITED(e.result));
  EXPECT_EQ(WEXITSTATUS(e.result), 3);
}

TEST_F(Ops, ChildKilledBySignal) {
  pid_t pid = ::fork();
  if (pid == 0) {
    for (;;) ::pause();
  }
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kloop_submit_child_exit(d, 1, pid), 0);
  d.Drain(20ms);
  EXPECT_FALSE(d.HasFinal(1)) << "child_exit completed while the child lives";
  ::kill(pid, SIGKILL);
  Event e = d.WaitFinal(1);
  EXPECT_TRUE(WIFSIGNALED(e.result)) << std::hex << e.result;
  EXPECT_EQ(WTERMSIG(e.result), SIGKILL);
}

TEST_F(Ops, ChildExitNotOurChild) {
  int rc = kloop_submit_child_exit(d, 1, 1);  // init is nobody's child here
  ASSERT_EQ(rc, 0) << "expected the error in the completion, got submit " << rc;
  EXPECT_EQ(d.WaitFinal(1).result, -ECHILD);
}

TEST_F(Ops, ChildExitCancelled) {
  pid_t pid = ::fork();
  if (pid == 0) {
    for (;;) ::pause();
  }
  ASSERT_EQ(kloop_submit_child_exit(d, 1, pid), 0);
  EXPECT_EQ(d.Poll(0), 0);
  ASSERT_EQ(kloop_cancel(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, -ECANCELED);
  ::kill(pid, SIGKILL);
  int status = 0;
  EXPECT_EQ(::waitpid(pid, &status, 0), pid) << "the cancelled wait reaped the child";
}

TEST_F(Ops, ManyChildren) {
  std::vector<pid_t> pids;
  for (int i = 0; i < 8; ++i) {
    pids.push_back(ForkExit(10 + i));
    ASSERT_EQ(kloop_submit_child_exit(d, 100 + i, pids.back()), 0);
  }
  for (int i = 0; i < 8; ++i) {
    Event e = d.WaitFinal(100 + i);
    EXPECT_TRUE(WIFEXITED(e.result));
    EXPECT_EQ(WEXITSTATUS(e.result), 10 + i);
  }
}

// A watchdog: if the test's blocking poll is not woken, interrupt it with a
// signal so that the test fails instead of hanging.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::milliseconds after) : guard_(SIGUSR2) {
    pthread_t target = ::pthread_self();
    th_ = std::thread([this, target, after] {
      auto end = Clock::now() + after;
      while (Clock::now() < end && !stop_) std::this_thread::sleep_for(5ms);
      if (!stop_) {
        fired_ = true;
        ::pthread_kill(target, SIGUSR2);
      }
    });
  }
  ~Watchdog() {
    stop_ = true;
    th_.join();
  }
  bool fired() const { return fired_; }

 private:
  SignalGuard guard_;
  std::atomic<bool> stop_{false}, fired_{false};
  std::thread th_;
};

TEST_F(Ops, WakeFromAnotherThreadInterruptsInfinitePoll) {
  Watchdog dog(3000ms);
  std::thread waker([l = d.loop()] {
    std::this_thread::sleep_for(50ms);
    EXPECT_EQ(kloop_wake(l), 0);
  });
  kloop_completion c[4];
  auto t0 = Clock::now();
  int n = kloop_poll(d, c, 4, -1);
  auto dt = Clock::now() - t0;
  waker.join();
  EXPECT_FALSE(dog.fired()) << "kloop_wake did not interrupt kloop_poll";
  EXPECT_GE(n, 0);
  for (int i = 0; i < n; ++i) ADD_FAILURE() << "wake produced a record with token " << c[i].token;
  EXPECT_GE(dt, 40ms);
}

TEST_F(Ops, WakeBeforePollMakesNextPollReturn) {
  Watchdog dog(3000ms);
  ASSERT_EQ(kloop_wake(d), 0);
  kloop_completion c[4];
  int n = kloop_poll(d, c, 4, -1);
  EXPECT_FALSE(dog.fired()) << "a wake before kloop_poll was lost";
  EXPECT_EQ(n, 0);
  // And it does not stick: the next poll waits again.
  auto t0 = Clock::now();
  n = kloop_poll(d, c, 4, 30 * kMs);
  EXPECT_EQ(n, 0);
  EXPECT_GE(Clock::now() - t0, 25ms);
}

TEST_F(Ops, WakeManyTimesFromThreads) {
  Watchdog dog(5000ms);
  std::atomic<bool> stop{false};
  std::thread waker([&, l = d.loop()] {
    while (!stop) {
      kloop_wake(l);
      std::this_thread::sleep_for(200us);
    }
  });
  kloop_completion c[4];
  for (int i = 0; i < 200; ++i) ASSERT_GE(kloop_poll(d, c, 4, -1), 0);
  stop = true;
  waker.join();
  EXPECT_FALSE(dog.fired());
  ASSERT_EQ(kloop_submit_nop(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
}

}  // namespace
