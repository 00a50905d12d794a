// Fuzz target: a misbehaving peer against an engine TLS stream, through the
// public C ABI only. Per input: a connected AF_UNIX stream socketpair, one
// end attached to the loop and put under TLS (an OpenSSL server or client),
// the other end played by the input: its bytes are written in pieces (the
// engine runs between pieces), then that end is closed.
//
// Promises checked (include/kloop.h, "TLS on streams"):
//  - exactly one HANDSHAKE record (none once the stream was aborted before
//    it), and it comes once the peer has closed, within a bound;
//  - no DATA before a successful HANDSHAKE, none after a failed one;
//  - after a failed HANDSHAKE kloop_stream_tls_error() answers 0 with
//    NUL-terminated texts;
//  - abort (or close) gives exactly one CLOSED, and nothing comes after it;
//  - once CLOSED, no stream is left and kloop_get_stats().buffers_in_use
//    is back to 0 (a receive or plaintext buffer the stream kept is a leak).
//
// Input: byte 0 = options (bit 0 server, bit 1 attach paused, bit 2 queue
// plaintext before the handshake, bit 3 end with close instead of abort,
// bit 4 abort early, after piece number (bits 5-6), bit 7 a client that
// verifies the peer against the fuzzer's own certificate); byte 1 = k, the number of
// piece-size bytes that follow (k % 8; 0: the data goes as one piece); the
// sizes are used in turn (0 means 256); the rest is what the peer sends.
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "harness.h"
#include "tls_fixture.h"

using kfuzz::Fail;
using kfuzz::NowNs;
using kfuzz::Reader;

namespace {

using Fixture = kfuzz::TlsFixture;

Fixture MakeFixture() {
  Fixture f = kfuzz::MakeTlsFixture();
  // Older versions too, so that TLS 1.2 parsing is reachable.
  SSL_CTX_set_min_proto_version(f.server, TLS1_2_VERSION);
  return f;
}

const Fixture &Fix() {
  static const Fixture f = MakeFixture();
  return f;
}

// What the input's peer end and the stream did so far.
class Run {
 public:
  Run(kloop_t *l, uint64_t t) : loop_(l), tok_(t) {}
  uint64_t tok() const { return tok_; }
  int handshakes() const { return handshakes_; }
  int hs_result() const { return hs_result_; }
  bool ended() const { return ended_; }
  bool aborted() const { return aborted_; }
  bool closing() const { return closing_; }
  bool closed() const { return closed_; }

  // One kloop_poll(), each record checked.
  void Poll(int64_t timeout_ns) {
    int n = kloop_poll(loop_, out_, 32, timeout_ns);
    if (n == -EINTR) return;
    if (n < 0) Fail("kloop_poll returned %d", n);
    for (int i = 0; i < n; ++i) Record(out_[i]);
  }

  void Abort() {
    kfuzz::EndStream(loop_, tok_, false);
    aborted_ = true;
  }

  void Close() {
    kfuzz::EndStream(loop_, tok_, true);
    closing_ = true;
  }

