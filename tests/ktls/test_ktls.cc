// Kernel TLS (kTLS) with OpenSSL 3.0 on loopback TCP.
//
// These tests prove, on a kernel that has the TLS ULP (tls.ko), what the
// engine's kTLS path relies on:
//   - OpenSSL 3.0 with SSL_OP_ENABLE_KTLS offloads TLS 1.2 send and receive
//     and TLS 1.3 send, seen from OpenSSL (BIO_get_ktls_send/recv), from the
//     kernel (getsockopt SOL_TLS) and in /proc/net/tls_stat;
//   - records that are not application data (alerts, a NewSessionTicket)
//     cross an offloaded socket, and the kernel reports their type in a
//     SOL_TLS/TLS_GET_RECORD_TYPE cmsg;
//   - after offload, plaintext moves as plain io_uring send/recvmsg;
//   - zero-copy send is refused on a kTLS socket;
//   - OpenSSL hands the negotiated keys to any BIO through BIO_ctrl, so an
//     engine-owned BIO can install them itself (EngineStyleBio below).
//
// Where the kernel has no TLS ULP (this build host) the offload tests skip
// with the reason; scripts/ktls-vm.sh runs this program in a guest with
// KLOOP_REQUIRE_KTLS=1, which turns such a skip into a failure.

#include <arpa/inet.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <liburing.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

// ---------------------------------------------------------------- plumbing

std::string errno_text(int err) {
  const char *name = strerrorname_np(err);
  return std::string(name != nullptr ? name : "errno " + std::to_string(err)) + " (" +
         strerror(err) + ")";
}

bool require_ktls() {
  const char *v = getenv("KLOOP_REQUIRE_KTLS");
  return v != nullptr && *v != '\0' && strcmp(v, "0") != 0;
}

