// The engine's kernel TLS path: TLS streams (kloop_stream_start_tls) whose
// send side the kernel encrypts. Linked statically with libkloop into the
// kTLS test program, so that scripts/ktls-vm.sh runs them in the guest whose
// kernel has tls.ko; on a kernel without it the offload tests skip (a
// failure when KLOOP_REQUIRE_KTLS is set, as in the guest).
#include <linux/tls.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <atomic>
#include <fstream>
#include <map>
#include <string>
#include <thread>

#include "../engine/tls_util.h"

using namespace kt;

namespace {

bool KtlsRequired() {
  const char *v = getenv("KLOOP_REQUIRE_KTLS");
  return v != nullptr && *v != '\0' && strcmp(v, "0") != 0;
}

#define REQUIRE_ENGINE_KTLS(loop)                                                          \
  do {                                                                                     \
    if (!(GetCaps(loop).kernel & KLOOP_CAP_KTLS)) {                                        \
      if (KtlsRequired()) FAIL() << "KLOOP_CAP_KTLS absent and KLOOP_REQUIRE_KTLS is set"; \
      GTEST_SKIP() << "kernel has no TLS ULP (KLOOP_CAP_KTLS not in kloop_get_caps)";      \
    }                                                                                      \
  } while (0)

std::map<std::string, long long> TlsStat() {
  std::map<std::string, long long> stat;
  std::ifstream in("/proc/net/tls_stat");
  std::string name;
  long long value = 0;
  while (in >> name >> value) stat[name] = value;
  return stat;
}

// The kernel's view: 0 and the TLS version when fd's send side is offloaded.
int KeyVersion(int fd, int dir) {
  tls_crypto_info info{};  // the header alone: the kernel wants this size or the cipher's
  socklen_t len = sizeof info;
  if (getsockopt(fd, SOL_TLS, dir, &info, &len) != 0) return -errno;
  return info.version;
}
int TxVersion(int fd) { return KeyVersion(fd, TLS_TX); }
int RxVersion(int fd) { return KeyVersion(fd, TLS_RX); }

std::string History(const Driver &d) {
  std::string out;
  for (const Event &e : d.events()) out += Describe(e) + "\n";
  return out;
}

struct Version {
  const char *name;
  int version;
};

class EngineKtlsBase : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(d.Create(nullptr), 0); }

  CtxPtr ClientFor(int version) {
    CtxPtr ctx = ClientCtx();
    SSL_CTX_set_min_proto_version(ctx.get(), version);
    SSL_CTX_set_max_proto_version(ctx.get(), version);
    if (version == TLS1_2_VERSION)
      SSL_CTX_set_cipher_list(ctx.get(), "ECDHE-ECDSA-AES128-GCM-SHA256");
    return ctx;
  }
  // Engine client `tc` and engine server `tc + 1` on one loopback pair.
  void Pair(uint64_t tc, SSL *client, SSL *server) {
    auto p = TcpPair();
    srv_fd = std::move(p.first);
    cli_fd = std::move(p.second);
    ASSERT_EQ(kloop_stream_attach(d, tc, cli_fd, 0), 0);
    ASSERT_EQ(kloop_stream_attach(d, tc + 1, srv_fd, 0), 0);
    ASSERT_EQ(kloop_stream_start_tls(d, tc, client), 0);
    ASSERT_EQ(kloop_stream_start_tls(d, tc + 1, server), 0);
    ASSERT_EQ(d.WaitEvent(tc, KLOOP_EVENT_HANDSHAKE).result, 0);
    ASSERT_EQ(d.WaitEvent(tc + 1, KLOOP_EVENT_HANDSHAKE).result, 0);
  }
  // Send `total` pattern bytes from token `from`, check them at `to`.
  void Transfer(uint64_t from, uint64_t to, size_t total) {
    uint64_t checked = 0;
    int64_t mismatch = -1;
    d.set_store_data(false);
    d.on_record = [&](const kloop_completion &r) {
      if (r.token != to || r.event != KLOOP_EVENT_DATA) return;
      auto *p = reinterpret_cast<const uint8_t *>(r.data);
      for (int32_t i = 0; i < r.result; ++i)
        if (p[i] != PatternByte(checked + static_cast<uint64_t>(i)) && mismatch < 0)
          mismatch = static_cast<int64_t>(checked) + i;
      checked += static_cast<uint64_t>(r.result);
    };
    std::vector<uint8_t> chunk(256 * 1024);
    for (size_t sent = 0; sent < total; sent += chunk.size()) {
      for (size_t i = 0; i < chunk.size(); ++i) chunk[i] = PatternByte(sent + i);
      ASSERT_GE(kloop_stream_write(d, from, chunk.data(), chunk.size()), 0);
      ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, from) < (1 << 20); }, 30s));
    }
    ASSERT_TRUE(d.RunUntil([&] { return checked >= total; }, 50s)) << checked;
    EXPECT_EQ(checked, total);
    EXPECT_EQ(mismatch, -1);
    d.on_record = nullptr;
    d.set_store_data(true);
  }

  Driver d;
  Fd cli_fd, srv_fd;
  CtxPtr sctx = ServerCtx();
};

