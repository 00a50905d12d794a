// TLS on engine streams (kloop_stream_start_tls): handshakes, data both
// ways, failures reported with OpenSSL's reasons, close_notify, STARTTLS in
// place, pausing. Both ends are usually engine streams of one loop on a
// loopback TCP pair; a few tests put a plain socket on the other end to
// play a misbehaving peer.
#include <sys/ioctl.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "tls_util.h"

using namespace kt;

namespace {

// Every allocation OpenSSL makes in this process, counted: installed by a
// static initializer, before OpenSSL's first allocation.
struct SslHeap {
  static constexpr size_t kHead = 16;  // the size, kept in front; keeps alignment
  static inline std::atomic<long> allocs{0};
  static inline std::atomic<long> live{0};       // bytes
  static inline std::atomic<long> allocated{0};  // bytes, ever
  static void *Malloc(size_t n, const char *, int) {
    auto *p = static_cast<size_t *>(malloc(n + kHead));
    if (!p) return nullptr;
    *p = n;
    ++allocs;
    live += static_cast<long>(n);
    allocated += static_cast<long>(n);
    return reinterpret_cast<char *>(p) + kHead;
  }
  static void Free(void *q, const char *, int) {
    if (!q) return;
    auto *p = reinterpret_cast<size_t *>(static_cast<char *>(q) - kHead);
    live -= static_cast<long>(*p);
    free(p);
  }
  static void *Realloc(void *q, size_t n, const char *file, int line) {
    if (!q) return Malloc(n, file, line);
    if (n == 0) {
      Free(q, file, line);
      return nullptr;
    }
    auto *p = reinterpret_cast<size_t *>(static_cast<char *>(q) - kHead);
    size_t old = *p;
    auto *np = static_cast<size_t *>(realloc(p, n + kHead));
    if (!np) return nullptr;
    *np = n;
    ++allocs;
    live += static_cast<long>(n) - static_cast<long>(old);
    allocated += static_cast<long>(n);
    return reinterpret_cast<char *>(np) + kHead;
  }
};
const bool g_ssl_heap_counted =
    CRYPTO_set_mem_functions(SslHeap::Malloc, SslHeap::Realloc, SslHeap::Free) == 1;

// Each test runs twice: with the engine sealing records itself where the
// kernel has no TLS (the default), and with OpenSSL encrypting every record
// (KLOOP_CONFIG_NO_TLS_SEAL).
class Tls : public ::testing::TestWithParam<uint32_t> {
 protected:
  void SetUp() override {
    kloop_config cfg;
    kloop_config_init(&cfg);
    cfg.flags |= GetParam();
    ASSERT_EQ(d.Create(&cfg), 0);
  }
  // The engine, not OpenSSL, makes the records it sends: sealing, or
  // kernel TLS where the kernel has it.
  bool EngineSends() {
    return !(GetParam() & KLOOP_CONFIG_NO_TLS_SEAL) || (GetCaps(d).enabled & KLOOP_CAP_KTLS);
  }
  // The engine decrypts the peer's records itself (no kernel TLS).
  bool EngineOpens() {
    return !(GetParam() & KLOOP_CONFIG_NO_TLS_SEAL) && !(GetCaps(d).enabled & KLOOP_CAP_KTLS);
  }

  // Engine client (token 1) and engine server (token 2) on one TCP pair.
  void Pair(SSL *client, SSL *server, uint32_t server_flags = 0) {
    std::pair<Fd, Fd> p;
    StartTlsPair(d, client, server, &p, server_flags);
    srv_fd = std::move(p.first);
    cli_fd = std::move(p.second);
  }
  void Handshake() {
    Event a = d.WaitEvent(1, KLOOP_EVENT_HANDSHAKE);
    Event b = d.WaitEvent(2, KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(a.result, 0) << Describe(a);
    ASSERT_EQ(b.result, 0) << Describe(b);
    EXPECT_TRUE(a.more());
  }
  void CloseBoth() {
    kloop_stream_abort(d, 1);
    kloop_stream_abort(d, 2);
    d.WaitFinal(1);
    d.WaitFinal(2);
  }

  // n engine client/server pairs on TCP: client tokens 100, 102, ...,
  // each one's server the token after it; TLS started on all of them.
  void TlsPairs(int n) {
    for (int i = 0; i < n; ++i) {
      auto [a, b] = TcpPair();
      uint64_t tc = 100 + 2 * static_cast<uint64_t>(i), ts = tc + 1;
      ssls.push_back(Client(cctx.get()));
      ssls.push_back(Server(sctx.get()));
      ASSERT_EQ(kloop_stream_attach(d, tc, b, 0), 0);
      ASSERT_EQ(kloop_stream_attach(d, ts, a, 0), 0);
      ASSERT_EQ(kloop_stream_start_tls(d, tc, ssls[ssls.size() - 2].get()), 0);
      ASSERT_EQ(kloop_stream_start_tls(d, ts, ssls.back().get()), 0);
      fds.push_back(std::move(a));
      fds.push_back(std::move(b));
    }
  }

  Driver d;
  Fd cli_fd, srv_fd;
  CtxPtr sctx = ServerCtx(), cctx = ClientCtx();
  std::vector<SslPtr> ssls;  // TlsPairs()
  std::vector<Fd> fds;
};

TEST_P(Tls, HandshakeThenDataBothWays) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Handshake();
  EXPECT_EQ(SSL_get_verify_result(c.get()), X509_V_OK);
  ASSERT_GE(kloop_stream_write(d, 1, "ping", 4), 0);
  // TLS encrypts into the queue: lending bytes is refused, nothing queued.
  EXPECT_EQ(kloop_stream_write_ref(d, 1, "lent", 4, 1), -EOPNOTSUPP);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "ping"; })) << d.DataOf(2);
  ASSERT_GE(kloop_stream_write(d, 2, "pong!", 5), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1) == "pong!"; })) << d.DataOf(1);
  // Plaintext records lie in the arena like any DATA record.
  uint64_t base = 0, size = 0;
  ASSERT_EQ(kloop_buffer_arena(d, &base, &size), 0);
  for (const Event &e : d.Of(2, KLOOP_EVENT_DATA)) {
    EXPECT_GE(e.data, base);
    EXPECT_LE(e.data + static_cast<uint64_t>(e.result), base + size);
  }
  // The caller may still query the SSL while the engine drives it.
  EXPECT_NE(SSL_get_current_cipher(c.get()), nullptr);
  EXPECT_NE(SSL_get0_peer_certificate(c.get()), nullptr);
  CloseBoth();
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

TEST_P(Tls, WritesBeforeHandshakeAreSentAfterIt) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  // Counted with the client hello that is queued but not sent yet.
  int64_t queued = kloop_stream_write(d, 1, "early", 5);
  ASSERT_GT(queued, 5);
  ASSERT_EQ(kloop_stream_write_size(d, 1), queued);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "early"; })) << d.DataOf(2);
  EXPECT_EQ(d.Of(1, KLOOP_EVENT_HANDSHAKE).size(), 1u);
  CloseBoth();
}

TEST_P(Tls, LargeTransferIntact) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Handshake();
  d.set_store_data(false);
  constexpr size_t kTotal = 64u << 20;
  uint64_t checked = 0;
  int64_t mismatch = -1;
  d.on_record = [&](const kloop_completion &r) {
    if (r.token != 2 || r.event != KLOOP_EVENT_DATA) return;
    auto *p = reinterpret_cast<const uint8_t *>(r.data);
    for (int32_t i = 0; i < r.result; ++i)
      if (p[i] != PatternByte(checked + static_cast<uint64_t>(i)) && mismatch < 0)
        mismatch = static_cast<int64_t>(checked) + i;
    checked += static_cast<uint64_t>(r.result);
  };
  std::vector<uint8_t> chunk(1 << 20);
  size_t sent = 0;
  while (sent < kTotal) {
    for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = PatternByte(sent + i);
    ASSERT_GE(kloop_stream_write(d, 1, chunk.data(), chunk.size()), 0);
    sent += chunk.size();
    // keep the queue bounded, as a transport honouring flow control would
    ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) < (4 << 20); }, 30s));
  }
  ASSERT_TRUE(d.RunUntil([&] { return checked >= kTotal; }, 60s)) << checked;
  EXPECT_EQ(checked, kTotal);
  EXPECT_EQ(mismatch, -1);
  d.on_record = nullptr;
  CloseBoth();
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