std::string openssl_errors() {
  std::string out;
  unsigned long e;
  char buf[256];
  while ((e = ERR_get_error()) != 0) {
    ERR_error_string_n(e, buf, sizeof buf);
    out += out.empty() ? "" : "; ";
    out += buf;
  }
  return out.empty() ? "no OpenSSL error queued" : out;
}

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd &&o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd &operator=(Fd &&o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

struct TcpPair {
  Fd client, server;
};

// A connected loopback TCP pair, blocking. No SO_RCVTIMEO/SO_SNDTIMEO: with
// a timeout set, a blocking call interrupted by io_uring task work (a ring
// being torn down) fails with EINTR instead of being restarted, which breaks
// OpenSSL's blocking I/O at random. A hung test is caught by the watchdog in
// main() instead.
testing::AssertionResult tcp_pair(TcpPair &out) {
  Fd listener(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (listener.get() < 0) return testing::AssertionFailure() << "socket: " << errno_text(errno);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (bind(listener.get(), reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0 ||
      listen(listener.get(), 1) != 0 ||
      getsockname(listener.get(), reinterpret_cast<sockaddr *>(&addr), &len) != 0)
    return testing::AssertionFailure() << "bind/listen: " << errno_text(errno);
  Fd client(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (client.get() < 0 ||
      connect(client.get(), reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0)
    return testing::AssertionFailure() << "connect: " << errno_text(errno);
  Fd server(accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (server.get() < 0) return testing::AssertionFailure() << "accept: " << errno_text(errno);
  out.client = std::move(client);
  out.server = std::move(server);
  return testing::AssertionSuccess();
}

// Whether this kernel can attach the TLS ULP to a TCP socket; asked once.
struct UlpProbe {
  bool available;
  std::string reason;
};

const UlpProbe &ulp() {
  static const UlpProbe probe = [] {
    TcpPair pair;
    if (!tcp_pair(pair)) return UlpProbe{false, "kernel has no TLS ULP (no loopback TCP pair)"};
    if (setsockopt(pair.client.get(), SOL_TCP, TCP_ULP, "tls", sizeof "tls") == 0)
      return UlpProbe{true, ""};
    return UlpProbe{false,
                    "kernel has no TLS ULP (setsockopt TCP_ULP tls: " + errno_text(errno) + ")"};
  }();
  return probe;
}

// Offload tests skip without a TLS ULP, except in the guest, where
// KLOOP_REQUIRE_KTLS is set and a skip would hide that nothing was proven.
#define REQUIRE_KTLS()                                                                 \
  do {                                                                                 \
    if (!ulp().available) {                                                            \
      if (require_ktls()) FAIL() << ulp().reason << ", and KLOOP_REQUIRE_KTLS is set"; \
      GTEST_SKIP() << ulp().reason;                                                    \
    }                                                                                  \
  } while (0)

// /proc/net/tls_stat as name -> value (empty when the tls module is absent).
std::map<std::string, long long> tls_stat() {
  std::map<std::string, long long> stat;
  std::ifstream in("/proc/net/tls_stat");
  std::string name;
  long long value;
  while (in >> name >> value) stat[name] = value;
  return stat;
}

long long stat_delta(const std::map<std::string, long long> &before,
                     const std::map<std::string, long long> &after, const std::string &name) {
  auto b = before.find(name);
  auto a = after.find(name);
  return (a == after.end() ? 0 : a->second) - (b == before.end() ? 0 : b->second);
}

// ---------------------------------------------------------------- TLS setup

struct SslCtxFree {
  void operator()(SSL_CTX *c) const { SSL_CTX_free(c); }
};
struct SslFree {
  void operator()(SSL *s) const { SSL_free(s); }
};
struct SessionFree {
  void operator()(SSL_SESSION *s) const { SSL_SESSION_free(s); }
};
using CtxPtr = std::unique_ptr<SSL_CTX, SslCtxFree>;
using SslPtr = std::unique_ptr<SSL, SslFree>;
using SessionPtr = std::unique_ptr<SSL_SESSION, SessionFree>;

// A P-256 key and a self-signed certificate, made once in memory (an EC key
// because key generation runs under CPU emulation in the guest).
struct Identity {
  EVP_PKEY *key;
  X509 *cert;
};

const Identity &identity() {
  static const Identity id = [] {
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *cert = X509_new();
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cert), 86400);
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
    X509_set_issuer_name(cert, name);
    X509_set_pubkey(cert, key);
    X509_sign(cert, key, EVP_sha256());
    return Identity{key, cert};
  }();
  return id;
}

// One protocol version with one AEAD, and the kernel's name for that AEAD.
struct Suite {
  const char *name;    // for test names
  int version;         // TLS1_2_VERSION or TLS1_3_VERSION
  const char *cipher;  // a TLS 1.2 cipher list or a TLS 1.3 ciphersuite
  int kernel_cipher;   // TLS_CIPHER_* of linux/tls.h
};

const Suite kTls12Aes128{"Tls12Aes128Gcm", TLS1_2_VERSION, "ECDHE-ECDSA-AES128-GCM-SHA256",
                         TLS_CIPHER_AES_GCM_128};
const Suite kTls12Aes256{"Tls12Aes256Gcm", TLS1_2_VERSION, "ECDHE-ECDSA-AES256-GCM-SHA384",
                         TLS_CIPHER_AES_GCM_256};
const Suite kTls13Aes128{"Tls13Aes128Gcm", TLS1_3_VERSION, "TLS_AES_128_GCM_SHA256",
                         TLS_CIPHER_AES_GCM_128};
const Suite kTls13Aes256{"Tls13Aes256Gcm", TLS1_3_VERSION, "TLS_AES_256_GCM_SHA384",
                         TLS_CIPHER_AES_GCM_256};

std::string suite_name(const testing::TestParamInfo<Suite> &info) { return info.param.name; }
void PrintTo(const Suite &suite, std::ostream *os) { *os << suite.name; }

CtxPtr make_ctx(bool server, const Suite &suite) {
  CtxPtr ctx(SSL_CTX_new(server ? TLS_server_method() : TLS_client_method()));
  if (!ctx) return ctx;
  SSL_CTX_set_min_proto_version(ctx.get(), suite.version);
  SSL_CTX_set_max_proto_version(ctx.get(), suite.version);
  SSL_CTX_set_options(ctx.get(), SSL_OP_ENABLE_KTLS);
  bool ok = suite.version == TLS1_2_VERSION ? SSL_CTX_set_cipher_list(ctx.get(), suite.cipher)
                                            : SSL_CTX_set_ciphersuites(ctx.get(), suite.cipher);
  if (server)
    ok = ok && SSL_CTX_use_certificate(ctx.get(), identity().cert) == 1 &&
         SSL_CTX_use_PrivateKey(ctx.get(), identity().key) == 1;
  if (!ok) ctx.reset();
  return ctx;
}

// Both ends of one TLS connection over loopback TCP. The SSL objects use
// OpenSSL's own socket BIOs (SSL_set_fd), unless bios are given.
struct TlsPair {
  TcpPair tcp;
  SslPtr client, server;
};

// Makes the SSL objects of `pair` over its sockets and runs the handshake,
// the server in a thread. `session` resumes a client session when given.
testing::AssertionResult handshake(SSL_CTX *cctx, SSL_CTX *sctx, TlsPair &pair,
                                   SSL_SESSION *session = nullptr, BIO *client_bio = nullptr,
                                   BIO *server_bio = nullptr) {
  if (pair.tcp.client.get() < 0) {
    auto made = tcp_pair(pair.tcp);
    if (!made) return made;
  }
  pair.client.reset(SSL_new(cctx));
  pair.server.reset(SSL_new(sctx));
  if (!pair.client || !pair.server)
    return testing::AssertionFailure() << "SSL_new: " << openssl_errors();
  if (client_bio != nullptr)
    SSL_set_bio(pair.client.get(), client_bio, client_bio);
  else
    SSL_set_fd(pair.client.get(), pair.tcp.client.get());
  if (server_bio != nullptr)
    SSL_set_bio(pair.server.get(), server_bio, server_bio);
  else
    SSL_set_fd(pair.server.get(), pair.tcp.server.get());
  SSL_set_tlsext_host_name(pair.client.get(), "localhost");
  if (session != nullptr) SSL_set_session(pair.client.get(), session);
  int server_rc = 0;
  std::string server_err;
  std::thread server([&] {
    server_rc = SSL_accept(pair.server.get());
    if (server_rc != 1)
      server_err = "error " + std::to_string(SSL_get_error(pair.server.get(), server_rc)) +
                   ", errno " + errno_text(errno) + ", " + openssl_errors();
  });
  int client_rc = SSL_connect(pair.client.get());
  std::string client_err =
      client_rc == 1 ? ""
                     : "error " + std::to_string(SSL_get_error(pair.client.get(), client_rc)) +
                           ", errno " + errno_text(errno) + ", " + openssl_errors();
  if (client_rc != 1) shutdown(pair.tcp.client.get(), SHUT_RDWR);  // unblock the server
  server.join();
  if (client_rc != 1 || server_rc != 1)
    return testing::AssertionFailure()
           << "handshake failed: client " << client_rc << " (" << client_err << "), server "
           << server_rc << " (" << server_err << ")";
  return testing::AssertionSuccess();
}

testing::AssertionResult ssl_write_all(SSL *ssl, const void *data, size_t len) {
  size_t written = 0;
  if (len == 0) return testing::AssertionSuccess();
  int rc = SSL_write_ex(ssl, data, len, &written);
  if (rc != 1 || written != len)
    return testing::AssertionFailure()
           << "SSL_write_ex: rc " << rc << ", error " << SSL_get_error(ssl, rc) << ", "
           << openssl_errors() << ", errno " << errno_text(errno);
  return testing::AssertionSuccess();
}

testing::AssertionResult ssl_read_exact(SSL *ssl, void *data, size_t len) {
  auto *p = static_cast<unsigned char *>(data);
  size_t got = 0;
  while (got < len) {
    size_t n = 0;
    int rc = SSL_read_ex(ssl, p + got, len - got, &n);
    if (rc != 1)
      return testing::AssertionFailure() << "SSL_read_ex after " << got << " of " << len
                                         << " bytes: error " << SSL_get_error(ssl, rc) << ", "
                                         << openssl_errors() << ", errno " << errno_text(errno);
    got += n;
  }
  return testing::AssertionSuccess();
}

std::string read_string(SSL *ssl, size_t len) {
  std::string s(len, '\0');
  if (!ssl_read_exact(ssl, s.data(), len)) return "<read failed: " + openssl_errors() + ">";
  return s;
}

// Deterministic bytes (xorshift64) and their SHA-256.
std::vector<unsigned char> pattern(size_t len, uint64_t seed) {
  std::vector<unsigned char> out(len);
  uint64_t x = seed | 1;
  for (size_t i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[i] = static_cast<unsigned char>(x >> 24);
  }
  return out;
}

std::string sha256(const void *data, size_t len) {
  unsigned char md[32];
  unsigned int mdlen = 0;
  EVP_Digest(data, len, md, &mdlen, EVP_sha256(), nullptr);
  std::string hex;
  char buf[3];
  for (unsigned i = 0; i < mdlen; i++) {
    snprintf(buf, sizeof buf, "%02x", md[i]);
    hex += buf;
  }
  return hex;
}

// Receives `len` bytes through `ssl` in 64 KiB reads, hashing them.
std::string ssl_read_sha256(SSL *ssl, size_t len) {
  std::vector<unsigned char> all(len);
  if (!ssl_read_exact(ssl, all.data(), len)) return "<read failed>";
  return sha256(all.data(), len);
}

bool ktls_send(SSL *ssl) { return BIO_get_ktls_send(SSL_get_wbio(ssl)); }
bool ktls_recv(SSL *ssl) { return BIO_get_ktls_recv(SSL_get_rbio(ssl)); }

// The version and cipher the kernel holds for one direction (TLS_TX or
// TLS_RX), or the errno of getsockopt.
struct KernelCrypto {
  int err;
  int version;
  int cipher;
};

KernelCrypto kernel_crypto(int fd, int direction) {
  tls_crypto_info info{};
  socklen_t len = sizeof info;  // just the header: version and cipher
  if (getsockopt(fd, SOL_TLS, direction, &info, &len) != 0) return {errno, 0, 0};
  return {0, info.version, info.cipher_type};
}

// The record type carried by a SOL_TLS/TLS_GET_RECORD_TYPE cmsg, or -1.
int record_type(msghdr &msg) {
  for (cmsghdr *c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c))
    if (c->cmsg_level == SOL_TLS && c->cmsg_type == TLS_GET_RECORD_TYPE)
      return *reinterpret_cast<unsigned char *>(CMSG_DATA(c));
  return -1;
}

// A one-request io_uring: each call submits one SQE and waits for its CQE.
class Ring {
 public:
  Ring() { rc_ = io_uring_queue_init(8, &ring_, 0); }
  ~Ring() {
    if (rc_ == 0) io_uring_queue_exit(&ring_);
  }
  int init_error() const { return rc_; }
  io_uring_sqe *sqe() { return io_uring_get_sqe(&ring_); }
  // Submits what was prepared and returns the next CQE's res and flags.
  std::pair<int, unsigned> submit_and_wait() {
    io_uring_submit(&ring_);
    return wait();
  }
  std::pair<int, unsigned> wait() {
    io_uring_cqe *cqe = nullptr;
    __kernel_timespec ts{30, 0};
    int rc = io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);
    if (rc != 0) return {rc, 0xffffffffu};
    std::pair<int, unsigned> out{cqe->res, cqe->flags};
    io_uring_cqe_seen(&ring_, cqe);
    return out;
  }

 private:
  io_uring ring_{};
  int rc_;
};

// ---------------------------------------------------------------- tests

// Runs everywhere: OpenSSL offloads exactly when the kernel has the TLS
// ULP, and the connection works either way (userspace crypto otherwise).
TEST(Probe, OpenSslOffloadsExactlyWhenTheKernelHasTheTlsUlp) {
  auto cctx = make_ctx(false, kTls12Aes128), sctx = make_ctx(true, kTls12Aes128);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  EXPECT_EQ(ktls_send(pair.client.get()), ulp().available) << ulp().reason;
  EXPECT_EQ(ktls_recv(pair.client.get()), ulp().available) << ulp().reason;
  EXPECT_EQ(ktls_send(pair.server.get()), ulp().available) << ulp().reason;
  ASSERT_TRUE(ssl_write_all(pair.client.get(), "ping", 4));
  EXPECT_EQ(read_string(pair.server.get(), 4), "ping");
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "pong", 4));
  EXPECT_EQ(read_string(pair.client.get(), 4), "pong");
}