class EngineKtls : public EngineKtlsBase, public ::testing::WithParamInterface<Version> {};

TEST_P(EngineKtls, SendSideOffloadedDataIntactCloseNotifyCrosses) {
  REQUIRE_ENGINE_KTLS(d);
  auto before = TlsStat();
  CtxPtr cctx = ClientFor(GetParam().version);
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(1, c.get(), s.get());
  ASSERT_EQ(SSL_version(c.get()), GetParam().version);
  ASSERT_GE(kloop_stream_write(d, 1, "ping", 4), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "ping"; }))
      << History(d) << TlsError(d, 1).message << " / " << TlsError(d, 2).message;
  ASSERT_GE(kloop_stream_write(d, 2, "pong", 4), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1) == "pong"; })) << d.DataOf(1);
  // Both send sides are the kernel's now.
  EXPECT_EQ(TxVersion(cli_fd),
            GetParam().version == TLS1_3_VERSION ? TLS_1_3_VERSION : TLS_1_2_VERSION);
  EXPECT_EQ(TxVersion(srv_fd), TxVersion(cli_fd));
  EXPECT_EQ(BIO_get_ktls_send(SSL_get_wbio(c.get())), 1);
  auto during = TlsStat();
  EXPECT_GE(during["TlsTxSw"] - before["TlsTxSw"], 2) << "two software kTLS send sides";
  EXPECT_GE(during["TlsCurrTxSw"], 2);
  // Receiving: TLS 1.2 both ends (exact reads kept the key's first byte in
  // the socket); OpenSSL 3.0 does not offer the TLS 1.3 receive key.
  if (GetParam().version == TLS1_2_VERSION) {
    EXPECT_EQ(RxVersion(cli_fd), TLS_1_2_VERSION);
    EXPECT_EQ(RxVersion(srv_fd), TLS_1_2_VERSION);
    EXPECT_EQ(BIO_get_ktls_recv(SSL_get_rbio(c.get())), 1);
    EXPECT_GE(during["TlsRxSw"] - before["TlsRxSw"], 2) << "two software kTLS receive sides";
  } else {
    EXPECT_LT(RxVersion(cli_fd), 0);
    EXPECT_EQ(BIO_get_ktls_recv(SSL_get_rbio(c.get())), 0);
  }
  Transfer(1, 2, 8u << 20);
  Transfer(2, 1, 1u << 20);
  // close_notify is an alert: a control record through the kernel.
  ASSERT_EQ(kloop_stream_close(d, 1), 0);
  Event eof = d.WaitEvent(2, KLOOP_EVENT_EOF);
  EXPECT_EQ(eof.aux, 0u) << "the peer's close_notify arrived";
  ASSERT_EQ(kloop_stream_close(d, 2), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
  EXPECT_EQ(d.WaitFinal(2).result, 0);
  EXPECT_EQ(GetStats(d).buffers_in_use, 0u);
}

