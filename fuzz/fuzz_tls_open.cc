// Fuzz target: the engine opening a TLS peer's records (no kernel TLS: the
// engine decrypts them itself), through the public C ABI. Per input: an
// engine TLS stream on one end of an AF_UNIX socketpair and a real OpenSSL
// peer (memory BIOs) on the other, handshaken for a suite the input picks;
// then the input plays the peer: it writes data, asks for key updates,
// closes with close_notify, and it damages the ciphertext before it goes
// out (flips bits, inserts bytes, drops the tail) and sends it in pieces
// of any size.
//
// Promises checked:
//  - what the stream delivers as DATA is always a prefix of what the peer
//    wrote: no byte of a damaged record is ever handed out;
//  - while nothing was damaged: no ERROR, and after the peer's last write
//    all of it arrives; a close_notify gives a clean EOF;
//  - the engine's answers (its writes, and its key update after one the
//    peer requested) are read by the peer without an error while nothing
//    was damaged;
//  - once the peer has closed, EOF or ERROR comes within a bound; a TLS
//    ERROR has NUL-terminated texts (kloop_stream_tls_error);
//  - abort or close gives exactly one CLOSED; then no stream is left and
//    kloop_get_stats().buffers_in_use is 0.
//
// Input: byte 0 = options (bit 0 the engine is the server; bits 1-2 the
// suite: TLS 1.3 AES-128-GCM, TLS 1.3 ChaCha20-Poly1305, TLS 1.2
// AES-128-GCM, TLS 1.2 ChaCha20-Poly1305; bit 3 end with close instead of
// abort); then operations, one byte each (op % 8) with their arguments:
//   0 write u16 % 16384 + 1 bytes        4 send what waits, pieces of u8 (0: all)
//   1 key update (u8 & 1: requested)     5 drop the last u8 % 64 bytes waiting
//   2 flip: at u16, xor u8 | 1           6 close_notify
//   3 insert u8 % 32 input bytes at u16  7 the engine writes u8 + 1 bytes
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "harness.h"
#include "tls_fixture.h"

using kfuzz::Fail;
using kfuzz::NowNs;
using kfuzz::Reader;

namespace {

using Fixture = kfuzz::TlsFixture;

const Fixture &Fix() {
  static const Fixture f = kfuzz::MakeTlsFixture();
  return f;
}

struct Suite {
  int version;
  const char *name;
};
constexpr Suite kSuites[] = {
    {TLS1_3_VERSION, "TLS_AES_128_GCM_SHA256"},
    {TLS1_3_VERSION, "TLS_CHACHA20_POLY1305_SHA256"},
    {TLS1_2_VERSION, "ECDHE-ECDSA-AES128-GCM-SHA256"},
    {TLS1_2_VERSION, "ECDHE-ECDSA-CHACHA20-POLY1305"},
};

SSL *NewSsl(SSL_CTX *ctx, const Suite &suite, bool server) {
  SSL *ssl = SSL_new(ctx);
  if (!ssl) Fail("SSL_new failed");
  SSL_set_min_proto_version(ssl, suite.version);
  SSL_set_max_proto_version(ssl, suite.version);
  int ok = suite.version == TLS1_3_VERSION ? SSL_set_ciphersuites(ssl, suite.name)
                                           : SSL_set_cipher_list(ssl, suite.name);
  if (ok != 1) Fail("cannot select %s", suite.name);
  if (server) {
    SSL_set_accept_state(ssl);
  } else {
    SSL_set_connect_state(ssl);
    SSL_set_tlsext_host_name(ssl, "localhost");
  }
  return ssl;
}

// The byte at position i of everything the peer writes.
unsigned char PeerByte(size_t i) { return static_cast<unsigned char>(i * 131 + 7); }

// The engine's stream, the OpenSSL peer and what went between them.
class Run {
 public:
  Run(kloop_t *l, uint64_t t, int fd) : loop_(l), tok_(t), fd_(fd) {}
  Run(const Run &) = delete;
  Run &operator=(const Run &) = delete;
  ~Run() {
    SSL_free(peer_);
    if (fd_ >= 0) ::close(fd_);
  }