class Offload : public testing::TestWithParam<Suite> {};

// TLS 1.2 offloads both directions, TLS 1.3 the send side only (OpenSSL
// 3.0), on both ends; the kernel holds the keys and counts the sockets.
TEST_P(Offload, DirectionsSeenByOpenSslKernelAndTlsStat) {
  REQUIRE_KTLS();
  const Suite &suite = GetParam();
  const bool rx = suite.version == TLS1_2_VERSION;
  auto cctx = make_ctx(false, suite), sctx = make_ctx(true, suite);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  auto before = tls_stat();
  {
    TlsPair pair;
    ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
    EXPECT_STREQ(SSL_get_version(pair.client.get()),
                 suite.version == TLS1_2_VERSION ? "TLSv1.2" : "TLSv1.3");
    for (SSL *ssl : {pair.client.get(), pair.server.get()}) {
      EXPECT_TRUE(ktls_send(ssl)) << (ssl == pair.client.get() ? "client" : "server");
      EXPECT_EQ(ktls_recv(ssl), rx) << (ssl == pair.client.get() ? "client" : "server");
    }
    const int kernel_version = suite.version == TLS1_2_VERSION ? TLS_1_2_VERSION : TLS_1_3_VERSION;
    for (int fd : {pair.tcp.client.get(), pair.tcp.server.get()}) {
      KernelCrypto tx = kernel_crypto(fd, TLS_TX);
      EXPECT_EQ(tx.err, 0) << errno_text(tx.err);
      EXPECT_EQ(tx.version, kernel_version);
      EXPECT_EQ(tx.cipher, suite.kernel_cipher);
      KernelCrypto rxc = kernel_crypto(fd, TLS_RX);
      if (rx) {
        EXPECT_EQ(rxc.err, 0) << errno_text(rxc.err);
        EXPECT_EQ(rxc.version, kernel_version);
        EXPECT_EQ(rxc.cipher, suite.kernel_cipher);
      } else {
        // No receive keys installed: the kernel answers with an error.
        EXPECT_NE(rxc.err, 0) << "the kernel has TLS_RX keys on a TLS 1.3 socket";
      }
    }
    auto open = tls_stat();
    EXPECT_EQ(stat_delta(before, open, "TlsCurrTxSw"), 2);
    EXPECT_EQ(stat_delta(before, open, "TlsCurrRxSw"), rx ? 2 : 0);
    EXPECT_EQ(stat_delta(before, open, "TlsTxSw"), 2);
    EXPECT_EQ(stat_delta(before, open, "TlsRxSw"), rx ? 2 : 0);
    EXPECT_EQ(stat_delta(before, open, "TlsDecryptError"), 0);

    ASSERT_TRUE(ssl_write_all(pair.client.get(), "client hello, kernel", 20));
    EXPECT_EQ(read_string(pair.server.get(), 20), "client hello, kernel");
    ASSERT_TRUE(ssl_write_all(pair.server.get(), "server hello, kernel", 20));
    EXPECT_EQ(read_string(pair.client.get(), 20), "server hello, kernel");
  }
  auto closed = tls_stat();
  EXPECT_EQ(stat_delta(before, closed, "TlsCurrTxSw"), 0) << "sockets closed";
  EXPECT_EQ(stat_delta(before, closed, "TlsCurrRxSw"), 0) << "sockets closed";
}