TEST_P(EngineKtls, StandardOpenSslPeerReadsWhatTheKernelEncrypted) {
  REQUIRE_ENGINE_KTLS(d);
  CtxPtr cctx = ClientFor(GetParam().version);
  SslPtr s = Server(sctx.get());
  auto [mine, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 5, mine, 0), 0);
  ASSERT_EQ(kloop_stream_start_tls(d, 5, s.get()), 0);
  constexpr size_t kTotal = 2u << 20;
  std::string got, error;
  bool clean_close = false;
  std::thread th([&, fd = peer.get()] {
    SslPtr c = Client(cctx.get());
    SSL_set_fd(c.get(), fd);  // OpenSSL's own socket BIO, no kTLS
    if (SSL_connect(c.get()) != 1) {
      error = "connect failed";
      return;
    }
    SSL_write(c.get(), "hello", 5);
    std::vector<char> buf(65536);
    for (;;) {
      int n = SSL_read(c.get(), buf.data(), static_cast<int>(buf.size()));
      if (n <= 0) {
        clean_close = SSL_get_error(c.get(), n) == SSL_ERROR_ZERO_RETURN;
        break;
      }
      got.append(buf.data(), static_cast<size_t>(n));
    }
    SSL_shutdown(c.get());
  });
  ASSERT_EQ(d.WaitEvent(5, KLOOP_EVENT_HANDSHAKE).result, 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(5) == "hello"; }));
  EXPECT_EQ(TxVersion(mine),
            GetParam().version == TLS1_3_VERSION ? TLS_1_3_VERSION : TLS_1_2_VERSION);
  if (GetParam().version == TLS1_2_VERSION) {
    EXPECT_EQ(RxVersion(mine), TLS_1_2_VERSION);
  }
  std::string out(kTotal, '\0');
  for (size_t i = 0; i < kTotal; ++i) out[i] = static_cast<char>(PatternByte(i));
  ASSERT_GE(kloop_stream_write(d, 5, out.data(), out.size()), 0);
  ASSERT_EQ(kloop_stream_close(d, 5), 0);
  EXPECT_EQ(d.WaitFinal(5, 30s).result, 0);
  th.join();
  EXPECT_EQ(error, "");
  EXPECT_TRUE(clean_close) << "close_notify reached the peer";
  EXPECT_EQ(got.size(), kTotal);
  EXPECT_TRUE(got == out) << "plaintext differs";
}

// loop.sendfile() on a kTLS transport: once the stream's queue is empty,
// splice(2) file -> pipe -> socket on the ring; the kernel encrypts what
// arrives from the pipe like any plaintext.
TEST_P(EngineKtls, SpliceIntoOffloadedSocketArrivesDecrypted) {
  REQUIRE_ENGINE_KTLS(d);
  CtxPtr cctx = ClientFor(GetParam().version);
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(1, c.get(), s.get());
  Event hs = d.Of(1, KLOOP_EVENT_HANDSHAKE).at(0);
  ASSERT_TRUE(hs.aux & KLOOP_HANDSHAKE_KTLS_TX) << Describe(hs);
  EXPECT_EQ((hs.aux & KLOOP_HANDSHAKE_KTLS_RX) != 0, GetParam().version == TLS1_2_VERSION);
  ASSERT_GE(kloop_stream_write(d, 1, "head:", 5), 0);
  ASSERT_TRUE(d.RunUntil([&] { return kloop_stream_write_size(d, 1) == 0; }));
  std::string body(300 * 1024, '\0');
  for (size_t i = 0; i < body.size(); ++i) body[i] = static_cast<char>(PatternByte(i));
  Fd file = TempFile(body);
  auto [pr, pw] = Pipe();
  uint64_t off = 0;
  uint64_t tok = 100;
  while (off < body.size()) {
    uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(65536, body.size() - off));
    ASSERT_EQ(kloop_submit_splice(d, tok, file, off, pw, KLOOP_OFFSET_CURRENT, n, 0), 0);
    Event in = d.WaitFinal(tok++);
    ASSERT_GT(in.result, 0) << Describe(in);
    int32_t left = in.result;
    while (left > 0) {
      ASSERT_EQ(kloop_submit_splice(d, tok, pr, KLOOP_OFFSET_CURRENT, cli_fd, KLOOP_OFFSET_CURRENT,
                                    static_cast<uint32_t>(left), 0),
                0);
      Event out = d.WaitFinal(tok++);
      ASSERT_GT(out.result, 0) << Describe(out);
      left -= out.result;
    }
    off += static_cast<uint64_t>(in.result);
  }
  ASSERT_GE(kloop_stream_write(d, 1, ":tail", 5), 0);
  std::string want = "head:" + body + ":tail";
  ASSERT_TRUE(d.RunUntil([&] { return d.DataSizeOf(2) >= want.size(); }, 30s));
  EXPECT_TRUE(d.DataOf(2) == want) << "spliced plaintext differs";
  kloop_stream_abort(d, 1);
  kloop_stream_abort(d, 2);
  d.WaitFinal(1);
  d.WaitFinal(2);
}