namespace {

// The test's own SSL on a plain socket, facing an engine TLS stream: what
// the engine sends stays in that socket until read.
struct PlainPeer {
  Fd fd;
  SslPtr ssl;
};

// The engine's end (token `tok`, driving `mine`) and the test's own SSL on
// a plain socket, handshaken; `peer` is the client unless the engine is.
PlainPeer TlsWithPeer(Driver &d, uint64_t tok, SSL *mine, SslPtr peer) {
  auto [a, b] = TcpPair();
  EXPECT_EQ(kloop_stream_attach(d, tok, a, KLOOP_STREAM_CLOSE_FD), 0);
  a.release();
  EXPECT_EQ(kloop_stream_start_tls(d, tok, mine), 0);
  PlainPeer p{std::move(b), std::move(peer)};
  SSL_set_fd(p.ssl.get(), p.fd);
  int fl = fcntl(p.fd, F_GETFL);
  fcntl(p.fd, F_SETFL, fl | O_NONBLOCK);
  int rc = -1;
  auto end = std::chrono::steady_clock::now() + kDeadline;
  while (std::chrono::steady_clock::now() < end) {
    rc = SSL_do_handshake(p.ssl.get());
    if (rc == 1 || SSL_get_error(p.ssl.get(), rc) != SSL_ERROR_WANT_READ) break;
    d.Poll(1 * kMs);
  }
  EXPECT_EQ(rc, 1);
  return p;
}

// An engine TLS server (token `tok`) whose client is a PlainPeer; its
// HANDSHAKE record consumed.
PlainPeer ServeTlsTo(Driver &d, uint64_t tok, SSL_CTX *sctx, SSL_CTX *cctx, SslPtr *server) {
  *server = Server(sctx);
  PlainPeer p = TlsWithPeer(d, tok, server->get(), Client(cctx));
  Event hs = d.WaitEvent(tok, KLOOP_EVENT_HANDSHAKE);
  EXPECT_EQ(hs.result, 0) << Describe(hs);
  d.Drain(10 * 1ms);  // nothing of the handshake left to send
  return p;
}

int Unread(int fd) {
  int n = -1;
  EXPECT_EQ(ioctl(fd, FIONREAD, &n), 0);
  return n;
}

// Decrypt what the engine sends to `p` until `n` bytes came (or time is up).
std::string ReadTls(Driver &d, PlainPeer &p, size_t n) {
  std::string got;
  char buf[16384];
  auto end = std::chrono::steady_clock::now() + kDeadline;
  while (got.size() < n && std::chrono::steady_clock::now() < end) {
    int r = SSL_read(p.ssl.get(), buf, sizeof buf);
    if (r > 0) {
      got.append(buf, static_cast<size_t>(r));
      continue;
    }
    if (SSL_get_error(p.ssl.get(), r) != SSL_ERROR_WANT_READ) break;
    d.Poll(1 * kMs);  // the engine may have more to send
  }
  return got;
}

}  // namespace

// Sends wait for the next poll so that one io_uring_enter carries many of
// them -- but not past kSendEarlyBytes of encrypted output: a large TLS
// write goes to the socket from within kloop_stream_write(), in one gathered
// send (its records back to back), instead of waiting until the loop has
// encrypted everything else it has to answer.
TEST_P(Tls, LargeWriteIsSentBeforeTheNextPoll) {
  SSL_CTX_set_num_tickets(sctx.get(), 0);  // the server writes nothing after its Finished
  SslPtr s;
  PlainPeer p = ServeTlsTo(d, 2, sctx.get(), cctx.get(), &s);
  ASSERT_EQ(Unread(p.fd), 0);
  std::string msg = Pattern(0, 100 * 1024);
  kloop_stats before = GetStats(d);
  ASSERT_GE(kloop_stream_write(d, 2, msg.data(), msg.size()), 0);
  kloop_stats after = GetStats(d);
  EXPECT_GT(Unread(p.fd), 0) << "the records wait for the next poll";
  EXPECT_EQ(after.sqes - before.sqes, 1u) << "one send for all the records";
  EXPECT_EQ(after.enters - before.enters, 1u);
  EXPECT_EQ(ReadTls(d, p, msg.size()), msg);
  kloop_stream_abort(d, 2);
  d.WaitFinal(2);
}

// Below that, in a busy loop (its last poll did not wait), writes of many
// streams wait for the poll and leave together; the write that crosses it
// takes the others' sends along in its one enter.
TEST_P(Tls, SmallWritesWaitForThePollAndLeaveTogether) {
  SSL_CTX_set_num_tickets(sctx.get(), 0);
  SslPtr s1, s2;
  PlainPeer p1 = ServeTlsTo(d, 2, sctx.get(), cctx.get(), &s1);
  PlainPeer p2 = ServeTlsTo(d, 3, sctx.get(), cctx.get(), &s2);
  std::string small = Pattern(0, 1024);
  ASSERT_EQ(d.Poll(0), 0);  // busy: a poll that does not wait
  ASSERT_GE(kloop_stream_write(d, 2, small.data(), small.size()), 0);
  ASSERT_GE(kloop_stream_write(d, 3, small.data(), small.size()), 0);
  EXPECT_EQ(Unread(p1.fd), 0);
  EXPECT_EQ(Unread(p2.fd), 0);
  EXPECT_EQ(ReadTls(d, p1, small.size()), small);
  EXPECT_EQ(ReadTls(d, p2, small.size()), small);

  std::string half = Pattern(7, 40 * 1024);
  ASSERT_EQ(d.Poll(0), 0);
  ASSERT_GE(kloop_stream_write(d, 2, half.data(), half.size()), 0);
  EXPECT_EQ(Unread(p1.fd), 0) << "40 KiB waits for the poll";
  kloop_stats before = GetStats(d);
  ASSERT_GE(kloop_stream_write(d, 3, half.data(), half.size()), 0);
  kloop_stats after = GetStats(d);
  EXPECT_GT(Unread(p1.fd), 0);
  EXPECT_GT(Unread(p2.fd), 0);
  EXPECT_EQ(after.sqes - before.sqes, 2u);
  EXPECT_EQ(after.enters - before.enters, 1u);
  EXPECT_EQ(ReadTls(d, p1, half.size()), half);
  EXPECT_EQ(ReadTls(d, p2, half.size()), half);
  kloop_stream_abort(d, 2);
  kloop_stream_abort(d, 3);
  d.WaitFinal(2);
  d.WaitFinal(3);
}

// TLS 1.3 records of application data an SSL received (the inner content
// type of each record it decrypted, through OpenSSL's message callback).
void CountDataRecords(int write_p, int, int content_type, const void *buf, size_t len, SSL *,
                      void *arg) {
  if (!write_p && content_type == SSL3_RT_INNER_CONTENT_TYPE && len == 1 &&
      *static_cast<const unsigned char *>(buf) == SSL3_RT_APPLICATION_DATA)
    ++*static_cast<int *>(arg);
}