// A few MiB each way through the offloaded directions, checksummed.
TEST_P(Offload, LargeTransferBothWaysIsIntact) {
  REQUIRE_KTLS();
  const Suite &suite = GetParam();
  constexpr size_t kSize = 4 << 20;
  // A counter of the whole kernel: other tests provoke decrypt errors on purpose.
  const long long decrypt_errors = tls_stat()["TlsDecryptError"];
  auto cctx = make_ctx(false, suite), sctx = make_ctx(true, suite);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_send(pair.client.get()) && ktls_send(pair.server.get()));
  auto up = pattern(kSize, 1), down = pattern(kSize, 2);
  std::string got_up, got_down;
  std::thread server([&] {
    got_up = ssl_read_sha256(pair.server.get(), kSize);
    EXPECT_TRUE(ssl_write_all(pair.server.get(), down.data(), down.size()));
  });
  EXPECT_TRUE(ssl_write_all(pair.client.get(), up.data(), up.size()));
  got_down = ssl_read_sha256(pair.client.get(), kSize);
  server.join();
  EXPECT_EQ(got_up, sha256(up.data(), up.size()));
  EXPECT_EQ(got_down, sha256(down.data(), down.size()));
  EXPECT_EQ(tls_stat()["TlsDecryptError"], decrypt_errors);
}

// close_notify sent by SSL_shutdown over an offloaded send side reaches the
// peer (through its offloaded receive side for TLS 1.2), and the answer
// comes back the same way.
TEST_P(Offload, CloseNotifyCrossesOffloadedSockets) {
  REQUIRE_KTLS();
  const Suite &suite = GetParam();
  auto cctx = make_ctx(false, suite), sctx = make_ctx(true, suite);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_send(pair.server.get()));
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "last words", 10));
  EXPECT_EQ(SSL_shutdown(pair.server.get()), 0) << "close_notify sent, none received yet";
  EXPECT_EQ(read_string(pair.client.get(), 10), "last words");
  char byte;
  int rc = SSL_read(pair.client.get(), &byte, 1);
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(SSL_get_error(pair.client.get(), rc), SSL_ERROR_ZERO_RETURN) << openssl_errors();
  EXPECT_TRUE(SSL_get_shutdown(pair.client.get()) & SSL_RECEIVED_SHUTDOWN);
  EXPECT_EQ(SSL_shutdown(pair.client.get()), 1) << "client answers close_notify";
  EXPECT_EQ(SSL_shutdown(pair.server.get()), 1)
      << "server receives the answer: " << openssl_errors();
}

// After offload the socket carries plaintext: a plain io_uring send on it
// arrives decrypted at the peer's SSL_read.
TEST_P(Offload, IoUringSendOfPlaintextArrivesDecrypted) {
  REQUIRE_KTLS();
  const Suite &suite = GetParam();
  auto cctx = make_ctx(false, suite), sctx = make_ctx(true, suite);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_send(pair.client.get()));
  Ring ring;
  ASSERT_EQ(ring.init_error(), 0) << errno_text(-ring.init_error());
  static const char msg[] = "plaintext through io_uring";
  io_uring_prep_send(ring.sqe(), pair.tcp.client.get(), msg, sizeof msg - 1, 0);
  auto [res, flags] = ring.submit_and_wait();
  ASSERT_EQ(res, static_cast<int>(sizeof msg - 1)) << errno_text(-res);
  EXPECT_EQ(read_string(pair.server.get(), sizeof msg - 1), msg);
  // And OpenSSL's own writes still interleave correctly with the ring's.
  ASSERT_TRUE(ssl_write_all(pair.client.get(), "after", 5));
  EXPECT_EQ(read_string(pair.server.get(), 5), "after");
}

// Zero-copy send on a kTLS socket: what the kernel answers, and that the
// refusal leaves the stream intact. io_uring's send_zc and MSG_ZEROCOPY.
TEST_P(Offload, ZeroCopySendIsRefusedAndTheStreamStaysIntact) {
  REQUIRE_KTLS();
  const Suite &suite = GetParam();
  auto cctx = make_ctx(false, suite), sctx = make_ctx(true, suite);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_send(pair.client.get()));
  const int fd = pair.tcp.client.get();
  Ring ring;
  ASSERT_EQ(ring.init_error(), 0) << errno_text(-ring.init_error());
  static const char zc[] = "zero-copy";
  io_uring_prep_send_zc(ring.sqe(), fd, zc, sizeof zc - 1, 0, 0);
  auto [res, flags] = ring.submit_and_wait();
  EXPECT_EQ(res, -EOPNOTSUPP) << "io_uring send_zc answered " << res << " "
                              << (res < 0 ? errno_text(-res) : "bytes");
  if (flags & IORING_CQE_F_MORE) {
    auto [nres, nflags] = ring.wait();  // the buffer release notification
    EXPECT_TRUE(nflags & IORING_CQE_F_NOTIF) << "flags " << nflags << " res " << nres;
  }
  int one = 1;
  int so_rc = setsockopt(fd, SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one);
  int so_err = so_rc == 0 ? 0 : errno;
  ssize_t n = send(fd, zc, sizeof zc - 1, MSG_ZEROCOPY | MSG_DONTWAIT);
  int send_err = n < 0 ? errno : 0;
  EXPECT_EQ(n, -1) << "send(MSG_ZEROCOPY) sent " << n
                   << " bytes (SO_ZEROCOPY: " << (so_rc == 0 ? "set" : errno_text(so_err)) << ")";
  EXPECT_EQ(send_err, EOPNOTSUPP) << errno_text(send_err)
                                  << " (SO_ZEROCOPY: " << (so_rc == 0 ? "set" : errno_text(so_err))
                                  << ")";
  printf(
      "kernel answers on a kTLS socket: io_uring send_zc -> %d (%s); "
      "setsockopt SO_ZEROCOPY -> %s; send(MSG_ZEROCOPY) -> %s\n",
      res, res < 0 ? errno_text(-res).c_str() : "bytes",
      so_rc == 0 ? "0" : errno_text(so_err).c_str(),
      n < 0 ? errno_text(send_err).c_str() : std::to_string(n).c_str());
  // Nothing of the refused sends reached the peer: the next record is this.
  static const char copy[] = "copied send";
  io_uring_prep_send(ring.sqe(), fd, copy, sizeof copy - 1, 0);
  auto [cres, cflags] = ring.submit_and_wait();
  ASSERT_EQ(cres, static_cast<int>(sizeof copy - 1)) << errno_text(-cres);
  EXPECT_EQ(read_string(pair.server.get(), sizeof copy - 1), copy);
}