  void SetPeer(SSL *peer) {
    peer_ = peer;
    BIO *in = BIO_new(BIO_s_mem());
    BIO *out = BIO_new(BIO_s_mem());
    if (!in || !out) Fail("BIO_new failed");
    SSL_set_bio(peer_, in, out);
    in_ = in;
    out_ = out;
  }

  uint64_t tok() const { return tok_; }
  bool damaged() const { return damaged_; }
  bool ended() const { return ended_; }
  bool closed() const { return closed_; }
  bool handshaken() const { return hs_ok_; }
  bool peer_done() const { return peer_done_; }
  size_t sent() const { return sent_; }
  size_t got() const { return got_; }

  void Poll(int64_t timeout_ns) {
    kloop_completion out[32];
    int n = kloop_poll(loop_, out, 32, timeout_ns);
    if (n == -EINTR) return;
    if (n < 0) Fail("kloop_poll returned %d", n);
    for (int i = 0; i < n; ++i) Record(out[i]);
  }

  // Both ends handshake; false if the engine's failed.
  bool Handshake() {
    int64_t end = NowNs() + 3'000'000'000LL;
    bool peer_ok = false;
    while (!(peer_ok && hs_ok_)) {
      if (NowNs() > end) Fail("no handshake within 3 s");
      if (hs_failed_) return false;
      if (!peer_ok) {
        int r = SSL_do_handshake(peer_);
        if (r == 1) {
          peer_ok = true;
        } else if (SSL_get_error(peer_, r) != SSL_ERROR_WANT_READ) {
          Fail("the peer's handshake failed");
        }
      }
      Take();
      SendAll(0);
      Poll(1'000'000);
      Feed();
    }
    return true;
  }

  // The peer's records made so far join what waits to be sent.
  void Take() {
    char buf[4096];
    int n;
    while ((n = BIO_read(out_, buf, sizeof buf)) > 0) wait_.append(buf, static_cast<size_t>(n));
  }

  // What the engine sent, into the peer's SSL.
  void Feed() {
    char buf[4096];
    for (;;) {
      ssize_t r = ::recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
      if (r <= 0) return;
      BIO_write(in_, buf, static_cast<int>(r));
    }
  }

  // The peer reads what the engine wrote (and answers a key update).
  void PeerRead() {
    Feed();
    char buf[4096];
    for (;;) {
      int r = SSL_read(peer_, buf, sizeof buf);
      if (r > 0) continue;
      int e = SSL_get_error(peer_, r);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_ZERO_RETURN) break;
      if (!damaged_) Fail("the peer cannot read the engine's records (SSL error %d)", e);
      peer_broken_ = true;
      break;
    }
    ERR_clear_error();
    Take();
  }

  void Write(size_t n) {
    if (peer_done_ || peer_broken_) return;
    std::string p(n, '\0');
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<char>(PeerByte(sent_ + i));
    if (SSL_write(peer_, p.data(), static_cast<int>(n)) != static_cast<int>(n)) {
      if (!damaged_) Fail("the peer's SSL_write failed");
      peer_broken_ = true;
      ERR_clear_error();
      return;
    }
    sent_ += n;
    Take();
  }

  void KeyUpdate(bool requested) {
    if (peer_done_ || peer_broken_ || SSL_version(peer_) != TLS1_3_VERSION) return;
    if (SSL_key_update(peer_,
                       requested ? SSL_KEY_UPDATE_REQUESTED : SSL_KEY_UPDATE_NOT_REQUESTED) != 1)
      Fail("SSL_key_update failed");
    SSL_do_handshake(peer_);  // sends it
    Take();
  }

  void CloseNotify() {
    if (peer_done_ || peer_broken_) return;
    SSL_shutdown(peer_);
    peer_done_ = true;
    notified_ = true;
    Take();
  }

  void Flip(size_t at, uint8_t x) {
    if (wait_.empty()) return;
    wait_[at % wait_.size()] = static_cast<char>(wait_[at % wait_.size()] ^ x);
    damaged_ = true;
  }