// After a poll that waited (the loop was idle, so its peers wait for its
// answers), a stream's records leave when the loop writes to another
// stream -- its callback is over -- instead of at the next poll; what it
// wrote before that still shares a record. A busy loop (its poll did not
// wait) gathers the sends into the poll's enter, and so does one made with
// KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT.
TEST_P(Tls, AfterAWaitAnAnswerLeavesWhenTheLoopWritesToAnotherStream) {
  SSL_CTX_set_num_tickets(sctx.get(), 0);
  auto check = [&](Driver &loop, uint64_t t1, bool idle, bool early) {
    const uint64_t t2 = t1 + 1;
    SslPtr s1, s2;
    PlainPeer p1 = ServeTlsTo(loop, t1, sctx.get(), cctx.get(), &s1);
    PlainPeer p2 = ServeTlsTo(loop, t2, sctx.get(), cctx.get(), &s2);
    int records = 0;
    SSL_set_msg_callback(p1.ssl.get(), CountDataRecords);
    SSL_set_msg_callback_arg(p1.ssl.get(), &records);
    ASSERT_EQ(loop.Poll(idle ? 1 * kMs : 0), 0);  // nothing to do: waits when idle
    std::string a = Pattern(1, 1000), b = Pattern(2, 1000), c = Pattern(3, 1000);
    kloop_stats before = GetStats(loop);
    ASSERT_GE(kloop_stream_write(loop, t1, a.data(), a.size()), 0);
    ASSERT_GE(kloop_stream_write(loop, t1, b.data(), b.size()), 0);
    EXPECT_EQ(Unread(p1.fd), 0) << "the stream may write more in this callback";
    ASSERT_GE(kloop_stream_write(loop, t2, c.data(), c.size()), 0);
    kloop_stats after = GetStats(loop);
    EXPECT_EQ(Unread(p2.fd), 0);
    if (early) {
      EXPECT_GT(Unread(p1.fd), 0) << "the answer waits for the next poll";
      EXPECT_EQ(after.sqes - before.sqes, 1u);
      EXPECT_EQ(after.enters - before.enters, 1u);
    } else {
      EXPECT_EQ(Unread(p1.fd), 0) << "sent before the poll";
      EXPECT_EQ(after.enters - before.enters, 0u);
    }
    EXPECT_TRUE(ReadTls(loop, p1, 2000) == a + b);
    EXPECT_EQ(records, 1) << "the two writes of one callback share a record";
    EXPECT_TRUE(ReadTls(loop, p2, 1000) == c);
    kloop_stream_abort(loop, t1);
    kloop_stream_abort(loop, t2);
    loop.WaitFinal(t1);
    loop.WaitFinal(t2);
  };
  {
    SCOPED_TRACE("idle");
    check(d, 2, true, true);
  }
  {
    SCOPED_TRACE("busy");
    check(d, 4, false, false);
  }
  Driver off;
  kloop_config cfg;
  kloop_config_init(&cfg);
  cfg.flags |= GetParam() | KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT;
  ASSERT_EQ(off.Create(&cfg), 0);
  SCOPED_TRACE("KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT");
  check(off, 2, true, false);
}

// A response written as head and body (or in more pieces) within one
// iteration goes out as one record, not one per write: a record costs
// both ends a header, a tag and a pass through the cipher. Counted by an
// OpenSSL peer as it reads them.
TEST_P(Tls, SmallWritesOfAnIterationShareARecord) {
  SslPtr mine = Client(cctx.get()), peer = Server(sctx.get());
  int records = 0;
  SSL_set_msg_callback(peer.get(), CountDataRecords);
  SSL_set_msg_callback_arg(peer.get(), &records);
  PlainPeer p = TlsWithPeer(d, 1, mine.get(), std::move(peer));
  Event hs = d.WaitEvent(1, KLOOP_EVENT_HANDSHAKE);
  ASSERT_EQ(hs.result, 0) << Describe(hs);
  std::string want;
  for (const char *piece : {"HTTP/1.1 200 OK\r\n", "Content-Length: 5\r\n\r\n", "hello"}) {
    ASSERT_GE(kloop_stream_write(d, 1, piece, strlen(piece)), 0);
    want += piece;
  }
  EXPECT_EQ(kloop_stream_write_size(d, 1), static_cast<int64_t>(want.size()))
      << "waiting plaintext counts as queued";
  EXPECT_TRUE(ReadTls(d, p, want.size()) == want);
  EXPECT_EQ(records, 1);

  // More than a record's worth: records of up to 16 KiB, in order, a
  // large write after the small ones that wait.
  records = 0;
  std::string a = Pattern(1, 10000), b = Pattern(2, 10000), big = Pattern(3, 50000);
  for (const std::string *w : {&a, &b, &big, &a})
    ASSERT_GE(kloop_stream_write(d, 1, w->data(), w->size()), 0);
  std::string more = a + b + big + a;
  EXPECT_TRUE(ReadTls(d, p, more.size()) == more);
  // a (waiting, sent when b would not fit with it), b, the large write
  // (4 records of 16 KiB at most), a again at the poll
  EXPECT_EQ(records, 1 + 1 + 4 + 1);
  kloop_stream_abort(d, 1);
  d.WaitFinal(1);
}