 private:
  void Record(const kloop_completion &c) {
    kfuzz::Trace("record event %u result %d aux %#x flags %#x", c.event, c.result, c.aux, c.flags);
    if (c.token != tok_)
      Fail("record for token %llu, not the stream's", static_cast<unsigned long long>(c.token));
    if (closed_) Fail("record (event %u) after CLOSED", c.event);
    bool more = (c.flags & KLOOP_COMPLETION_MORE) != 0;
    if ((c.event == KLOOP_EVENT_CLOSED) == more) Fail("event %u with flags %#x", c.event, c.flags);
    switch (c.event) {
      case KLOOP_EVENT_HANDSHAKE:
        if (++handshakes_ > 1) Fail("a second HANDSHAKE record (result %d)", c.result);
        if (aborted_) Fail("HANDSHAKE (result %d) after abort", c.result);
        if (c.result > 0) Fail("HANDSHAKE with result %d", c.result);
        hs_result_ = c.result;
        if (c.result < 0) CheckTlsError();
        break;
      case KLOOP_EVENT_DATA: {
        if (hs_result_ != 0) Fail("DATA (%d bytes) without a successful HANDSHAKE", c.result);
        if (c.result <= 0) Fail("DATA with result %d", c.result);
        const volatile unsigned char *p = reinterpret_cast<const unsigned char *>(c.data);
        unsigned sum = 0;
        for (int32_t i = 0; i < c.result; ++i) sum += p[i];
        (void)sum;
        break;
      }
      case KLOOP_EVENT_EOF:
        if (hs_result_ != 0) Fail("EOF (aux %u) without a successful HANDSHAKE", c.aux);
        ended_ = true;
        break;
      case KLOOP_EVENT_ERROR:
        // A failed send while the handshake runs (the peer went away while
        // the engine's flight was queued) comes as a write ERROR; a read or
        // TLS failure is the HANDSHAKE's result instead, and after a failed
        // HANDSHAKE nothing is reported (kloop.h).
        if (hs_result_ < 0)
          Fail("ERROR (result %d, aux %#x) after a failed HANDSHAKE", c.result, c.aux);
        if (hs_result_ != 0 && c.aux != KLOOP_ERROR_WRITE)
          Fail("ERROR (result %d, aux %#x) without a successful HANDSHAKE", c.result, c.aux);
        if (c.result >= 0) Fail("ERROR with result %d", c.result);
        if (hs_result_ == 0) ended_ = true;
        break;
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

  void CheckTlsError() const {
    kloop_tls_error e;
    std::memset(&e, 0x5a, sizeof e);
    e.size = sizeof e;
    int rc = kloop_stream_tls_error(loop_, tok_, &e);
    if (rc != 0) Fail("kloop_stream_tls_error after a failed handshake returned %d", rc);
    if (!std::memchr(e.message, 0, sizeof e.message) ||
        !std::memchr(e.verify_message, 0, sizeof e.verify_message))
      Fail("kloop_stream_tls_error texts not NUL-terminated");
  }

  kloop_t *loop_;
  uint64_t tok_;
  int handshakes_ = 0;
  int hs_result_ = 1;   // 1: none yet
  bool ended_ = false;  // EOF or ERROR seen after a successful handshake
  bool aborted_ = false;
  bool closing_ = false;  // kloop_stream_close() was called
  bool closed_ = false;
  kloop_completion out_[32] = {};
};

// Write all of p[0..n) to the peer end, letting the engine run meanwhile.
// Once the handshake failed (or the stream was aborted) the engine stops
// reading, so what no longer fits into the socket is dropped then.
void PeerWrite(Run &r, int fd, const uint8_t *p, size_t n) {
  int64_t end = NowNs() + 2'000'000'000LL;
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return;  // engine side gone
    if (r.aborted() || r.hs_result() < 0) return;
    if (NowNs() > end) Fail("peer cannot write: the engine does not read");
    r.Poll(100'000);
  }
}

uint64_t g_token = 0;

void RunOne(Reader &in, const uint8_t *data, size_t size) {
  const Fixture &f = Fix();
  uint8_t opt = in.u8();
  bool server = opt & 1;
  uint8_t k = in.u8() % 8;
  uint8_t sizes[8] = {};
  for (uint8_t i = 0; i < k; ++i) sizes[i] = in.u8();
  size_t used = 2u + k <= size ? 2u + k : size;
  const uint8_t *rest = data + used;
  size_t left = size - used;

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0)
    Fail("socketpair: %s", std::strerror(errno));
  Run r(f.loop, ++g_token);
  uint32_t flags = KLOOP_STREAM_CLOSE_FD | ((opt & 2) ? KLOOP_STREAM_PAUSED : 0);
  int rc = kloop_stream_attach(f.loop, r.tok(), sv[0], flags);
  if (rc != 0) Fail("kloop_stream_attach returned %d", rc);

  SSL *ssl = SSL_new(server ? f.server : ((opt & 0x80) ? f.client_verify : f.client));
  if (!ssl) Fail("SSL_new failed");
  if (server) {
    SSL_set_accept_state(ssl);
  } else {
    SSL_set_connect_state(ssl);
    SSL_set_tlsext_host_name(ssl, "localhost");
    SSL_set1_host(ssl, "localhost");
  }
  rc = kloop_stream_start_tls(f.loop, r.tok(), ssl);
  SSL_free(ssl);  // the engine holds its own reference
  if (rc != 0) Fail("kloop_stream_start_tls returned %d", rc);
  if (opt & 4) {
    static const char kEarly[] = "plaintext queued before the handshake ends";
    int64_t w = kloop_stream_write(f.loop, r.tok(), kEarly, sizeof kEarly - 1);
    if (w < 0)
      Fail("kloop_stream_write during the handshake returned %lld", static_cast<long long>(w));
  }

  int abort_after = (opt & 0x10) ? ((opt >> 5) & 3) : -1;
  int piece = 0;
  while (left > 0 && !r.aborted()) {
    size_t n = left;
    if (k) {
      n = sizes[piece % k] ? sizes[piece % k] : 256;
      if (n > left) n = left;
    }
    PeerWrite(r, sv[1], rest, n);
    rest += n;
    left -= n;
    r.Poll(0);
    r.Poll(0);
    if (piece++ == abort_after) r.Abort();
  }
  if (abort_after >= 0 && !r.aborted()) r.Abort();
  ::close(sv[1]);

  // The peer is gone: the handshake ends (or has ended) and, after a
  // successful one, reading ends too.
  int64_t end = NowNs() + 3'000'000'000LL;
  while (!r.aborted() && (r.handshakes() == 0 || (r.hs_result() == 0 && !r.ended()))) {
    if (NowNs() > end)
      Fail("no %s within 3 s after the peer closed", r.handshakes() ? "EOF/ERROR" : "HANDSHAKE");
    r.Poll(1'000'000);
  }
  if (!r.aborted() && r.handshakes() != 1) Fail("%d HANDSHAKE records", r.handshakes());
  if (!r.aborted()) {
    if (opt & 8) {
      r.Close();
    } else {
      r.Abort();
    }
  }
  end = NowNs() + 3'000'000'000LL;
  while (!r.closed()) {
    if (NowNs() > end) Fail("no CLOSED within 3 s after %s", r.closing() ? "close" : "abort");
    r.Poll(1'000'000);
  }
  // Returns the buffers of the last poll; nothing may come now.
  r.Poll(0);
  kfuzz::CheckStreamGone(f.loop);
  ERR_clear_error();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kfuzz::IgnoreSigpipe();
  Reader in(data, size);
  RunOne(in, data, size);
  return 0;
}