  void Insert(size_t at, const uint8_t *p, size_t n) {
    if (n == 0) return;
    wait_.insert(at % (wait_.size() + 1), reinterpret_cast<const char *>(p), n);
    damaged_ = true;
  }

  void DropTail(size_t n) {
    if (n == 0 || wait_.empty()) return;
    wait_.resize(wait_.size() - (n < wait_.size() ? n : wait_.size()));
    damaged_ = true;
  }

  // Sends what waits in pieces of `piece` bytes (0: at once), the engine
  // running between them.
  void SendAll(size_t piece) {
    size_t i = 0;
    int64_t end = NowNs() + 3'000'000'000LL;
    while (i < wait_.size()) {
      size_t n = wait_.size() - i;
      if (piece && n > piece) n = piece;
      ssize_t w = ::send(fd_, wait_.data() + i, n, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        i += static_cast<size_t>(w);
      } else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        break;  // the engine's end is gone
      } else if (ended_ || closed_) {
        break;  // the engine reads no more: what does not fit is dropped
      } else if (NowNs() > end) {
        Fail("the peer cannot send: the engine does not read");
      }
      Poll(0);
      Feed();
    }
    wait_.clear();
  }

  void EngineWrite(size_t n) {
    if (ended_ || closed_ || aborted_) return;
    std::string p(n, 'e');
    int64_t w = kloop_stream_write(loop_, tok_, p.data(), n);
    if (w < 0 && !damaged_) Fail("kloop_stream_write returned %lld", static_cast<long long>(w));
    for (int i = 0; i < 4; ++i) {
      Poll(0);
      PeerRead();
    }
  }

  // The peer is done: its end of the socket closes.
  void Hangup() {
    SendAll(0);
    ::shutdown(fd_, SHUT_WR);
  }

  void End(bool close) {
    kfuzz::EndStream(loop_, tok_, close);
    aborted_ |= !close;
  }

  // After the peer closed: what must have come.
  void CheckEnd() const {
    if (damaged_) return;
    if (got_ != sent_)
      Fail("%zu of the %zu bytes the peer wrote arrived, nothing damaged", got_, sent_);
    if (notified_ && eof_aux_ != 0) Fail("close_notify sent, EOF aux %u", eof_aux_);
  }

 private:
  void Record(const kloop_completion &c) {
    kfuzz::Trace("record event %u result %d aux %#x", c.event, c.result, c.aux);
    if (c.token != tok_) Fail("record for token %llu", static_cast<unsigned long long>(c.token));
    if (closed_) Fail("record (event %u) after CLOSED", c.event);
    switch (c.event) {
      case KLOOP_EVENT_HANDSHAKE:
        if (c.result == 0) {
          hs_ok_ = true;
        } else {
          hs_failed_ = true;
        }
        break;
      case KLOOP_EVENT_DATA: {
        if (!hs_ok_) Fail("DATA before the handshake");
        if (ended_) Fail("DATA after EOF or ERROR");
        const auto *p = reinterpret_cast<const unsigned char *>(c.data);
        for (int32_t i = 0; i < c.result; ++i) {
          if (got_ >= sent_ || p[i] != PeerByte(got_))
            Fail("byte %zu delivered is not the peer's (%zu written)", got_, sent_);
          ++got_;
        }
        break;
      }
      case KLOOP_EVENT_EOF:
        ended_ = true;
        eof_aux_ = c.aux;
        break;
      case KLOOP_EVENT_ERROR: {
        if (!damaged_) Fail("ERROR (result %d, aux %#x) with nothing damaged", c.result, c.aux);
        ended_ = true;
        if (c.aux & KLOOP_ERROR_TLS) {
          kloop_tls_error e;
          std::memset(&e, 0x5a, sizeof e);
          e.size = sizeof e;
          if (kloop_stream_tls_error(loop_, tok_, &e) != 0) Fail("kloop_stream_tls_error failed");
          if (!std::memchr(e.message, 0, sizeof e.message) ||
              !std::memchr(e.verify_message, 0, sizeof e.verify_message))
            Fail("kloop_stream_tls_error texts not NUL-terminated");
        }
        break;
      }
      case KLOOP_EVENT_CLOSED:
        closed_ = true;
        break;
      case KLOOP_EVENT_WRITE_LOW:
      case KLOOP_EVENT_WRITE_DONE:
        break;
      default:
        Fail("stream got event %u", c.event);
    }
  }

  kloop_t *loop_;
  uint64_t tok_;
  int fd_;
  SSL *peer_ = nullptr;
  BIO *in_ = nullptr;   // the peer's SSL reads from here (owned by it)
  BIO *out_ = nullptr;  // and writes here
  std::string wait_;    // the peer's bytes not sent yet
  size_t sent_ = 0;     // plaintext the peer wrote
  size_t got_ = 0;      // plaintext the stream delivered
  bool damaged_ = false;
  bool peer_done_ = false;  // close_notify sent
  bool notified_ = false;
  bool peer_broken_ = false;  // the peer's SSL failed (after damage)
  bool hs_ok_ = false;
  bool hs_failed_ = false;
  bool ended_ = false;
  bool aborted_ = false;
  bool closed_ = false;
  uint32_t eof_aux_ = 0;
};