TEST_P(Tls, UntrustedCertificateFailsWithVerifyReason) {
  CtxPtr untrusting = ClientCtx(false);
  SslPtr c = Client(untrusting.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Event a = d.WaitEvent(1, KLOOP_EVENT_HANDSHAKE);
  EXPECT_EQ(a.result, -EPROTO);
  kloop_tls_error e = TlsError(d, 1);
  EXPECT_EQ(e.ssl_error, SSL_ERROR_SSL);
  EXPECT_EQ(e.lib, ERR_LIB_SSL);
  EXPECT_EQ(e.reason, SSL_R_CERTIFICATE_VERIFY_FAILED);
  EXPECT_STREQ(e.message, "certificate verify failed");
  EXPECT_EQ(e.verify_result, X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT);
  EXPECT_STREQ(e.verify_message, "self-signed certificate");
  // The client's alert reaches the server, whose handshake fails too.
  Event b = d.WaitEvent(2, KLOOP_EVENT_HANDSHAKE);
  EXPECT_LT(b.result, 0);
  // A failed stream takes no more writes.
  EXPECT_EQ(kloop_stream_write(d, 1, "x", 1), -EPIPE);
  CloseBoth();
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

TEST_P(Tls, HostnameMismatchIsReported) {
  SslPtr c = Client(cctx.get(), "other.example"), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Event a = d.WaitEvent(1, KLOOP_EVENT_HANDSHAKE);
  EXPECT_EQ(a.result, -EPROTO);
  kloop_tls_error e = TlsError(d, 1);
  EXPECT_EQ(e.reason, SSL_R_CERTIFICATE_VERIFY_FAILED);
  EXPECT_EQ(e.verify_result, X509_V_ERR_HOSTNAME_MISMATCH);
  EXPECT_STREQ(e.verify_message, "hostname mismatch");
  CloseBoth();
}

TEST_P(Tls, AlpnIsNegotiated) {
  CtxPtr alpn_srv = ServerCtx("h2");
  SslPtr c = Client(cctx.get()), s = Server(alpn_srv.get());
  static const unsigned char protos[] = "\x08http/1.1\x02h2";
  ASSERT_EQ(SSL_set_alpn_protos(c.get(), protos, sizeof protos - 1), 0);
  Pair(c.get(), s.get());
  Handshake();
  const unsigned char *got = nullptr;
  unsigned len = 0;
  SSL_get0_alpn_selected(c.get(), &got, &len);
  EXPECT_EQ(std::string(reinterpret_cast<const char *>(got), len), "h2");
  CloseBoth();
}

TEST_P(Tls, GarbageFromPeerFailsHandshakeAndSendsAlert) {
  SslPtr s = Server(sctx.get());
  auto [mine, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 2, mine, 0), 0);
  ASSERT_EQ(kloop_stream_start_tls(d, 2, s.get()), 0);
  // A handshake record whose message type does not exist.
  const char junk[] = {22, 3, 1, 0, 4, 99, 0, 0, 0};
  ASSERT_TRUE(WriteAll(peer, std::string(junk, sizeof junk)));
  Event b = d.WaitEvent(2, KLOOP_EVENT_HANDSHAKE);
  EXPECT_EQ(b.result, -EPROTO);
  kloop_tls_error e = TlsError(d, 2);
  EXPECT_EQ(e.lib, ERR_LIB_SSL);
  EXPECT_NE(e.reason, 0);
  EXPECT_STRNE(e.message, "");
  // The engine sends the alert OpenSSL queued: a TLS alert record (type 21).
  d.Drain(20 * 1ms);
  ASSERT_TRUE(WaitReadable(peer));
  char buf[64];
  ssize_t n = ::recv(peer, buf, sizeof buf, 0);
  ASSERT_GE(n, 1);
  EXPECT_EQ(buf[0], 21);
  kloop_stream_close(d, 2);
  d.WaitFinal(2);
}

// The alert of a failed handshake is queued (its send prepared) when the
// HANDSHAKE record comes out; an abort right then must not free the bytes
// under that send: the peer gets the alert or nothing, never other memory.
TEST_P(Tls, AbortRightAfterFailedHandshakeSendsNoForeignBytes) {
  for (int round = 0; round < 20; ++round) {
    SslPtr s = Server(sctx.get());
    auto [mine, peer] = TcpPair();
    uint64_t tok = 50 + static_cast<uint64_t>(round);
    ASSERT_EQ(kloop_stream_attach(d, tok, mine, 0), 0);
    ASSERT_EQ(kloop_stream_start_tls(d, tok, s.get()), 0);
    const char junk[] = {22, 3, 1, 0, 4, 99, 0, 0, 0};
    ASSERT_TRUE(WriteAll(peer, std::string(junk, sizeof junk)));
    Event b = d.WaitEvent(tok, KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(b.result, -EPROTO);
    ASSERT_EQ(kloop_stream_abort(d, tok), 0);
    d.WaitFinal(tok);
    ::shutdown(mine, SHUT_RDWR);
    std::string got;
    char buf[256];
    ssize_t n;
    while ((n = ::recv(peer, buf, sizeof buf, 0)) > 0) got.append(buf, static_cast<size_t>(n));
    if (!got.empty()) {
      ASSERT_GE(got.size(), 7u);
      EXPECT_EQ(got[0], 21) << "round " << round << ": not an alert record";
      EXPECT_EQ(got.size(), 7u) << "round " << round << ": one alert, nothing else";
    }
  }
}

TEST_P(Tls, PeerClosingDuringHandshakeIsAReset) {
  SslPtr s = Server(sctx.get());
  auto [mine, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 2, mine, 0), 0);
  ASSERT_EQ(kloop_stream_start_tls(d, 2, s.get()), 0);
  peer.reset();
  Event b = d.WaitEvent(2, KLOOP_EVENT_HANDSHAKE);
  EXPECT_EQ(b.result, -ECONNRESET);
  kloop_stream_close(d, 2);
  EXPECT_EQ(d.WaitFinal(2).event, KLOOP_EVENT_CLOSED);
}

TEST_P(Tls, GracefulCloseSendsCloseNotifyAndWaitsForThePeers) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Handshake();
  ASSERT_GE(kloop_stream_write(d, 1, "bye", 3), 0);
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event eof = d.WaitEvent(2, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.aux, 0u) << "close_notify came first";
  EXPECT_EQ(d.DataOf(2), "bye");
  d.Drain(20 * 1ms);
  EXPECT_FALSE(d.HasFinal(1)) << "the client waits for the server's close_notify";
  EXPECT_EQ(kloop_stream_write(d, 1, "late", 4), -EPIPE) << "no data after close_notify";
  ASSERT_EQ(kloop_stream_close(d, 2), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
  EXPECT_EQ(d.WaitFinal(2).result, 0);
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

TEST_P(Tls, ConnectionCutWithoutCloseNotifyIsAnUncleanEof) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Handshake();
  ASSERT_GE(kloop_stream_write(d, 1, "last", 4), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "last"; }));
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);  // no close_notify
  d.WaitFinal(1);
  ASSERT_EQ(::shutdown(cli_fd, SHUT_WR), 0);
  Event eof = d.WaitEvent(2, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.aux, KLOOP_EOF_UNCLEAN);
  // The connection has ended: closing sends no close_notify (as sslproto).
  ASSERT_EQ(kloop_stream_close(d, 2), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 0);
  srv_fd.reset();
  ASSERT_TRUE(WaitReadable(cli_fd));
  char buf[64];
  EXPECT_EQ(::recv(cli_fd, buf, sizeof buf, MSG_DONTWAIT), 0) << "only the EOF, no record";
}

TEST_P(Tls, CorruptRecordIsATlsReadError) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(c.get(), s.get());
  Handshake();
  // Hand the rest of the client's side to a raw writer: an application
  // data record header with a body that cannot decrypt.
  ASSERT_EQ(kloop_stream_abort(d, 1), 0);
  d.WaitFinal(1);
  const unsigned char rec[] = {23, 3,  3,  0,  24, 1,  2,  3,  4,  5,  6,  7,  8,  9, 10,
                               11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24};
  ASSERT_EQ(::send(cli_fd, rec, sizeof rec, MSG_NOSIGNAL), static_cast<ssize_t>(sizeof rec));
  Event err = d.WaitEvent(2, KLOOP_EVENT_ERROR);
  EXPECT_EQ(err.result, -EPROTO);
  EXPECT_EQ(err.aux, KLOOP_ERROR_READ | KLOOP_ERROR_TLS);
  kloop_tls_error e = TlsError(d, 2);
  EXPECT_EQ(e.ssl_error, SSL_ERROR_SSL);
  EXPECT_EQ(e.reason, SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC);
  kloop_stream_abort(d, 2);
  d.WaitFinal(2);
}

// A TLS 1.2 client asking to renegotiate is refused (OpenSSL's server
// default, which the engine keeps): the client's renegotiation fails, what
// came before it arrived intact, and the stream ends with a TLS error or
// EOF, nothing else.
TEST_P(Tls, ClientRenegotiationIsRefused) {
  SslPtr s = Server(sctx.get());
  auto [mine, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 2, mine, 0), 0);
  ASSERT_EQ(kloop_stream_start_tls(d, 2, s.get()), 0);
  CtxPtr c12 = ClientCtx();
  SSL_CTX_set_max_proto_version(c12.get(), TLS1_2_VERSION);
  std::atomic<int> reneg{-2}, hs{-2};
  std::thread th([&, fd = peer.get()] {
    SslPtr c = Client(c12.get());
    SSL_set_fd(c.get(), fd);
    if (SSL_connect(c.get()) != 1) return;
    SSL_write(c.get(), "before", 6);
    reneg = SSL_renegotiate(c.get());
    hs = SSL_do_handshake(c.get());
    ::shutdown(fd, SHUT_RDWR);
  });
  ASSERT_EQ(d.WaitEvent(2, KLOOP_EVENT_HANDSHAKE).result, 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "before"; }));
  ASSERT_TRUE(d.RunUntil(
      [&] { return !d.Of(2, KLOOP_EVENT_ERROR).empty() || !d.Of(2, KLOOP_EVENT_EOF).empty(); }));
  th.join();
  EXPECT_EQ(reneg.load(), 1) << "the client asked";
  EXPECT_LE(hs.load(), 0) << "and was refused";
  EXPECT_EQ(d.DataOf(2), "before");
  EXPECT_EQ(d.Of(2, KLOOP_EVENT_HANDSHAKE).size(), 1u);
  kloop_stream_abort(d, 2);
  d.WaitFinal(2);
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

TEST_P(Tls, PausedStreamHandshakesButHoldsPlaintextUntilResume) {
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  ASSERT_NO_FATAL_FAILURE(Pair(c.get(), s.get(), KLOOP_STREAM_PAUSED));
  Handshake();
  ASSERT_GE(kloop_stream_write(d, 1, "held", 4), 0);
  d.Drain(30 * 1ms);
  EXPECT_EQ(d.DataOf(2), "");
  ASSERT_EQ(kloop_stream_resume(d, 2), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "held"; })) << d.DataOf(2);
  // pause again with data in flight, then resume: nothing lost, in order
  ASSERT_EQ(kloop_stream_pause(d, 2), 0);
  ASSERT_GE(kloop_stream_write(d, 1, "-more", 5), 0);
  d.Drain(30 * 1ms);
  ASSERT_EQ(kloop_stream_resume(d, 2), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "held-more"; })) << d.DataOf(2);
  CloseBoth();
}