INSTANTIATE_TEST_SUITE_P(Ktls, Offload,
                         testing::Values(kTls12Aes128, kTls12Aes256, kTls13Aes128, kTls13Aes256),
                         suite_name);

// TLS 1.3: the server's TX is offloaded when it sends a NewSessionTicket
// (a handshake record, type 22); the client receives it, and the ticket
// resumes a second connection, which is offloaded again.
TEST(Tls13, NewSessionTicketCrossesOffloadedSend) {
  REQUIRE_KTLS();
  auto cctx = make_ctx(false, kTls13Aes128), sctx = make_ctx(true, kTls13Aes128);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  SSL_CTX_set_num_tickets(sctx.get(), 0);  // tickets only when asked below
  SSL_CTX_set_session_cache_mode(cctx.get(), SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL);
  static SSL_SESSION *received;
  received = nullptr;
  SSL_CTX_sess_set_new_cb(cctx.get(), [](SSL *, SSL_SESSION *s) {
    if (received != nullptr) SSL_SESSION_free(received);
    received = s;
    return 1;  // keep the reference
  });
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_send(pair.server.get()));
  ASSERT_FALSE(ktls_recv(pair.client.get()));
  EXPECT_EQ(received, nullptr) << "no ticket before the server sends one";
  ASSERT_EQ(SSL_new_session_ticket(pair.server.get()), 1) << openssl_errors();
  ASSERT_EQ(SSL_do_handshake(pair.server.get()), 1) << openssl_errors();  // sends it
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "after the ticket", 16));
  EXPECT_EQ(read_string(pair.client.get(), 16), "after the ticket");
  ASSERT_NE(received, nullptr) << "the client got no NewSessionTicket";
  SessionPtr session(received);
  received = nullptr;
  EXPECT_TRUE(SSL_SESSION_is_resumable(session.get()));

  TlsPair again;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), again, session.get()));
  EXPECT_TRUE(SSL_session_reused(again.client.get())) << "the ticket did not resume";
  EXPECT_TRUE(ktls_send(again.client.get()) && ktls_send(again.server.get()));
  ASSERT_TRUE(ssl_write_all(again.client.get(), "resumed", 7));
  EXPECT_EQ(read_string(again.server.get(), 7), "resumed");
  if (received != nullptr) SSL_SESSION_free(received);
  received = nullptr;
}

// TLS 1.2 with RX offloaded: the kernel delivers records one type at a
// time. Application data reads as usual; a non-data record (here the
// peer's close_notify alert, type 21) needs a cmsg buffer: plain recv gets
// EIO and leaves the record queued, recvmsg with a cmsg buffer returns its
// plaintext (level, description) with SOL_TLS/TLS_GET_RECORD_TYPE.
TEST(Tls12, AlertRecordIsSeenThroughRecvmsgCmsg) {
  REQUIRE_KTLS();
  auto cctx = make_ctx(false, kTls12Aes128), sctx = make_ctx(true, kTls12Aes128);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_recv(pair.client.get()) && ktls_send(pair.server.get()));
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "data", 4));
  ASSERT_EQ(SSL_shutdown(pair.server.get()), 0);
  const int fd = pair.tcp.client.get();

  unsigned char buf[256];
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(unsigned char))];
  iovec iov{buf, sizeof buf};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = recvmsg(fd, &msg, 0);
  ASSERT_EQ(n, 4) << "first recvmsg: " << (n < 0 ? errno_text(errno) : std::to_string(n));
  EXPECT_EQ(std::string(reinterpret_cast<char *>(buf), 4), "data");
  EXPECT_EQ(record_type(msg), 23) << "application data";

  n = recv(fd, buf, sizeof buf, 0);
  int err = n < 0 ? errno : 0;
  EXPECT_EQ(n, -1) << "plain recv of the alert record returned " << n;
  EXPECT_EQ(err, EIO) << errno_text(err);

  msg.msg_controllen = sizeof control;
  msg.msg_flags = 0;
  n = recvmsg(fd, &msg, 0);
  ASSERT_EQ(n, 2) << "recvmsg of the alert: " << (n < 0 ? errno_text(errno) : std::to_string(n));
  EXPECT_EQ(record_type(msg), 21) << "alert";
  EXPECT_EQ(buf[0], 1) << "level warning";
  EXPECT_EQ(buf[1], 0) << "close_notify";
  EXPECT_EQ(recv(fd, buf, sizeof buf, MSG_DONTWAIT), -1) << "nothing after the alert";
}