uint64_t g_token = 0;

void RunOne(Reader &in) {
  const Fixture &f = Fix();
  uint8_t opt = in.u8();
  bool engine_serves = opt & 1;
  const Suite &suite = kSuites[(opt >> 1) & 3];

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0)
    Fail("socketpair: %s", std::strerror(errno));
  Run r(f.loop, ++g_token, sv[1]);
  int rc = kloop_stream_attach(f.loop, r.tok(), sv[0], KLOOP_STREAM_CLOSE_FD);
  if (rc != 0) Fail("kloop_stream_attach returned %d", rc);
  SSL *mine = NewSsl(engine_serves ? f.server : f.client, suite, engine_serves);
  rc = kloop_stream_start_tls(f.loop, r.tok(), mine);
  SSL_free(mine);  // the engine holds its own reference
  if (rc != 0) Fail("kloop_stream_start_tls returned %d", rc);
  r.SetPeer(NewSsl(engine_serves ? f.client : f.server, suite, !engine_serves));
  if (!r.Handshake()) Fail("the engine's handshake with an OpenSSL peer failed");

  size_t budget = 1u << 18;  // plaintext per input
  int ops = 0;
  while (!in.empty() && ops++ < 200 && !r.closed()) {
    switch (in.u8() % 8) {
      case 0: {
        size_t n = in.u16() % 16384 + 1;
        if (n > budget) break;
        budget -= n;
        r.Write(n);
        break;
      }
      case 1:
        r.KeyUpdate(in.u8() & 1);
        break;
      case 2: {
        size_t at = in.u16();
        r.Flip(at, static_cast<uint8_t>(in.u8() | 1));
        break;
      }
      case 3: {
        size_t n = in.u8() % 32;
        size_t at = in.u16();
        uint8_t bytes[32];
        for (size_t i = 0; i < n; ++i) bytes[i] = in.u8();
        r.Insert(at, bytes, n);
        break;
      }
      case 4:
        r.SendAll(in.u8());
        break;
      case 5:
        r.DropTail(in.u8() % 64);
        break;
      case 6:
        r.CloseNotify();
        break;
      default:
        r.EngineWrite(static_cast<size_t>(in.u8()) + 1);
        break;
    }
  }
  r.Hangup();
  int64_t end = NowNs() + 3'000'000'000LL;
  while (!r.ended()) {
    if (NowNs() > end) Fail("no EOF or ERROR within 3 s after the peer closed");
    r.Poll(1'000'000);
  }
  r.CheckEnd();
  r.End((opt & 8) != 0);
  end = NowNs() + 3'000'000'000LL;
  while (!r.closed()) {
    if (NowNs() > end) Fail("no CLOSED within 3 s");
    r.Poll(1'000'000);
  }
  r.Poll(0);
  kfuzz::CheckStreamGone(f.loop);
  ERR_clear_error();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kfuzz::IgnoreSigpipe();
  Reader in(data, size);
  RunOne(in);
  return 0;
}