namespace {

void PeerWrite(PlainPeer &p, const std::string &s) {
  ASSERT_EQ(SSL_write(p.ssl.get(), s.data(), static_cast<int>(s.size())),
            static_cast<int>(s.size()));
}

// Reads until the engine's close_notify; true if it came.
bool PeerSeesCloseNotify(Driver &d, PlainPeer &p) {
  char buf[256];
  auto end = std::chrono::steady_clock::now() + kDeadline;
  while (std::chrono::steady_clock::now() < end) {
    int r = SSL_read(p.ssl.get(), buf, sizeof buf);
    if (r > 0) continue;
    int e = SSL_get_error(p.ssl.get(), r);
    if (e == SSL_ERROR_ZERO_RETURN) return true;
    if (e != SSL_ERROR_WANT_READ) return false;
    d.Poll(1 * kMs);
  }
  return false;
}

struct Suite {
  int version;
  const char *name;  // OpenSSL's name of the cipher suite
};

// A context that offers exactly this version and cipher suite.
void PinSuite(SSL_CTX *c, const Suite &suite) {
  SSL_CTX_set_min_proto_version(c, suite.version);
  SSL_CTX_set_max_proto_version(c, suite.version);
  if (suite.version == TLS1_3_VERSION)
    ASSERT_EQ(SSL_CTX_set_ciphersuites(c, suite.name), 1);
  else
    ASSERT_EQ(SSL_CTX_set_cipher_list(c, suite.name), 1);
}

}  // namespace

// Where the kernel has no TLS, the engine takes the send key OpenSSL offers
// a kernel-TLS BIO and seals the records itself, and opens the peer's
// records with the receive key (TLS 1.2: offered by OpenSSL; TLS 1.3: from
// the key log): each AEAD suite OpenSSL offers a key for, both TLS
// versions, both roles, writes split in several records, OpenSSL's own
// records both ways (session tickets, close_notify) -- against an ordinary
// OpenSSL peer.
TEST_P(Tls, RecordsSealedAndOpenedByTheEngine) {
  const Suite suites[] = {
      {TLS1_2_VERSION, "ECDHE-ECDSA-AES128-GCM-SHA256"},
      {TLS1_2_VERSION, "ECDHE-ECDSA-AES256-GCM-SHA384"},
      {TLS1_2_VERSION, "ECDHE-ECDSA-CHACHA20-POLY1305"},
      {TLS1_3_VERSION, "TLS_AES_128_GCM_SHA256"},
      {TLS1_3_VERSION, "TLS_AES_256_GCM_SHA384"},
      {TLS1_3_VERSION, "TLS_CHACHA20_POLY1305_SHA256"},
  };
  uint64_t tok = 10;
  for (const Suite &suite : suites) {
    for (bool engine_serves : {true, false}) {
      SCOPED_TRACE(std::string(suite.name) +
                   (engine_serves ? ", engine serves" : ", engine connects"));
      CtxPtr sc = ServerCtx(), cc = ClientCtx();
      ASSERT_NO_FATAL_FAILURE(PinSuite(sc.get(), suite));
      ASSERT_NO_FATAL_FAILURE(PinSuite(cc.get(), suite));
      SslPtr mine = engine_serves ? Server(sc.get()) : Client(cc.get());
      SslPtr peer = engine_serves ? Client(cc.get()) : Server(sc.get());
      PlainPeer p = TlsWithPeer(d, tok, mine.get(), std::move(peer));
      Event hs = d.WaitEvent(tok, KLOOP_EVENT_HANDSHAKE);
      ASSERT_EQ(hs.result, 0) << Describe(hs);
      ASSERT_STREQ(SSL_get_cipher_name(mine.get()), suite.name);
      bool kernel = (GetCaps(d).enabled & KLOOP_CAP_KTLS) != 0;
      // OpenSSL hands its records to the BIO as plaintext: it took the key.
      EXPECT_EQ(BIO_get_ktls_send(SSL_get_wbio(mine.get())) != 0, EngineSends());
      if (!kernel) {
        EXPECT_EQ(hs.aux & (KLOOP_HANDSHAKE_KTLS_TX | KLOOP_HANDSHAKE_KTLS_RX), 0u)
            << "no kernel TLS here";
        // ... and reads the peer's other records as the engine frames them.
        EXPECT_EQ(BIO_get_ktls_recv(SSL_get_rbio(mine.get())) != 0, EngineOpens());
      }

      std::string small = "hello", big = Pattern(static_cast<int>(tok), 100 * 1024);
      ASSERT_GE(kloop_stream_write(d, tok, small.data(), small.size()), 0);
      ASSERT_GE(kloop_stream_write(d, tok, big.data(), big.size()), 0);
      EXPECT_TRUE(ReadTls(d, p, small.size() + big.size()) == small + big);
      std::string back = "back" + Pattern(static_cast<int>(tok) + 1, 100 * 1024);
      ASSERT_NO_FATAL_FAILURE(PeerWrite(p, "back"));
      ASSERT_NO_FATAL_FAILURE(PeerWrite(p, back.substr(4)));
      EXPECT_TRUE(d.RunUntil([&] { return d.DataSizeOf(tok) >= back.size(); }));
      EXPECT_TRUE(d.DataOf(tok) == back) << d.DataSizeOf(tok);
      if (!engine_serves && suite.version == TLS1_3_VERSION) {
        // The server's session tickets came after the handshake, through
        // the engine's opening when it opens, to OpenSSL.
        SSL_SESSION *sess = SSL_get_session(mine.get());
        EXPECT_TRUE(sess && SSL_SESSION_is_resumable(sess)) << "no ticket arrived";
      }
      EXPECT_EQ(d.Of(tok, KLOOP_EVENT_ERROR).size(), 0u);
      ASSERT_EQ(kloop_stream_close(d, tok), 0);
      EXPECT_TRUE(PeerSeesCloseNotify(d, p));
      SSL_shutdown(p.ssl.get());
      Event fin = d.WaitFinal(tok);
      EXPECT_EQ(fin.event, KLOOP_EVENT_CLOSED);
      ++tok;
    }
  }
}