// The engine's receive primitive: an io_uring recvmsg with a cmsg buffer on
// an RX-offloaded socket returns the peer's plaintext with record type 23;
// then a non-data record: io_uring recv without cmsg space fails with EIO,
// io_uring recvmsg with it returns the alert and type 21.
TEST(Tls12, IoUringRecvmsgReturnsPlaintextAndRecordType) {
  REQUIRE_KTLS();
  auto cctx = make_ctx(false, kTls12Aes128), sctx = make_ctx(true, kTls12Aes128);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_TRUE(ktls_recv(pair.client.get()));
  Ring ring;
  ASSERT_EQ(ring.init_error(), 0) << errno_text(-ring.init_error());
  const int fd = pair.tcp.client.get();
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "decrypted by the kernel", 23));

  unsigned char buf[64 * 1024];
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(unsigned char))];
  iovec iov{buf, sizeof buf};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  io_uring_prep_recvmsg(ring.sqe(), fd, &msg, 0);
  auto [res, flags] = ring.submit_and_wait();
  ASSERT_EQ(res, 23) << (res < 0 ? errno_text(-res) : std::to_string(res));
  EXPECT_EQ(std::string(reinterpret_cast<char *>(buf), 23), "decrypted by the kernel");
  EXPECT_EQ(record_type(msg), 23);

  // A large message spans several records; each recvmsg stays within data.
  auto big = pattern(200000, 7);
  std::thread writer(
      [&] { EXPECT_TRUE(ssl_write_all(pair.server.get(), big.data(), big.size())); });
  std::vector<unsigned char> got;
  while (got.size() < big.size()) {
    msg.msg_controllen = sizeof control;
    msg.msg_flags = 0;
    io_uring_prep_recvmsg(ring.sqe(), fd, &msg, 0);
    auto [r, f] = ring.submit_and_wait();
    ASSERT_GT(r, 0) << (r < 0 ? errno_text(-r) : "EOF");
    EXPECT_EQ(record_type(msg), 23);
    got.insert(got.end(), buf, buf + r);
  }
  writer.join();
  EXPECT_EQ(sha256(got.data(), got.size()), sha256(big.data(), big.size()));

  ASSERT_EQ(SSL_shutdown(pair.server.get()), 0);
  io_uring_prep_recv(ring.sqe(), fd, buf, sizeof buf, 0);
  auto [rres, rflags] = ring.submit_and_wait();
  EXPECT_EQ(rres, -EIO) << "io_uring recv of an alert without cmsg space: "
                        << (rres < 0 ? errno_text(-rres) : std::to_string(rres));
  msg.msg_controllen = sizeof control;
  msg.msg_flags = 0;
  io_uring_prep_recvmsg(ring.sqe(), fd, &msg, 0);
  auto [ares, aflags] = ring.submit_and_wait();
  ASSERT_EQ(ares, 2) << (ares < 0 ? errno_text(-ares) : std::to_string(ares));
  EXPECT_EQ(record_type(msg), 21);
  EXPECT_EQ(buf[0], 1);
  EXPECT_EQ(buf[1], 0);
}

// A limitation the engine must design around: OpenSSL 3.0 does not move a
// TLS 1.3 KeyUpdate into the kernel (tls13_update_key only changes its own
// keys, and the 6.1 kernel cannot rekey TLS_TX). When a peer without kTLS
// sends KeyUpdate(update_requested) to a side whose send is offloaded, that
// side reads it fine (receive is in userspace) and answers with its own
// KeyUpdate, but the kernel keeps encrypting with the old key: the peer's
// next read fails with bad_record_mac. This test fails, and says so, the day
// an OpenSSL update handles it.
TEST(Tls13, PeerKeyUpdateBreaksAnOffloadedSendSide) {
  REQUIRE_KTLS();
  auto cctx = make_ctx(false, kTls13Aes128), sctx = make_ctx(true, kTls13Aes128);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  SSL_CTX_clear_options(cctx.get(), SSL_OP_ENABLE_KTLS);  // a userspace peer
  TlsPair pair;
  ASSERT_TRUE(handshake(cctx.get(), sctx.get(), pair));
  ASSERT_FALSE(ktls_send(pair.client.get()));
  ASSERT_TRUE(ktls_send(pair.server.get()));
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "before", 6));
  EXPECT_EQ(read_string(pair.client.get(), 6), "before");

  ASSERT_EQ(SSL_key_update(pair.client.get(), SSL_KEY_UPDATE_REQUESTED), 1) << openssl_errors();
  ASSERT_TRUE(ssl_write_all(pair.client.get(), "updated", 7));  // KeyUpdate goes first
  EXPECT_EQ(read_string(pair.server.get(), 7), "updated") << "the offloaded side reads it";
  // The server answers: its KeyUpdate and data go through the kernel.
  ASSERT_TRUE(ssl_write_all(pair.server.get(), "answer", 6));
  char buf[6];
  size_t n = 0;
  int rc = SSL_read_ex(pair.client.get(), buf, sizeof buf, &n);
  unsigned long err = ERR_peek_error();
  std::string errors = openssl_errors();
  EXPECT_EQ(rc, 0) << "the peer read the answer: OpenSSL now rekeys kTLS send";
  EXPECT_EQ(ERR_GET_REASON(err), SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC) << errors;
}

// ------------------------------------------------ an engine-style kTLS BIO
//
// OpenSSL 3.0 offers the keys to whatever BIO the SSL uses: on each key
// change it may call BIO_ctrl(bio, 72 /* BIO_CTRL_SET_KTLS */, is_tx,
// &crypto_info) and offloads that direction if the BIO answers 1. Then:
//   - ctrl 73/76 (BIO_CTRL_GET_KTLS_SEND/RECV) must report the offload;
//     OpenSSL's record layer asks them on every record;
//   - TX: OpenSSL writes bare plaintext; before a non-application record it
//     calls ctrl 74 (BIO_CTRL_SET_KTLS_TX_SEND_CTRL_MSG) with the record
//     type, and the BIO must send that write as one record of that type
//     (sendmsg with a SOL_TLS/TLS_SET_RECORD_TYPE cmsg); ctrl 75 clears it;
//   - RX: each BIO_read must return one whole record as a 5-byte record
//     header (type from TLS_GET_RECORD_TYPE, 3.3, length) and the
//     plaintext; errno EBADMSG/EMSGSIZE/EINVAL become alerts.
// crypto_info is OpenSSL's struct tls_crypto_info_all: a union of the
// kernel's tls12_crypto_info_* followed by a size_t with the length to pass
// to setsockopt(SOL_TLS, TLS_TX or TLS_RX).

constexpr int kCtrlSetKtls = 72;
constexpr int kCtrlSetKtlsTxSendCtrlMsg = 74;
constexpr int kCtrlClearKtlsTxCtrlMsg = 75;

size_t crypto_info_size(int cipher_type) {
  switch (cipher_type) {
    case TLS_CIPHER_AES_GCM_128:
      return sizeof(tls12_crypto_info_aes_gcm_128);
    case TLS_CIPHER_AES_GCM_256:
      return sizeof(tls12_crypto_info_aes_gcm_256);
    case TLS_CIPHER_AES_CCM_128:
      return sizeof(tls12_crypto_info_aes_ccm_128);
    case TLS_CIPHER_CHACHA20_POLY1305:
      return sizeof(tls12_crypto_info_chacha20_poly1305);
    default:
      return 0;
  }
}