INSTANTIATE_TEST_SUITE_P(Versions, EngineKtls,
                         ::testing::Values(Version{"TLS12", TLS1_2_VERSION},
                                           Version{"TLS13", TLS1_3_VERSION}),
                         [](const auto &info) { return std::string(info.param.name); });

class EngineKtls13 : public EngineKtlsBase {};

TEST_F(EngineKtls13, TicketCrossesOffloadedSendAndResumes) {
  REQUIRE_ENGINE_KTLS(d);
  CtxPtr cctx = ClientFor(TLS1_3_VERSION);
  SSL_CTX_set_session_cache_mode(cctx.get(), SSL_SESS_CACHE_CLIENT);
  SslPtr c = Client(cctx.get()), s = Server(sctx.get());
  Pair(1, c.get(), s.get());
  EXPECT_EQ(TxVersion(srv_fd), TLS_1_3_VERSION) << "the server's tickets go through the kernel";
  ASSERT_GE(kloop_stream_write(d, 2, "x", 1), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(1) == "x"; }));
  SSL_SESSION *sess = SSL_get1_session(c.get());
  ASSERT_NE(sess, nullptr);
  EXPECT_EQ(SSL_SESSION_is_resumable(sess), 1) << "a NewSessionTicket arrived";
  kloop_stream_abort(d, 1);
  kloop_stream_abort(d, 2);
  d.WaitFinal(1);
  d.WaitFinal(2);

  SslPtr c2 = Client(cctx.get()), s2 = Server(sctx.get());
  SSL_set_session(c2.get(), sess);
  SSL_SESSION_free(sess);
  Pair(3, c2.get(), s2.get());
  EXPECT_EQ(SSL_session_reused(c2.get()), 1);
  EXPECT_EQ(TxVersion(cli_fd), TLS_1_3_VERSION);
  ASSERT_GE(kloop_stream_write(d, 3, "again", 5), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(4) == "again"; }));
  kloop_stream_abort(d, 3);
  kloop_stream_abort(d, 4);
  d.WaitFinal(3);
  d.WaitFinal(4);
}

TEST_F(EngineKtls13, PeerKeyUpdateRequestFailsTheStreamCleanly) {
  REQUIRE_ENGINE_KTLS(d);
  CtxPtr cctx = ClientFor(TLS1_3_VERSION);
  SslPtr s = Server(sctx.get());
  auto [mine, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 7, mine, 0), 0);
  ASSERT_EQ(kloop_stream_start_tls(d, 7, s.get()), 0);
  std::atomic<bool> done{false};
  std::thread th([&, fd = peer.get()] {
    SslPtr c = Client(cctx.get());
    SSL_set_fd(c.get(), fd);
    if (SSL_connect(c.get()) == 1) {
      SSL_write(c.get(), "a", 1);
      SSL_key_update(c.get(), SSL_KEY_UPDATE_REQUESTED);
      SSL_write(c.get(), "b", 1);
      char buf[16];
      SSL_read(c.get(), buf, sizeof buf);  // ends when the engine gives up
    }
    done = true;
  });
  ASSERT_EQ(d.WaitEvent(7, KLOOP_EVENT_HANDSHAKE).result, 0);
  ASSERT_EQ(TxVersion(mine), TLS_1_3_VERSION);
  Event err = d.WaitEvent(7, KLOOP_EVENT_ERROR);
  EXPECT_EQ(err.result, -EPROTO);
  EXPECT_EQ(err.aux, KLOOP_ERROR_WRITE | KLOOP_ERROR_TLS);
  kloop_tls_error e = TlsError(d, 7);
  EXPECT_NE(std::string(e.message).find("key update"), std::string::npos) << e.message;
  kloop_stream_abort(d, 7);
  d.WaitFinal(7);
  ::shutdown(peer.get(), SHUT_RDWR);  // wakes the peer's blocking read
  th.join();
  EXPECT_TRUE(done);
}