// A TLS 1.3 peer may ask for a key update (RFC 8446 4.6.3): OpenSSL
// answers with a KeyUpdate under the old key, and from then on every record
// must use the next one. The engine follows it when it seals (the traffic
// secret comes from the context's key log), in both roles and with both
// hashes; where the context's key log belongs to someone else, OpenSSL
// keeps encrypting and the update works as well.
TEST_P(Tls, PeersKeyUpdateIsFollowed) {
  uint64_t tok = 40;
  struct Case {
    const char *suite;
    bool engine_serves;
    bool foreign_keylog;
  };
  const Case cases[] = {
      {"TLS_AES_128_GCM_SHA256", true, false},  {"TLS_AES_256_GCM_SHA384", true, false},
      {"TLS_AES_128_GCM_SHA256", false, false}, {"TLS_CHACHA20_POLY1305_SHA256", false, false},
      {"TLS_AES_256_GCM_SHA384", true, true},
  };
  if (GetCaps(d).enabled & KLOOP_CAP_KTLS)
    GTEST_SKIP() << "kernel TLS cannot change the send key: tests/ktls checks that such a "
                    "stream fails cleanly";
  for (const Case &c : cases) {
    SCOPED_TRACE(std::string(c.suite) +
                 (c.engine_serves ? ", engine serves" : ", engine connects") +
                 (c.foreign_keylog ? ", key log taken" : ""));
    CtxPtr sc = ServerCtx(), cc = ClientCtx();
    for (SSL_CTX *x : {sc.get(), cc.get()}) {
      SSL_CTX_set_min_proto_version(x, TLS1_3_VERSION);
      ASSERT_EQ(SSL_CTX_set_ciphersuites(x, c.suite), 1);
      if (c.foreign_keylog) SSL_CTX_set_keylog_callback(x, [](const SSL *, const char *) {});
    }
    SslPtr mine = c.engine_serves ? Server(sc.get()) : Client(cc.get());
    SslPtr peer = c.engine_serves ? Client(cc.get()) : Server(sc.get());
    PlainPeer p = TlsWithPeer(d, tok, mine.get(), std::move(peer));
    Event hs = d.WaitEvent(tok, KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
    // Without the secret the engine leaves the records to OpenSSL.
    bool seals = !(GetParam() & KLOOP_CONFIG_NO_TLS_SEAL) && !c.foreign_keylog;
    EXPECT_EQ(BIO_get_ktls_send(SSL_get_wbio(mine.get())) != 0, seals);
    // ... and opens the peer's records, following its key updates too.
    EXPECT_EQ(BIO_get_ktls_recv(SSL_get_rbio(mine.get())) != 0, seals);
    std::string want;
    for (int round = 0; round < 3; ++round) {
      ASSERT_EQ(SSL_key_update(p.ssl.get(), SSL_KEY_UPDATE_REQUESTED), 1);
      std::string ask = "ask" + std::to_string(round);
      ASSERT_NO_FATAL_FAILURE(PeerWrite(p, ask));  // the KeyUpdate goes first
      want += ask;
      ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(tok) == want; })) << d.DataOf(tok);
      // The answer: the engine's KeyUpdate, then data under the new key,
      // small (one record) and large (several).
      std::string reply = "reply" + std::to_string(round) + Pattern(round, 40000);
      ASSERT_GE(kloop_stream_write(d, tok, reply.data(), reply.size()), 0);
      ASSERT_GE(kloop_stream_write(d, tok, "!", 1), 0);
      EXPECT_TRUE(ReadTls(d, p, reply.size() + 1) == reply + "!") << "round " << round;
      EXPECT_EQ(d.Of(tok, KLOOP_EVENT_ERROR).size(), 0u)
          << Describe(d.Of(tok, KLOOP_EVENT_ERROR)[0]);
    }
    ASSERT_EQ(kloop_stream_close(d, tok), 0);
    EXPECT_TRUE(PeerSeesCloseNotify(d, p));
    SSL_shutdown(p.ssl.get());
    d.WaitFinal(tok);
    ++tok;
  }
}

// The peer's records reach the engine in pieces of any size: a header, an
// explicit nonce or a tag split between receive buffers, records spanning
// many of them. All of it arrives intact; a stream that ends inside a
// record ends uncleanly, without the piece.
TEST_P(Tls, RecordsArrivingInPiecesAreOpened) {
  const Suite suites[] = {
      {TLS1_2_VERSION, "ECDHE-ECDSA-AES128-GCM-SHA256"},
      {TLS1_2_VERSION, "ECDHE-ECDSA-CHACHA20-POLY1305"},
      {TLS1_3_VERSION, "TLS_AES_128_GCM_SHA256"},
  };
  uint64_t tok = 60;
  for (const Suite &suite : suites) {
    SCOPED_TRACE(suite.name);
    CtxPtr sc = ServerCtx(), cc = ClientCtx();
    ASSERT_NO_FATAL_FAILURE(PinSuite(sc.get(), suite));
    ASSERT_NO_FATAL_FAILURE(PinSuite(cc.get(), suite));
    SslPtr mine = Server(sc.get());
    PlainPeer p = TlsWithPeer(d, tok, mine.get(), Client(cc.get()));
    Event hs = d.WaitEvent(tok, KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
    if (!(GetCaps(d).enabled & KLOOP_CAP_KTLS)) {
      EXPECT_EQ(BIO_get_ktls_recv(SSL_get_rbio(mine.get())) != 0, EngineOpens());
    }
    // From here the peer's records go to memory; the test sends them.
    BIO *mem = BIO_new(BIO_s_mem());
    ASSERT_NE(mem, nullptr);
    SSL_set0_wbio(p.ssl.get(), mem);
    auto records = [&](const std::string &plain) {
      PeerWrite(p, plain);
      std::string ct;
      char buf[4096];
      int n;
      while ((n = BIO_read(mem, buf, sizeof buf)) > 0) ct.append(buf, static_cast<size_t>(n));
      return ct;
    };
    auto send_in_pieces = [&](const std::string &ct, size_t piece) {
      for (size_t i = 0; i < ct.size(); i += piece) {
        size_t n = ct.size() - i < piece ? ct.size() - i : piece;
        ASSERT_EQ(::send(p.fd, ct.data() + i, n, MSG_NOSIGNAL), static_cast<ssize_t>(n));
        d.Poll(0);  // each piece a receive of its own, mostly
      }
    };
    std::string want = Pattern(1, 300) + Pattern(2, 2000);
    std::string two = records(Pattern(1, 300));  // in this order: one statement each
    two += records(Pattern(2, 2000));
    ASSERT_NO_FATAL_FAILURE(send_in_pieces(two, 7));
    std::string big = Pattern(3, 40000);  // three records
    ASSERT_NO_FATAL_FAILURE(send_in_pieces(records(big), 1000));
    want += big;
    EXPECT_TRUE(d.RunUntil([&] { return d.DataSizeOf(tok) >= want.size(); }));
    EXPECT_TRUE(d.DataOf(tok) == want) << d.DataSizeOf(tok);
    // A record cut short by the end of the stream.
    std::string cut = records("cut");
    ASSERT_NO_FATAL_FAILURE(send_in_pieces(cut.substr(0, cut.size() - 5), 4));
    ASSERT_EQ(::shutdown(p.fd, SHUT_WR), 0);
    Event eof = d.WaitEvent(tok, KLOOP_EVENT_EOF);
    EXPECT_EQ(eof.aux, KLOOP_EOF_UNCLEAN);
    EXPECT_TRUE(d.DataOf(tok) == want) << "nothing of the cut record";
    EXPECT_EQ(d.Of(tok, KLOOP_EVENT_ERROR).size(), 0u);
    kloop_stream_abort(d, tok);
    d.WaitFinal(tok);
    ++tok;
  }
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

// What a paused stream holds when the peer's end of the stream arrives --
// a record for OpenSSL (a key update), data after it, then the socket's
// end -- is all delivered on resume, in order, before the (unclean) EOF.
TEST_P(Tls, EndOfStreamWaitsForTheRecordsBeforeIt) {
  CtxPtr sc = ServerCtx(), cc = ClientCtx();
  SSL_CTX_set_min_proto_version(sc.get(), TLS1_3_VERSION);
  SslPtr mine = Server(sc.get());
  PlainPeer p = TlsWithPeer(d, 70, mine.get(), Client(cc.get()));
  Event hs = d.WaitEvent(70, KLOOP_EVENT_HANDSHAKE);
  ASSERT_EQ(hs.result, 0) << Describe(hs);
  ASSERT_EQ(kloop_stream_pause(d, 70), 0);
  d.Drain(10ms);
  BIO *mem = BIO_new(BIO_s_mem());
  ASSERT_NE(mem, nullptr);
  SSL_set0_wbio(p.ssl.get(), mem);
  ASSERT_EQ(SSL_key_update(p.ssl.get(), SSL_KEY_UPDATE_NOT_REQUESTED), 1);
  std::string msg = Pattern(9, 3000);
  ASSERT_NO_FATAL_FAILURE(PeerWrite(p, msg));  // the key update goes first
  std::string ct;
  char buf[4096];
  int n;
  while ((n = BIO_read(mem, buf, sizeof buf)) > 0) ct.append(buf, static_cast<size_t>(n));
  ASSERT_EQ(::send(p.fd, ct.data(), ct.size(), MSG_NOSIGNAL), static_cast<ssize_t>(ct.size()));
  ASSERT_EQ(::shutdown(p.fd, SHUT_WR), 0);
  d.Drain(30ms);
  EXPECT_EQ(d.DataSizeOf(70), 0u) << "paused";
  ASSERT_EQ(kloop_stream_resume(d, 70), 0);
  Event eof = d.WaitEvent(70, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.aux, KLOOP_EOF_UNCLEAN);
  EXPECT_TRUE(d.DataOf(70) == msg) << d.DataSizeOf(70);
  EXPECT_EQ(d.Of(70, KLOOP_EVENT_ERROR).size(), 0u);
  kloop_stream_abort(d, 70);
  d.WaitFinal(70);
}

// The same when the stream had to wait for a plaintext buffer: the other
// streams of the poll took all of them, and meanwhile the socket's end
// arrived behind a key update and data. When buffers are back, the data
// comes first, then the (unclean) EOF -- not a TLS error.
TEST_P(Tls, EndOfStreamAfterAWaitForBuffersKeepsTheRecordsBeforeIt) {
  kloop_config cfg;
  kloop_config_init(&cfg);
  cfg.flags |= GetParam();
  cfg.buf_count = 16;  // the fewest plaintext buffers: 8
  Driver dd(&cfg);
  ASSERT_EQ(dd.create_rc(), 0);
  constexpr int kStreams = 9;
  CtxPtr sc = ServerCtx(), cc = ClientCtx();
  SSL_CTX_set_min_proto_version(sc.get(), TLS1_3_VERSION);
  std::vector<SslPtr> mine;
  std::vector<PlainPeer> peers;
  for (int i = 0; i < kStreams; ++i) {
    mine.push_back(Server(sc.get()));
    peers.push_back(
        TlsWithPeer(dd, 80 + static_cast<uint64_t>(i), mine.back().get(), Client(cc.get())));
    Event hs = dd.WaitEvent(80 + static_cast<uint64_t>(i), KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
  }
  dd.Drain(20ms);
  const uint64_t last = 80 + kStreams - 1;
  PlainPeer &p = peers.back();
  BIO *mem = BIO_new(BIO_s_mem());
  ASSERT_NE(mem, nullptr);
  SSL_set0_wbio(p.ssl.get(), mem);
  ASSERT_EQ(SSL_key_update(p.ssl.get(), SSL_KEY_UPDATE_NOT_REQUESTED), 1);
  std::string msg = Pattern(8, 2000);
  ASSERT_NO_FATAL_FAILURE(PeerWrite(p, msg));
  std::string ct;
  char buf[4096];
  int n;
  while ((n = BIO_read(mem, buf, sizeof buf)) > 0) ct.append(buf, static_cast<size_t>(n));
  // Nothing polls from here until all of it is in the sockets: the other
  // streams' data first, then the last one's records and its end.
  for (int i = 0; i + 1 < kStreams; ++i) ASSERT_NO_FATAL_FAILURE(PeerWrite(peers[i], "x"));
  ASSERT_EQ(::send(p.fd, ct.data(), ct.size(), MSG_NOSIGNAL), static_cast<ssize_t>(ct.size()));
  ASSERT_EQ(::shutdown(p.fd, SHUT_WR), 0);
  Event eof = dd.WaitEvent(last, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.aux, KLOOP_EOF_UNCLEAN);
  EXPECT_TRUE(dd.DataOf(last) == msg) << dd.DataSizeOf(last);
  for (const Event &e : dd.Of(last, KLOOP_EVENT_ERROR)) ADD_FAILURE() << Describe(e);
  for (int i = 0; i < kStreams; ++i) kloop_stream_abort(dd, 80 + static_cast<uint64_t>(i));
  for (int i = 0; i < kStreams; ++i) dd.WaitFinal(80 + static_cast<uint64_t>(i));
}

TEST_P(Tls, StartTlsInPlaceAfterPlainBytes) {
  auto p = TcpPair();
  srv_fd = std::move(p.first);
  cli_fd = std::move(p.second);
  ASSERT_EQ(kloop_stream_attach(d, 1, cli_fd, 0), 0);
  ASSERT_EQ(kloop_stream_attach(d, 2, srv_fd, 0), 0);
  ASSERT_GE(kloop_stream_write(d, 1, "STARTTLS\r\n", 10), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "STARTTLS\r\n"; }));
  // The server pauses, answers in plain text and upgrades; the client
  // upgrades on reading the answer. Its hello may arrive while the server
  // is still paused: it must be taken as TLS, not delivered as data.
  ASSERT_EQ(kloop_stream_pause(d, 2), 0);
  ASSERT_GE(kloop_stream_write(d, 2, "220 go\r\n", 8), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1) == "220 go\r\n"; }));
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  ASSERT_EQ(kloop_stream_start_tls(d, 1, c.get()), 0);
  d.Drain(20 * 1ms);  // the hello reaches the paused server
  ASSERT_EQ(kloop_stream_start_tls(d, 2, s.get()), 0);
  ASSERT_EQ(kloop_stream_resume(d, 2), 0);
  Handshake();
  ASSERT_GE(kloop_stream_write(d, 1, "MAIL", 4), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "STARTTLS\r\nMAIL"; })) << d.DataOf(2);
  CloseBoth();
}