struct SetKtlsCall {
  long is_tx;
  int version, cipher;
  size_t len_field;  // the size_t after OpenSSL's union
  int result;        // what the BIO answered
  int err;           // errno when it answered 0
};

struct EngineBio {
  int fd = -1;
  bool ulp = false, tx = false, rx = false;
  int pending_type = 0;
  std::vector<SetKtlsCall> calls;
  std::map<int, int> sent_types;      // non-data records sent via cmsg
  std::map<int, int> received_types;  // records read through kernel RX
};

EngineBio *engine_bio(BIO *b) { return static_cast<EngineBio *>(BIO_get_data(b)); }

int engine_bio_write(BIO *b, const char *in, int len) {
  EngineBio *st = engine_bio(b);
  BIO_clear_retry_flags(b);
  ssize_t n;
  if (st->pending_type != 0) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(unsigned char))] = {};
    iovec iov{const_cast<char *>(in), static_cast<size_t>(len)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_TLS;
    c->cmsg_type = TLS_SET_RECORD_TYPE;
    c->cmsg_len = CMSG_LEN(sizeof(unsigned char));
    *reinterpret_cast<unsigned char *>(CMSG_DATA(c)) = static_cast<unsigned char>(st->pending_type);
    n = sendmsg(st->fd, &msg, MSG_NOSIGNAL);
    if (n >= 0) {  // one whole record or nothing
      st->sent_types[st->pending_type]++;
      st->pending_type = 0;
      n = len;
    }
  } else {
    n = send(st->fd, in, static_cast<size_t>(len), MSG_NOSIGNAL);
  }
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) BIO_set_retry_write(b);
  return static_cast<int>(n);
}

int engine_bio_read(BIO *b, char *out, int len) {
  EngineBio *st = engine_bio(b);
  BIO_clear_retry_flags(b);
  ssize_t n;
  if (!st->rx) {
    n = recv(st->fd, out, static_cast<size_t>(len), 0);
  } else {
    constexpr int kHeader = 5;
    if (len <= kHeader) {
      errno = EINVAL;
      return -1;
    }
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(unsigned char))];
    iovec iov{out + kHeader, static_cast<size_t>(len - kHeader)};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    n = recvmsg(st->fd, &msg, 0);
    if (n > 0) {
      int type = record_type(msg);
      if (type < 0) {
        errno = EIO;
        return -1;
      }
      st->received_types[type]++;
      out[0] = static_cast<char>(type);
      out[1] = 3;
      out[2] = 3;
      out[3] = static_cast<char>(n >> 8);
      out[4] = static_cast<char>(n & 0xff);
      n += kHeader;
    }
  }
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) BIO_set_retry_read(b);
  return static_cast<int>(n);
}

long engine_bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
  EngineBio *st = engine_bio(b);
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;
    case kCtrlSetKtls: {
      const auto *info = static_cast<const tls_crypto_info *>(ptr);
      size_t len = crypto_info_size(info->cipher_type);
      SetKtlsCall call{num, info->version, info->cipher_type, 0, 0, 0};
      // The size_t follows the union, whose largest members are 56 bytes.
      memcpy(&call.len_field, static_cast<const char *>(ptr) + 56, sizeof call.len_field);
      if (!st->ulp && setsockopt(st->fd, SOL_TCP, TCP_ULP, "tls", sizeof "tls") == 0)
        st->ulp = true;
      if (st->ulp && len != 0 &&
          setsockopt(st->fd, SOL_TLS, num ? TLS_TX : TLS_RX, ptr, static_cast<socklen_t>(len)) ==
              0) {
        (num ? st->tx : st->rx) = true;
        call.result = 1;
      } else {
        call.err = errno;
      }
      st->calls.push_back(call);
      return call.result;
    }
    case BIO_CTRL_GET_KTLS_SEND:
      return st->tx;
    case BIO_CTRL_GET_KTLS_RECV:
      return st->rx;
    case kCtrlSetKtlsTxSendCtrlMsg:
      st->pending_type = static_cast<int>(num);
      return 0;
    case kCtrlClearKtlsTxCtrlMsg:
      st->pending_type = 0;
      return 0;
    default:
      return 0;
  }
}

BIO_METHOD *engine_bio_method() {
  static BIO_METHOD *method = [] {
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "kloop-test-ktls");
    BIO_meth_set_write(m, engine_bio_write);
    BIO_meth_set_read(m, engine_bio_read);
    BIO_meth_set_ctrl(m, engine_bio_ctrl);
    BIO_meth_set_create(m, [](BIO *b) {
      BIO_set_init(b, 1);
      return 1;
    });
    return m;
  }();
  return method;
}

BIO *new_engine_bio(EngineBio *state) {
  BIO *b = BIO_new(engine_bio_method());
  BIO_set_data(b, state);
  return b;
}

class EngineStyleBio : public testing::TestWithParam<Suite> {};