TEST_F(EngineKtlsBase, RecordThatDoesNotDecryptOnOffloadedReceiveIsATlsError) {
  REQUIRE_ENGINE_KTLS(d);
  CtxPtr cctx = ClientFor(TLS1_2_VERSION);
  SslPtr s = Server(sctx.get());
  auto [mine, peer] = TcpPair();
  ASSERT_EQ(kloop_stream_attach(d, 9, mine, 0), 0);
  ASSERT_EQ(kloop_stream_start_tls(d, 9, s.get()), 0);
  std::atomic<bool> connected{false};
  std::thread th([&, fd = peer.get()] {
    SslPtr c = Client(cctx.get());
    SSL_set_fd(c.get(), fd);
    if (SSL_connect(c.get()) == 1) {
      SSL_write(c.get(), "ok", 2);
      connected = true;
    }
  });
  ASSERT_EQ(d.WaitEvent(9, KLOOP_EVENT_HANDSHAKE).result, 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(9) == "ok"; }));
  th.join();
  ASSERT_TRUE(connected);
  ASSERT_EQ(RxVersion(mine), TLS_1_2_VERSION);
  // An application data record whose tag cannot match.
  std::string rec = {23, 3, 3, 0, 40};
  rec += std::string(40, '\x5a');
  ASSERT_TRUE(WriteAll(peer, rec));
  Event err = d.WaitEvent(9, KLOOP_EVENT_ERROR);
  EXPECT_EQ(err.result, -EPROTO);
  EXPECT_EQ(err.aux, KLOOP_ERROR_READ | KLOOP_ERROR_TLS);
  std::string why = TlsError(d, 9).message;
  EXPECT_NE(why.find("kernel TLS receive failed"), std::string::npos) << why;
  kloop_stream_abort(d, 9);
  d.WaitFinal(9);
}

// Runs everywhere: with KLOOP_CAP_KTLS switched off (or absent) the engine
// does the crypto itself and never touches the socket's ULP.
// With KLOOP_CAP_KTLS disabled the kernel gets no key: the engine seals
// the records itself with the key OpenSSL hands over (OpenSSL reports the
// send side as offloaded to its BIO), or, with KLOOP_CONFIG_NO_TLS_SEAL
// too, OpenSSL encrypts every record and is never asked for a key.
TEST(EngineKtlsOff, DisabledCapabilityKeepsTlsInUserSpace) {
  for (bool seal : {true, false}) {
    SCOPED_TRACE(seal ? "engine seals" : "OpenSSL encrypts");
    kloop_config cfg = DefaultConfig();
    cfg.disable = KLOOP_CAP_KTLS;
    if (!seal) cfg.flags |= KLOOP_CONFIG_NO_TLS_SEAL;
    Driver d(&cfg);
    ASSERT_EQ(d.create_rc(), 0);
    EXPECT_EQ(GetCaps(d).enabled & KLOOP_CAP_KTLS, 0u);
    CtxPtr sctx = ServerCtx(), cctx = ClientCtx();
    SslPtr c = Client(cctx.get()), s = Server(sctx.get());
    std::pair<Fd, Fd> fds;
    ASSERT_NO_FATAL_FAILURE(StartTlsPair(d, c.get(), s.get(), &fds));
    EXPECT_EQ((SSL_get_options(c.get()) & SSL_OP_ENABLE_KTLS) != 0, seal);
    Event hs = d.WaitEvent(1, KLOOP_EVENT_HANDSHAKE);
    ASSERT_EQ(hs.result, 0) << Describe(hs);
    EXPECT_EQ(hs.aux, 0u) << "no direction in the kernel";
    ASSERT_GE(kloop_stream_write(d, 1, "plain", 5), 0);
    ASSERT_TRUE(d.RunUntil([&] { return d.DataOf(2) == "plain"; }));
    EXPECT_LT(TxVersion(fds.second), 0) << "no kernel TLS on the socket";
    EXPECT_EQ(BIO_get_ktls_send(SSL_get_wbio(c.get())) != 0, seal);
    kloop_stream_abort(d, 1);
    kloop_stream_abort(d, 2);
    d.WaitFinal(1);
    d.WaitFinal(2);
  }
}

}  // namespace