TEST_P(Tls, ManyConnectionsAtOnce) {
  constexpr int kConns = 40;
  ASSERT_NO_FATAL_FAILURE(TlsPairs(kConns));
  for (int i = 0; i < kConns; ++i)
    ASSERT_GE(kloop_stream_write(d, 100 + 2 * static_cast<uint64_t>(i), "m", 1), 0);
  ASSERT_TRUE(d.RunUntil(
      [&] {
        for (int i = 0; i < kConns; ++i)
          if (d.DataOf(101 + 2 * static_cast<uint64_t>(i)) != "m") return false;
        return true;
      },
      30s));
  for (int i = 0; i < 2 * kConns; ++i) kloop_stream_abort(d, 100 + static_cast<uint64_t>(i));
  for (int i = 0; i < 2 * kConns; ++i) d.WaitFinal(100 + static_cast<uint64_t>(i));
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

// Plaintext buffers touched by a burst go back to the kernel while the
// engine waits, as receive buffers do (test_streams:
// IdleEngineGivesBackReceiveBuffersOfABurst).
TEST_P(Tls, IdleEngineGivesBackPlaintextBuffersOfABurst) {
  constexpr int kConns = 48;
  ASSERT_NO_FATAL_FAILURE(TlsPairs(kConns));
  for (int i = 0; i < kConns; ++i) {
    Event hs = d.WaitEvent(101 + 2 * static_cast<uint64_t>(i), KLOOP_EVENT_HANDSHAKE, 30s);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
  }
  std::set<uint64_t> burst;
  d.on_record = [&](const kloop_completion &c) {
    if (c.event == KLOOP_EVENT_DATA && c.token % 2 == 1) burst.insert(c.data);
  };
  // Every client sends at once: the servers decrypt it all in a few polls.
  for (int i = 0; i < kConns; ++i)
    ASSERT_GE(
        kloop_stream_write(d, 100 + 2 * static_cast<uint64_t>(i), Pattern(i, 8000).data(), 8000),
        0);
  ASSERT_TRUE(d.RunUntil(
      [&] {
        for (int i = 0; i < kConns; ++i)
          if (d.DataSizeOf(101 + 2 * static_cast<uint64_t>(i)) < 8000) return false;
        return true;
      },
      30s));
  d.on_record = nullptr;
  for (int i = 0; i < kConns; ++i)
    EXPECT_TRUE(d.DataOf(101 + 2 * static_cast<uint64_t>(i)) == Pattern(i, 8000)) << i;
  ASSERT_GE(burst.size(), 32u) << "the burst did not take many plaintext buffers";
  EXPECT_GE(ResidentPages(burst), burst.size() - 4) << "the burst's buffers were not in memory";
  kloop_stats before = GetStats(d);

  kloop_completion recs[8];
  auto start = std::chrono::steady_clock::now();
  int n = kloop_poll(d, recs, 8, 300'000'000);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 290ms) << "the wait ended early: " << n;
  EXPECT_GE(GetStats(d).buffers_released - before.buffers_released, burst.size() - 24);
  EXPECT_LE(ResidentPages(burst), 24u) << "their pages are still in memory";

  for (int i = 0; i < 2 * kConns; ++i) kloop_stream_abort(d, 100 + static_cast<uint64_t>(i));
  for (int i = 0; i < 2 * kConns; ++i) d.WaitFinal(100 + static_cast<uint64_t>(i));
}