// Runs everywhere. With a TLS ULP the BIO installs the keys itself and the
// connection runs on kernel crypto (non-data records included); without
// one it answers 0 and OpenSSL carries on in userspace, as the engine must.
TEST_P(EngineStyleBio, OpenSslHandsTheKeysToACustomBio) {
  const Suite &suite = GetParam();
  const bool tls12 = suite.version == TLS1_2_VERSION;
  const bool offload = ulp().available;
  auto cctx = make_ctx(false, suite), sctx = make_ctx(true, suite);
  ASSERT_TRUE(cctx && sctx) << openssl_errors();
  SSL_CTX_set_num_tickets(sctx.get(), 0);
  // The BIO states outlive the SSL objects (declared first, freed last).
  EngineBio cst, sst;
  TlsPair pair;
  ASSERT_TRUE(tcp_pair(pair.tcp));
  cst.fd = pair.tcp.client.get();
  sst.fd = pair.tcp.server.get();
  ASSERT_TRUE(
      handshake(cctx.get(), sctx.get(), pair, nullptr, new_engine_bio(&cst), new_engine_bio(&sst)));

  const int kernel_version = tls12 ? TLS_1_2_VERSION : TLS_1_3_VERSION;
  for (EngineBio *st : {&cst, &sst}) {
    const char *who = st == &cst ? "client" : "server";
    int tx_calls = 0, rx_calls = 0;
    for (const SetKtlsCall &c : st->calls) {
      (c.is_tx ? tx_calls : rx_calls)++;
      EXPECT_EQ(c.version, kernel_version) << who;
      EXPECT_EQ(c.cipher, suite.kernel_cipher) << who;
      EXPECT_EQ(c.len_field, crypto_info_size(suite.kernel_cipher)) << who;
      EXPECT_EQ(c.result, offload ? 1 : 0) << who << ": " << errno_text(c.err);
    }
    EXPECT_EQ(tx_calls, 1) << who << ": OpenSSL offers the send keys once";
    EXPECT_EQ(rx_calls, tls12 ? 1 : 0) << who << ": receive keys (TLS 1.2 only in OpenSSL 3.0)";
    EXPECT_EQ(st->tx, offload) << who;
    EXPECT_EQ(st->rx, offload && tls12) << who;
  }
  EXPECT_EQ(ktls_send(pair.client.get()), offload);
  EXPECT_EQ(ktls_recv(pair.client.get()), offload && tls12);

  auto up = pattern(100000, 3), down = pattern(100000, 4);
  std::string got_up;
  std::thread server([&] {
    got_up = ssl_read_sha256(pair.server.get(), up.size());
    if (!tls12) {  // a NewSessionTicket over the (offloaded) send side
      EXPECT_EQ(SSL_new_session_ticket(pair.server.get()), 1);
      EXPECT_EQ(SSL_do_handshake(pair.server.get()), 1) << openssl_errors();
    }
    EXPECT_TRUE(ssl_write_all(pair.server.get(), down.data(), down.size()));
    EXPECT_EQ(SSL_shutdown(pair.server.get()), 0);
  });
  EXPECT_TRUE(ssl_write_all(pair.client.get(), up.data(), up.size()));
  EXPECT_EQ(ssl_read_sha256(pair.client.get(), down.size()), sha256(down.data(), down.size()));
  server.join();
  EXPECT_EQ(got_up, sha256(up.data(), up.size()));
  char byte;
  int rc = SSL_read(pair.client.get(), &byte, 1);
  EXPECT_EQ(SSL_get_error(pair.client.get(), rc), SSL_ERROR_ZERO_RETURN) << openssl_errors();
  EXPECT_EQ(SSL_shutdown(pair.client.get()), 1);
  EXPECT_EQ(SSL_shutdown(pair.server.get()), 1) << "the server reads the client's answer";

  if (offload) {
    EXPECT_EQ(sst.sent_types[21], 1) << "close_notify sent as an alert record via cmsg";
    EXPECT_EQ(cst.sent_types[21], 1) << "the client's close_notify";
    if (tls12) {
      // TLS 1.2 offloads at ChangeCipherSpec: each side's Finished (a
      // handshake record, 22) already goes out and comes in through the
      // kernel, so the BIO sees record types during the handshake.
      for (EngineBio *st : {&cst, &sst}) {
        const char *who = st == &cst ? "client" : "server";
        EXPECT_EQ(st->sent_types[22], 1) << who << ": its Finished via cmsg";
        EXPECT_EQ(st->received_types[22], 1) << who << ": the peer's Finished via kernel RX";
        EXPECT_GE(st->received_types[23], 1) << who << ": data read through kernel RX";
        EXPECT_EQ(st->received_types[21], 1) << who << ": the peer's close_notify via kernel RX";
      }
    } else {
      // TLS 1.3 offloads the application keys only: the handshake is over
      // by then, and the ticket is the only handshake record after it.
      EXPECT_EQ(sst.sent_types[22], 1) << "the NewSessionTicket via cmsg";
      EXPECT_EQ(cst.sent_types[22], 0) << "the client's Finished went before the offload";
    }
  } else {
    EXPECT_TRUE(sst.sent_types.empty() && cst.received_types.empty());
  }
}

INSTANTIATE_TEST_SUITE_P(Ktls, EngineStyleBio,
                         testing::Values(kTls12Aes128, kTls12Aes256, kTls13Aes128, kTls13Aes256),
                         suite_name);

}  // namespace

namespace {

// Ends the program when one test runs longer than a minute, naming it: the
// sockets are blocking, so a broken expectation could otherwise hang until
// the guest's (or meson's) timeout, without saying where.
class Watchdog : public testing::EmptyTestEventListener {
 public:
  Watchdog() {
    std::thread([this] {
      for (;;) {
        sleep(1);
        std::lock_guard<std::mutex> lock(mu_);
        if (!name_.empty() && time(nullptr) - started_ > kLimitSeconds) {
          fprintf(stderr, "\nwatchdog: %s has run for more than %d s; giving up\n", name_.c_str(),
                  kLimitSeconds);
          fflush(stdout);
          _exit(1);
        }
      }
    }).detach();
  }
  void OnTestStart(const testing::TestInfo &info) override {
    std::lock_guard<std::mutex> lock(mu_);
    name_ = std::string(info.test_suite_name()) + "." + info.name();
    started_ = time(nullptr);
  }
  void OnTestEnd(const testing::TestInfo &) override {
    std::lock_guard<std::mutex> lock(mu_);
    name_.clear();
  }

 private:
  static constexpr int kLimitSeconds = 60;
  std::mutex mu_;
  std::string name_;
  time_t started_ = 0;
};

}  // namespace

int main(int argc, char **argv) {
  testing::InitGoogleTest(&argc, argv);
  testing::UnitTest::GetInstance()->listeners().Append(new Watchdog);
  signal(SIGPIPE, SIG_IGN);
  utsname u{};
  uname(&u);
  printf("kernel %s, %s, TLS ULP: %s%s\n", u.release, OpenSSL_version(OPENSSL_VERSION),
         ulp().available ? "available" : ulp().reason.c_str(),
         require_ktls() ? " (required: KLOOP_REQUIRE_KTLS is set)" : "");
  fflush(stdout);
  int rc = RUN_ALL_TESTS();
  auto stat = tls_stat();
  if (!stat.empty()) {
    printf("/proc/net/tls_stat at exit:");
    for (const auto &[name, value] : stat) printf(" %s=%lld", name.c_str(), value);
    printf("\n");
  }
  const testing::UnitTest *unit = testing::UnitTest::GetInstance();
  if (require_ktls() && unit->skipped_test_count() > 0) {
    printf("FAILED: %d tests skipped although KLOOP_REQUIRE_KTLS is set\n",
           unit->skipped_test_count());
    rc = 1;
  }
  return rc;
}