// Python's ssl contexts set SSL_MODE_RELEASE_BUFFERS: OpenSSL would free
// a connection's record buffers after every SSL_read/SSL_write and
// allocate them again for the next. The engine keeps them while the
// stream is in use and frees them once it has been idle for a trim period.
TEST_P(Tls, BusyStreamKeepsOpenSslBuffersIdleStreamFreesThem) {
  ASSERT_TRUE(g_ssl_heap_counted) << "OpenSSL allocated before the counting hooks";
  SSL_CTX_set_mode(cctx.get(), SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_mode(sctx.get(), SSL_MODE_RELEASE_BUFFERS);
  constexpr int kConns = 8;
  ASSERT_NO_FATAL_FAILURE(TlsPairs(kConns));
  for (int i = 0; i < kConns; ++i) {
    Event hs = d.WaitEvent(101 + 2 * static_cast<uint64_t>(i), KLOOP_EVENT_HANDSHAKE, 30s);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
  }
  EXPECT_EQ(SSL_get_mode(ssls[0].get()) & SSL_MODE_RELEASE_BUFFERS, 0u)
      << "the engine frees the buffers itself";
  size_t sent = 0;
  // One 1 KiB message from every client to its server, all received.
  auto round = [&] {
    for (int i = 0; i < kConns; ++i)
      ASSERT_GE(
          kloop_stream_write(d, 100 + 2 * static_cast<uint64_t>(i), Pattern(i, 1024).data(), 1024),
          0);
    sent += 1024;
    ASSERT_TRUE(d.RunUntil([&] {
      for (int i = 0; i < kConns; ++i)
        if (d.DataSizeOf(101 + 2 * static_cast<uint64_t>(i)) < sent) return false;
      return true;
    }));
  };
  ASSERT_NO_FATAL_FAILURE(round());
  // 20 more, 20 ms apart: the loop waits between them, across three trim
  // periods, and the streams are in use in each.
  long allocs_before = SslHeap::allocs, bytes_before = SslHeap::allocated;
  constexpr int kRounds = 20;
  for (int r = 0; r < kRounds; ++r) {
    d.Drain(20ms);
    ASSERT_NO_FATAL_FAILURE(round());
  }
  long allocs = SslHeap::allocs - allocs_before;
  long bytes = SslHeap::allocated - bytes_before;
  // With the mode, each record sent and each received takes a buffer of
  // about 17 KiB (5 MiB in all); without it OpenSSL allocates some 40
  // bytes per record here. The bound leaves room for one trim of all of
  // them, should the machine stall a round for longer than a trim period.
  EXPECT_LT(bytes, kConns * kRounds * 4096L) << "OpenSSL allocated " << allocs << " times";

  long live_before = SslHeap::live;
  kloop_completion recs[8];
  auto start = std::chrono::steady_clock::now();
  int n = kloop_poll(d, recs, 8, 300'000'000);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 290ms) << "the wait ended early: " << n;
  long freed = live_before - SslHeap::live;
  // Each of the 2 * kConns SSLs held a read and a write buffer of about
  // 17 KiB: count at least one of the two. Where the engine makes the
  // records, a stream that only sends holds no OpenSSL buffer at all.
  long holders = EngineSends() ? kConns : 2 * kConns;
  EXPECT_GE(freed, holders * 16384L) << "idle streams kept OpenSSL's buffers";

  // They work on: the buffers come back for the next record.
  ASSERT_NO_FATAL_FAILURE(round());
  for (int i = 0; i < kConns; ++i) {
    std::string want;
    for (size_t k = 0; k < sent / 1024; ++k) want += Pattern(i, 1024);
    EXPECT_TRUE(d.DataOf(101 + 2 * static_cast<uint64_t>(i)) == want) << i;
  }
  for (int i = 0; i < 2 * kConns; ++i) kloop_stream_abort(d, 100 + static_cast<uint64_t>(i));
  for (int i = 0; i < 2 * kConns; ++i) d.WaitFinal(100 + static_cast<uint64_t>(i));
  EXPECT_NE(SSL_get_mode(ssls[0].get()) & SSL_MODE_RELEASE_BUFFERS, 0u)
      << "the caller's mode is back once the engine lets go of the SSL";
}

TEST_P(Tls, BadCalls) {
  SslPtr c = Client(cctx.get());
  auto [a, b] = TcpPair();
  EXPECT_EQ(kloop_stream_start_tls(d, 9, c.get()), -ENOENT);
  EXPECT_EQ(kloop_stream_start_tls(nullptr, 9, c.get()), -EBADF);
  ASSERT_EQ(kloop_stream_attach(d, 9, a, 0), 0);
  EXPECT_EQ(kloop_stream_start_tls(d, 9, nullptr), -EINVAL);
  kloop_tls_error e{};
  e.size = sizeof e;
  EXPECT_EQ(kloop_stream_tls_error(d, 9, &e), -EINVAL) << "not a TLS stream";
  EXPECT_EQ(kloop_stream_tls_error(d, 9, nullptr), -EINVAL);
  e.size = 4;
  EXPECT_EQ(kloop_stream_tls_error(d, 9, &e), -EINVAL);
  ASSERT_EQ(kloop_stream_start_tls(d, 9, c.get()), 0);
  EXPECT_EQ(kloop_stream_start_tls(d, 9, c.get()), -EALREADY);
  EXPECT_EQ(kloop_stream_shutdown(d, 9), -EOPNOTSUPP);
  auto [r, w] = Pipe();
  ASSERT_EQ(kloop_stream_attach(d, 10, r, KLOOP_STREAM_FILE), 0);
  EXPECT_EQ(kloop_stream_start_tls(d, 10, c.get()), -EOPNOTSUPP);
  ASSERT_EQ(kloop_stream_close(d, 10), 0);
  auto [x, y] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 11, x, 0), 0);
  ASSERT_EQ(kloop_stream_close(d, 11), 0);
  EXPECT_EQ(kloop_stream_start_tls(d, 11, c.get()), -EPIPE);
  kloop_stream_abort(d, 9);
  d.WaitFinal(9);
  d.WaitFinal(10);
  d.WaitFinal(11);
  // The engine dropped its reference: ours is the last one.
  EXPECT_EQ(SSL_get_rbio(c.get()) != nullptr, true);
}

INSTANTIATE_TEST_SUITE_P(EngineSeals, Tls, ::testing::Values(0u));
INSTANTIATE_TEST_SUITE_P(OpenSslEncrypts, Tls, ::testing::Values(KLOOP_CONFIG_NO_TLS_SEAL));

TEST(TlsInfo, DescribesTheLoadedOpenSsl) {
  struct kloop_tls_info info {};
  info.size = sizeof info;
  ASSERT_EQ(kloop_get_tls_info(&info), 0);
  EXPECT_EQ(info.version_num, OpenSSL_version_num());
  EXPECT_EQ(info.ssl_new_addr, reinterpret_cast<uint64_t>(&SSL_new))
      << "libkloop and this program resolve SSL_new to the same libssl";
  EXPECT_NE(std::string(info.libssl_path).find("libssl"), std::string::npos) << info.libssl_path;
  EXPECT_STREQ(info.version_text, OpenSSL_version(OPENSSL_VERSION));
  info.size = 4;
  EXPECT_EQ(kloop_get_tls_info(&info), -EINVAL);
  EXPECT_EQ(kloop_get_tls_info(nullptr), -EINVAL);
}

}  // namespace
