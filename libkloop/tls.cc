// TLS on engine streams (see tls.h). The caller's SSL runs over a BIO of
// the engine's: reads come from received ciphertext, writes go to the
// stream's write queue, so the engine's send path (gathered sendmsg, one in
// flight, flow control) carries TLS records unchanged.
#include "tls.h"

#include <dlfcn.h>
#include <errno.h>
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/x509.h>

#include <new>

namespace kl {

namespace {

BIO_METHOD *g_bio_method = nullptr;
int g_bio_type = 0;
constexpr const char *kKeyUpdateText =
    "TLS 1.3 key update on a kernel TLS socket (the kernel cannot change the send key)";
pthread_once_t g_bio_once = PTHREAD_ONCE_INIT;

int bio_read(BIO *b, char *out, int len) {
  BIO_clear_retry_flags(b);
  auto *t = static_cast<TlsState *>(BIO_get_data(b));
  if (!t || !t->eng || len <= 0) return -1;  // detached: the stream is gone
  int n = t->eng->tls_bio_read(t, out, static_cast<size_t>(len));
  if (n > 0) return n;
  // The end of the stream, once the engine has opened what came before it.
  if (t->in_eof && (!t->open || t->in.empty())) return 0;
  BIO_set_retry_read(b);
  return -1;
}

int bio_write(BIO *b, const char *in, int len) {
  BIO_clear_retry_flags(b);
  auto *t = static_cast<TlsState *>(BIO_get_data(b));
  if (!t || !t->eng || len < 0) return -1;
  if (len == 0) return 0;
  return t->eng->tls_bio_write(t, in, static_cast<size_t>(len)) ? len : -1;
}

// The controls OpenSSL 3.0 sends a BIO for kernel TLS. 73 and 76 are in
// <openssl/bio.h>; 72, 74 and 75 are internal to OpenSSL (named there in a
// comment only), and with them the layout of what 72 passes: the kernel's
// tls12_crypto_info_* struct for the cipher.
constexpr int kCtrlSetKtls = 72;         // num: 1 send side, 0 receive; ptr: keys
constexpr int kCtrlSetKtlsCtrlMsg = 74;  // num: content type of the next write
constexpr int kCtrlClearKtlsCtrlMsg = 75;

long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
  auto *t = static_cast<TlsState *>(BIO_get_data(b));
  switch (cmd) {
    case kCtrlSetKtls:
      return t && t->eng && ptr && t->eng->tls_set_key(t, num != 0, ptr) ? 1 : 0;
    case BIO_CTRL_GET_KTLS_SEND:
      return t && t->tx_offload ? 1 : 0;
    case BIO_CTRL_GET_KTLS_RECV:
      return t && rx_framed(t) ? 1 : 0;
    case kCtrlSetKtlsCtrlMsg:
      if (t) t->ctrl_type = static_cast<uint32_t>(num);
      return 1;
    case kCtrlClearKtlsCtrlMsg:
      if (t) t->ctrl_type = 0;
      return 1;
    case BIO_CTRL_FLUSH:
      return 1;  // everything written is already queued
    case BIO_CTRL_PENDING: {
      if (!t) return 0;
      long n = 0;
      for (size_t i = 0; i < t->in.size(); ++i) n += t->in.at(i).len;
      return n;
    }
    default:  // WPENDING (nothing waits inside the BIO) among others
      return 0;
  }
}

int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

void make_bio_method() {
  int type = BIO_get_new_index() | BIO_TYPE_SOURCE_SINK;
  BIO_METHOD *m = BIO_meth_new(type, "kloop stream");
  if (!m) return;
  if (!BIO_meth_set_read(m, bio_read) || !BIO_meth_set_write(m, bio_write) ||
      !BIO_meth_set_ctrl(m, bio_ctrl) || !BIO_meth_set_create(m, bio_create)) {
    BIO_meth_free(m);
    return;
  }
  g_bio_method = m;
  g_bio_type = type;
}

// The key log OpenSSL writes when a context has a callback for it: one
// line per secret, "LABEL <client random> <secret>" in hex. Installed by
// the engine on contexts that have none, to learn the TLS 1.3 traffic
// secrets of the streams whose records it seals and opens (a key update
// derives the next key from them). Lines of other SSLs are ignored.
void keylog_line(const SSL *ssl, const char *line) {
  BIO *b = SSL_get_wbio(ssl);
  if (!b || BIO_method_type(b) != g_bio_type) return;
  auto *t = static_cast<TlsState *>(BIO_get_data(b));
  if (!t || !t->seal_ok) return;
  const char *mine = SSL_is_server(ssl) ? "SERVER_TRAFFIC_SECRET_0 " : "CLIENT_TRAFFIC_SECRET_0 ";
  const char *peers = SSL_is_server(ssl) ? "CLIENT_TRAFFIC_SECRET_0 " : "SERVER_TRAFFIC_SECRET_0 ";
  size_t label_len = strlen(mine);  // both labels are as long
  unsigned char *out = nullptr;
  uint32_t *out_len = nullptr;
  if (!t->seal && strncmp(line, mine, label_len) == 0) {
    out = t->tx_secret;
    out_len = &t->tx_secret_len;
  } else if (!t->open && strncmp(line, peers, label_len) == 0) {
    out = t->rx_secret;
    out_len = &t->rx_secret_len;
  } else {
    return;
  }
  const char *p = strchr(line + label_len, ' ');  // past the client random
  if (!p) return;
  ++p;
  size_t n = 0;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  while (p[0] && p[1] && n < sizeof t->tx_secret) {
    int hi = nibble(p[0]);
    int lo = nibble(p[1]);
    if (hi < 0 || lo < 0) break;
    out[n++] = static_cast<unsigned char>((hi << 4) | lo);
    p += 2;
  }
  *out_len = static_cast<uint32_t>(n);
}

void copy_text(char *dst, size_t cap, const char *src) {
  if (!src) src = "";
  size_t n = strlen(src);
  if (n >= cap) n = cap - 1;
  memcpy(dst, src, n);
  dst[n] = '\0';
}

}  // namespace

bool RecordQueue::push(uint8_t type, const void *payload, uint32_t len) {
  // A TLS record's plaintext is at most 2^14 bytes (RFC 8446 5.1), a TLS
  // 1.3 inner plaintext one more (its type; the engine strips padding).
  if (len > 16384 + 1 || (len && !payload)) return false;
  const uint8_t head[5] = {type, 3, 3, static_cast<uint8_t>(len >> 8),
                           static_cast<uint8_t>(len & 0xff)};
  if (!lens_.reserve(lens_.size() + 1)) return false;
  size_t before = bytes_.size();
  if (!bytes_.append(head, sizeof head) || (len && !bytes_.append(payload, len))) {
    // A header without its payload would corrupt the stream: nothing of
    // this record may stay (the queue only grows at its end; start over).
    if (bytes_.size() != before) clear();
    return false;
  }
  lens_.push_back(len + sizeof head);
  return true;
}

size_t RecordQueue::read(char *out, size_t len) {
  if (lens_.empty() || len == 0) return 0;
  uint32_t &left = lens_.front();
  size_t want = len < left ? len : left;
  iovec iov[kMaxIov];
  int n = bytes_.fill_iov(iov, kMaxIov, want);
  size_t done = 0;
  for (int i = 0; i < n; ++i) {
    memcpy(out + done, iov[i].iov_base, iov[i].iov_len);
    done += iov[i].iov_len;
  }
  bytes_.consume(done);
  left -= static_cast<uint32_t>(done);
  if (left == 0) lens_.pop_front();
  return done;
}

uint8_t record_type_of(const msghdr *m) {
  uint8_t type = 23;
  if (!m || !m->msg_control || m->msg_controllen < sizeof(cmsghdr)) return type;
  auto *mm = const_cast<msghdr *>(m);
  const char *end = static_cast<const char *>(m->msg_control) + m->msg_controllen;
  for (cmsghdr *c = CMSG_FIRSTHDR(mm); c; c = CMSG_NXTHDR(mm, c)) {
    // Malformed (shorter than a header and a byte, or longer than what
    // is left of the buffer): stop here.
    if (c->cmsg_len < CMSG_LEN(1) ||
        c->cmsg_len > static_cast<size_t>(end - reinterpret_cast<const char *>(c)))
      break;
    if (c->cmsg_level == SOL_TLS && c->cmsg_type == TLS_GET_RECORD_TYPE) type = *CMSG_DATA(c);
  }
  return type;
}

void delete_stream(Stream *s) {
  TlsState *t = s->tls;
  if (t) {
    if (t->ssl) {
      BIO_set_data(t->bio, nullptr);
      if (t->own_buffers) SSL_set_mode(t->ssl, SSL_MODE_RELEASE_BUFFERS);
      SSL_free(t->ssl);
    }
    ::operator delete(t->stage);  // a write-pool block (BlockPool::take)
    delete t->seal;
    delete t->open;
    ::operator delete(t->part);
    OPENSSL_cleanse(t->tx_secret, sizeof t->tx_secret);
    OPENSSL_cleanse(t->rx_secret, sizeof t->rx_secret);
    delete t;
  }
  delete s->slot;  // a send still held it: the engine is being destroyed
  delete s;
}

// ---------------------------------------------------------------------------
// BIO callbacks

int Engine::tls_bio_read(TlsState *t, char *out, size_t len) {
  if (rx_framed(t)) {
    // One framed record (or the rest of one) per read, as OpenSSL's own
    // kTLS socket BIO gives them.
    return static_cast<int>(t->rx_ctl.read(out, len));
  }
  size_t done = 0;
  while (done < len && !t->in.empty()) {
    TlsChunk &c = t->in.front();
    size_t n = len - done < c.len ? len - done : c.len;
    memcpy(out + done, buf_addr(static_cast<uint32_t>(c.bid)) + c.off, n);
    c.off += static_cast<uint32_t>(n);
    c.len -= static_cast<uint32_t>(n);
    done += n;
    if (c.len == 0) {
      recycle(static_cast<uint32_t>(c.bid));
      t->in.pop_front();
    }
  }
  t->want = done ? 0 : static_cast<uint32_t>(len > kTlsHsBuf ? kTlsHsBuf : len);
  return static_cast<int>(done);
}

bool Engine::tls_bio_write(TlsState *t, const char *in, size_t len) {
  Stream *s = t->s;
  if (s->aborting || s->write_failed) return true;  // nothing goes out any more: drop
  if (t->seal) {
    // The engine seals: OpenSSL's own records (alerts, tickets, a key
    // update) arrive here as plaintext with their type, application data
    // without one.
    auto type = static_cast<uint8_t>(t->ctrl_type ? t->ctrl_type : 23);
    t->ctrl_type = 0;
    bool key_update =
        type == 22 && len > 0 && static_cast<unsigned char>(in[0]) == 24 && t->seal->tls13();
    if (!tls_seal(s, type, in, len)) return false;
    if (key_update && !t->seal->update_key()) {
      tls_fail(s, -EPROTO, 0, false, KLOOP_ERROR_WRITE);
      copy_text(t->err.message, sizeof t->err.message, "TLS 1.3 key update failed");
      return false;
    }
    return true;
  }
  if (t->ctrl_type) {
    // A record other than application data on an offloaded send side.
    // OpenSSL 3.0 changes only its own key on a TLS 1.3 KeyUpdate (type 22,
    // message 24); the kernel would go on with the old one and the peer
    // could not decrypt anything after it: fail here, cleanly.
    if (t->ctrl_type == 22 && len > 0 && static_cast<unsigned char>(in[0]) == 24 &&
        SSL_version(t->ssl) == TLS1_3_VERSION) {
      if (!t->failed) {
        tls_fail(s, -EPROTO, 0, false, KLOOP_ERROR_WRITE);
        copy_text(t->err.message, sizeof t->err.message, kKeyUpdateText);
      }
      return false;
    }
    if (!t->marks.push_back(TlsMark{t->appended, t->appended + len, t->ctrl_type})) return false;
    t->ctrl_type = 0;  // one write, one record (OpenSSL's socket BIO does the same)
  }
  if (!s->wq.append(in, len, &wblocks_)) return false;
  t->appended += len;
  if (!s->send_inflight) mark_dirty(s);
  return true;
}

namespace {
// Size of the kernel's crypto_info struct that starts at p, 0 if the
// engine does not know its cipher or TLS version.
size_t crypto_info_len(const void *p) {
  tls_crypto_info head{};
  memcpy(&head, p, sizeof head);
  size_t len = 0;
  switch (head.cipher_type) {
    case TLS_CIPHER_AES_GCM_128:
      len = sizeof(tls12_crypto_info_aes_gcm_128);
      break;
    case TLS_CIPHER_AES_GCM_256:
      len = sizeof(tls12_crypto_info_aes_gcm_256);
      break;
    case TLS_CIPHER_CHACHA20_POLY1305:
      len = sizeof(tls12_crypto_info_chacha20_poly1305);
      break;
    case TLS_CIPHER_AES_CCM_128:
      len = sizeof(tls12_crypto_info_aes_ccm_128);
      break;
    default:
      return 0;
  }
  if (head.version != TLS_1_2_VERSION && head.version != TLS_1_3_VERSION) return 0;
  return len;
}

// Whether OpenSSL reads TLS 1.3 records from a kernel-TLS BIO the way the
// engine frames them: the record layer of 3.0 and 3.1 takes a record of
// outer type 23 and its decrypted inner plaintext (content, type, padding)
// as kernel TLS would give it, and skips only the decryption. 3.2 rewrote
// the record layer. `v` is OpenSSL_version_num().
bool tls13_framing_known(unsigned long v) { return (v >> 28) == 3 && ((v >> 20) & 0xff) <= 1; }

// Whether SSL_free_buffers() refuses a buffer still in use: before OpenSSL
// 3.0.14, 3.1.6, 3.2.2 and 3.3.1 it could free a record header waiting for
// its body, or a record read only in part (CVE-2024-4741). `v` is
// OpenSSL_version_num() (0xMNN00PP0).
bool ssl_free_buffers_safe(unsigned long v) {
  unsigned long major = v >> 28;
  unsigned long minor = (v >> 20) & 0xff;
  unsigned long patch = (v >> 4) & 0xff;
  if (major != 3) return major > 3;
  switch (minor) {
    case 0:
      return patch >= 14;
    case 1:
      return patch >= 6;
    case 2:
      return patch >= 2;
    case 3:
      return patch >= 1;
    default:
      return true;
  }
}
}  // namespace

// OpenSSL offers the keys of one direction (kCtrlSetKtls). The socket gets
// TCP_ULP first (harmless without keys). Send side: the key waits for the
// bytes queued before it to go out (tls_apply_tx_key), and from here on
// OpenSSL writes plaintext. Receive side (TLS 1.2): taken only when nothing
// past the key has been read from the socket (exact reads make it so); the
// kernel decrypts from the next byte on.
bool Engine::tls_set_key(TlsState *t, bool tx, const void *crypto_info) {
  Stream *s = t->s;
  if (s->finished || s->aborting || t->failed) return false;
  if (t->seal_ok) return tx ? tls_seal_key(t, crypto_info) : tls_open_key(t, crypto_info);
  if (!t->ktls_ok || ktls_ulp_missing_) return false;
  size_t len = crypto_info_len(crypto_info);
  if (len == 0 || len > sizeof t->tx_key) return false;
  if (tx ? (t->tx_offload || s->write_failed)
         : (!t->rx_capable || t->rx_offload || !t->in.empty() || s->recv_armed || s->read_done))
    return false;  // receive side: a byte after the key already left the socket
  if (!t->ulp_set) {
    if (setsockopt(s->fd, SOL_TCP, TCP_ULP, "tls", sizeof "tls") < 0) {
      if (errno == ENOENT) ktls_ulp_missing_ = true;  // no TLS in this kernel: stop asking
      return false;
    }
    t->ulp_set = true;
  }
  if (!tx) {
    if (setsockopt(s->fd, SOL_TLS, TLS_RX, crypto_info, static_cast<socklen_t>(len)) < 0)
      return false;  // OpenSSL goes on in user space: nothing was read past the key
    t->rx_offload = true;
    return true;
  }
  if (!t->marks.push_back(TlsMark{t->appended, t->appended, 0})) return false;
  memcpy(t->tx_key, crypto_info, len);
  t->tx_key_len = static_cast<uint32_t>(len);
  t->tx_offload = true;
  mark_dirty(s);
  return true;
}

// The send key OpenSSL offered, for the engine's sealer (no TLS in the
// kernel). The TLS 1.3 traffic secret from the key log goes with it and
// leaves the stream either way.
bool Engine::tls_seal_key(TlsState *t, const void *crypto_info) {
  Stream *s = t->s;
  size_t len = crypto_info_len(crypto_info);
  bool ok = false;
  if (len && !t->seal && !s->write_failed) {
    auto *seal = new (std::nothrow) RecordCipher(RecordCipher::kSeal);
    ok = seal && seal->init(crypto_info, len, t->ssl, t->tx_secret, t->tx_secret_len);
    if (ok) {
      t->seal = seal;
      t->tx_offload = true;  // OpenSSL hands the BIO plaintext from here on
    } else {
      delete seal;
    }
  }
  OPENSSL_cleanse(t->tx_secret, sizeof t->tx_secret);
  t->tx_secret_len = 0;
  return ok;  // false: OpenSSL goes on encrypting itself
}

// The receive key OpenSSL offered (TLS 1.2, at the peer's
// ChangeCipherSpec), for the engine's opener: OpenSSL reads exactly the
// records it needs (no read-ahead), so the next byte in `in` starts the
// first record under the key. From here on OpenSSL reads framed plaintext
// (rx_ctl). False: OpenSSL goes on decrypting itself.
bool Engine::tls_open_key(TlsState *t, const void *crypto_info) const {
  size_t len = crypto_info_len(crypto_info);
  if (len == 0 || t->open || buf_size_ < kTlsHsBuf || SSL_get_read_ahead(t->ssl)) return false;
  auto *o = new (std::nothrow) RecordCipher(RecordCipher::kOpen);
  if (!o || !o->init(crypto_info, len, t->ssl, t->rx_secret, t->rx_secret_len)) {
    delete o;
    return false;
  }
  t->open = o;
  return true;
}

// TLS 1.3, the handshake just ended: OpenSSL 3.0 offers no receive key,
// but the peer's traffic secret came through the key log. The engine opens
// the records from here on if OpenSSL holds none of their bytes (it read
// exactly the handshake's last record). The secret leaves the stream
// either way.
void Engine::tls_open13(Stream *s) const {
  TlsState *t = s->tls;
  if (t->seal && !t->open && t->rx_secret_len && buf_size_ >= kTlsHsBuf &&
      SSL_version(t->ssl) == TLS1_3_VERSION && !SSL_has_pending(t->ssl) &&
      !SSL_get_read_ahead(t->ssl) && tls13_framing_known(OpenSSL_version_num())) {
    auto *o = new (std::nothrow) RecordCipher(RecordCipher::kOpen);
    if (o && o->init13(t->ssl, t->rx_secret, t->rx_secret_len))
      t->open = o;
    else
      delete o;
  }
  OPENSSL_cleanse(t->rx_secret, sizeof t->rx_secret);
  t->rx_secret_len = 0;
}

// Seals `len` bytes of content type `type` into the write queue, in
// records of at most kSealRecordMax bytes, each written where it will be
// sent from (no copy after encrypting).
bool Engine::tls_seal(Stream *s, uint8_t type, const void *buf, size_t len) {
  TlsState *t = s->tls;
  const auto *p = static_cast<const unsigned char *>(buf);
  do {
    size_t n = len < kSealRecordMax ? len : kSealRecordMax;
    auto *out = reinterpret_cast<unsigned char *>(s->wq.tail(n + kSealOverhead, &wblocks_));
    size_t rec = out ? t->seal->seal(type, p, n, out) : 0;
    if (rec == 0) {
      // Records of this write may be queued already: the stream cannot go
      // on (as when OpenSSL's write fails).
      if (!t->failed) {
        tls_fail(s, out ? -EPROTO : -ENOMEM, 0, false, KLOOP_ERROR_WRITE);
        copy_text(t->err.message, sizeof t->err.message,
                  out ? "sealing a TLS record failed" : "no memory for a TLS record");
      }
      return false;
    }
    s->wq.grow(rec);
    t->appended += rec;
    p += n;
    len -= n;
  } while (len > 0);
  if (!s->send_inflight) mark_dirty(s);
  return true;
}

// Before a send: install the send key once everything queued before it
// has gone out. Returns false when the stream failed.
bool Engine::tls_apply_tx_key(Stream *s) {
  TlsState *t = s->tls;
  while (!t->marks.empty() && t->marks.front().type == 0 && t->consumed == t->marks.front().at) {
    int rc = setsockopt(s->fd, SOL_TLS, TLS_TX, t->tx_key, t->tx_key_len);
    int e = errno;
    OPENSSL_cleanse(t->tx_key, sizeof t->tx_key);
    t->marks.pop_front();
    if (rc < 0) {
      tls_fail(s, -e, 0, t->handshaking, KLOOP_ERROR_WRITE);
      copy_text(t->err.message, sizeof t->err.message, "setsockopt(SOL_TLS, TLS_TX) failed");
      s->write_failed = true;
      wq_clear(s);
      return false;
    }
    t->tx_applied = true;
  }
  return true;
}

// The send SQE of a stream with marks: plain bytes up to the next mark, or
// one control record with its content type in a cmsg. False: no marks,
// the ordinary gathered sendmsg applies.
bool Engine::tls_prep_send(Stream *s, io_uring_sqe *sqe) {
  TlsState *t = s->tls;
  while (!t->marks.empty() && t->marks.front().type != 0 && t->consumed >= t->marks.front().end)
    t->marks.pop_front();
  if (t->marks.empty()) return false;
  const TlsMark &m = t->marks.front();
  msghdr &msg = t->tx_msg;
  msg = {};
  size_t limit = 0;
  if (t->consumed < m.at) {
    limit = m.at - t->consumed;
  } else {
    limit = m.end - t->consumed;
    memset(t->cmsg, 0, sizeof t->cmsg);
    auto *c = reinterpret_cast<cmsghdr *>(t->cmsg);
    c->cmsg_level = SOL_TLS;
    c->cmsg_type = TLS_SET_RECORD_TYPE;
    c->cmsg_len = CMSG_LEN(1);
    *CMSG_DATA(c) = static_cast<unsigned char>(m.type);
    msg.msg_control = t->cmsg;
    msg.msg_controllen = CMSG_SPACE(1);
  }
  iovec *iov = nullptr;
  int n = send_iov(s, limit, &iov);
  msg.msg_iov = iov;
  msg.msg_iovlen = static_cast<size_t>(n);
  io_uring_prep_sendmsg(sqe, s->fd, &msg, MSG_NOSIGNAL);
  return true;
}

uint16_t Engine::tls_recv_mode(const Stream *s) {
  const TlsState *t = s->tls;
  if (!t || t->failed) return 0;
  if (t->rx_offload) return kOpTlsRecvmsg;
  if (t->rx_capable && t->handshaking) return kOpTlsExact;
  return 0;
}

// The receive SQE of a TLS stream in a special mode: an exact read into a
// TLS buffer (taken by arm_recv, in recv.bid), or a recvmsg of one kernel
// TLS record into a receive buffer with its type in a cmsg. False: the
// ordinary receive applies.
bool Engine::tls_prep_recv(Stream *s, io_uring_sqe *sqe) {
  TlsState *t = s->tls;
  OpHead *op = &s->recv;
  op->state &= static_cast<uint16_t>(~(kOpTlsExact | kOpTlsRecvmsg));
  uint16_t mode = tls_recv_mode(s);
  if (mode == kOpTlsExact) {
    uint32_t len = t->want < buf_size_ ? t->want : buf_size_;
    io_uring_prep_recv(sqe, s->fd, buf_addr(op->bid), len, 0);
  } else if (mode == kOpTlsRecvmsg) {
    t->rx_iov = iovec{nullptr, buf_size_};
    t->rx_msg = {};
    t->rx_msg.msg_iov = &t->rx_iov;
    t->rx_msg.msg_iovlen = 1;
    memset(t->rx_cmsg, 0, sizeof t->rx_cmsg);
    t->rx_msg.msg_control = t->rx_cmsg;
    t->rx_msg.msg_controllen = sizeof t->rx_cmsg;
    io_uring_prep_recvmsg(sqe, s->fd, &t->rx_msg, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 0;
  } else {
    return false;
  }
  op->state |= mode;
  return true;
}

// Completion of a receive armed by tls_prep_recv. Both kinds are one-shot.
bool Engine::tls_recv_cqe(Stream *s, OpHead *op, int res, uint32_t cflags) {
  TlsState *t = s->tls;
  bool exact = op->state & kOpTlsExact;
  op->state &= static_cast<uint16_t>(~(kOpTlsExact | kOpTlsRecvmsg));
  bool cancelled = s->recv_cancel;
  s->recv_armed = false;
  s->recv_cancel = false;
  int32_t bid = -1;
  if (exact) {
    bid = static_cast<int32_t>(op->bid);  // a TLS buffer
  } else if (cflags & IORING_CQE_F_BUFFER) {
    bid = static_cast<int32_t>(cflags >> IORING_CQE_BUFFER_SHIFT);
    took_ring_buffer();
  }
  if (!t || s->finished) {
    if (bid >= 0) recycle(static_cast<uint32_t>(bid));
    return true;
  }
  if (res > 0 && exact) {
    tls_input(s, bid, 0, static_cast<uint32_t>(res));
  } else if (res > 0) {
    uint8_t type = record_type_of(&t->rx_msg);
    if (type == 23) {
      emit(s->token, res, KLOOP_COMPLETION_MORE,
           reinterpret_cast<uint64_t>(buf_addr(static_cast<uint32_t>(bid))), KLOOP_EVENT_DATA, 0,
           bid, s);
    } else {
      // For OpenSSL, framed as its kernel TLS record reader expects.
      bool ok =
          t->rx_ctl.push(type, buf_addr(static_cast<uint32_t>(bid)), static_cast<uint32_t>(res));
      recycle(static_cast<uint32_t>(bid));
      if (!ok)
        tls_fail(s, -EPROTO, 0, t->handshaking, KLOOP_ERROR_READ);
      else
        tls_pump(s);
    }
  } else {
    if (bid >= 0) recycle(static_cast<uint32_t>(bid));
    if (res == 0) {
      if (!s->read_done) tls_socket_eof(s);
    } else if (res == -ENOBUFS) {
      ++st_.enobufs;
      add_starved(s);
    } else if (res == -ECANCELED && cancelled) {
      // re-armed below in the mode the stream needs now
    } else if (res == -EBADMSG || res == -EMSGSIZE || res == -EIO) {
      // The kernel could not decrypt or frame a record.
      if (!t->failed) {
        tls_fail(s, -EPROTO, 0, t->handshaking, KLOOP_ERROR_READ);
        (void)snprintf(t->err.message, sizeof t->err.message, "kernel TLS receive failed: %s",
                       strerror(-res));
      }
    } else if (!s->read_done) {
      tls_socket_error(s, res);
    }
  }
  progress(s);
  return true;
}

void Engine::tls_sent(Stream *s, size_t n) {
  TlsState *t = s->tls;
  t->consumed += n;
  while (!t->marks.empty() && t->marks.front().type != 0 && t->consumed >= t->marks.front().end)
    t->marks.pop_front();
}

// ---------------------------------------------------------------------------
// Buffers

int Engine::take_tls_buffer() {
  if (tls_free_.empty()) return -1;
  uint32_t bid = tls_free_.back();
  tls_free_.pop_back();
  trim_taken(tls_trim_, tls_free_.size());
  ++tls_in_use_;
  return static_cast<int>(bid);
}

void Engine::tls_unstarve() {
  Stream *s = tls_starved_;
  tls_starved_ = nullptr;
  while (s) {
    Stream *next = s->tls->next_starved;
    s->tls->next_starved = nullptr;
    s->tls->starved = false;
    tls_pump(s);  // may put it back on the list
    progress(s);
    s = next;
  }
}

// ---------------------------------------------------------------------------
// Starting TLS

int Engine::stream_start_tls(uint64_t token, void *ssl_ptr) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (s->tls) return -EALREADY;
  if (s->flags & (KLOOP_STREAM_FILE | KLOOP_STREAM_NO_READ)) return -EOPNOTSUPP;
  if (s->closing || s->aborting || s->finished || s->shut_req) return -EPIPE;

  // Read records not yet returned become the start of the TLS byte stream.
  bool eof_seen = false;
  int err_seen = 0;
  size_t waiting = s->held.size();
  for (size_t i = 0; i < pending_.size(); ++i) {
    const Pending &p = pending_.at(i);
    if (p.stream == s && p.rec.event == KLOOP_EVENT_DATA) ++waiting;
  }
  if (s->read_done) {
    // Reading ended: fine only if that end is still on its way to the caller.
    bool end_queued = false;
    auto is_end = [&](const Pending &p) {
      return p.stream == s && (p.rec.event == KLOOP_EVENT_EOF || p.rec.event == KLOOP_EVENT_ERROR);
    };
    for (size_t i = 0; i < s->held.size(); ++i) end_queued |= is_end(s->held.at(i));
    for (size_t i = 0; i < pending_.size(); ++i) end_queued |= is_end(pending_.at(i));
    if (!end_queued) return -EPIPE;
  }
  pthread_once(&g_bio_once, make_bio_method);
  if (!g_bio_method) return -ENOMEM;
  if (!reserve_records(tls_buf_count_ + 4)) return -ENOMEM;

  auto *t = new (std::nothrow) TlsState;
  if (!t) return -ENOMEM;
  if (!t->in.reserve(waiting + 4)) {
    delete t;
    return -ENOMEM;
  }
  BIO *bio = BIO_new(g_bio_method);
  if (!bio) {
    delete t;
    return -ENOMEM;
  }
  SSL *ssl = static_cast<SSL *>(ssl_ptr);
  if (!SSL_up_ref(ssl)) {
    BIO_free(bio);
    delete t;
    return -EINVAL;
  }
  // With SSL_MODE_RELEASE_BUFFERS (Python's ssl contexts set it) OpenSSL
  // frees a connection's record buffers, about 17 KiB each way, after every
  // SSL_read() and SSL_write() that empties them, and allocates them again
  // for the next: a malloc and a free per record on a busy stream (1,600 of
  // the 37,000 instructions of a 1 KiB TLS 1.3 echo). The engine clears the
  // mode on this SSL and frees the buffers itself once the stream has been
  // idle for a trim period (tls_trim()).
  if ((SSL_get_mode(ssl) & SSL_MODE_RELEASE_BUFFERS) &&
      ssl_free_buffers_safe(OpenSSL_version_num())) {
    SSL_clear_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
    t->own_buffers = true;
  }
  t->eng = this;
  t->s = s;
  t->ssl = ssl;
  t->bio = bio;
  t->appended = s->wq.size();  // plain bytes queued before TLS go first
  if ((enabled_ & KLOOP_CAP_KTLS) && !ktls_ulp_missing_) {
    SSL_set_options(ssl, SSL_OP_ENABLE_KTLS);
    t->ktls_ok = true;
    t->rx_capable = (enabled_ & KLOOP_CAP_BUF_RING) != 0;
  } else if (!no_tls_seal_) {
    // No TLS in the kernel: the send key OpenSSL offers a kernel-TLS BIO
    // goes to the engine's sealer. TLS 1.3 needs the traffic secret too
    // (key updates), from the context's key log if nobody else uses it.
    SSL_set_options(ssl, SSL_OP_ENABLE_KTLS);
    t->seal_ok = true;
    SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
    if (ctx && !SSL_CTX_get_keylog_callback(ctx)) SSL_CTX_set_keylog_callback(ctx, keylog_line);
  }
  BIO_set_data(bio, t);
  SSL_set_bio(ssl, bio, bio);  // one reference, now the SSL's
  s->tls = t;

  auto take = [&](const Pending &p) {
    if (p.rec.event == KLOOP_EVENT_DATA) {
      auto *base = buf_addr(static_cast<uint32_t>(p.bid));
      auto off = static_cast<uint32_t>(reinterpret_cast<char *>(p.rec.data) - base);
      t->in.push_back(TlsChunk{p.bid, off, static_cast<uint32_t>(p.rec.result)});
    } else if (p.rec.event == KLOOP_EVENT_EOF) {
      eof_seen = true;
    } else if (p.rec.event == KLOOP_EVENT_ERROR && !err_seen) {
      err_seen = p.rec.result;
    }
  };
  while (!s->held.empty()) {
    take(s->held.front());
    s->held.pop_front();
  }
  pending_.partition(
      [&](const Pending &p) {
        return !(p.stream == s &&
                 (p.rec.event == KLOOP_EVENT_DATA || p.rec.event == KLOOP_EVENT_EOF ||
                  p.rec.event == KLOOP_EVENT_ERROR));
      },
      take);
  if (err_seen) {
    tls_fail(s, err_seen, 0, true, KLOOP_ERROR_READ);
  } else {
    if (eof_seen) t->in_eof = true;
    tls_pump(s);  // a client writes its hello now
  }
  progress(s);
  return 0;
}

void Engine::tls_input(Stream *s, int32_t bid, uint32_t off, uint32_t len) {
  TlsState *t = s->tls;
  if (t->failed || t->peer_closed || !t->in.push_back(TlsChunk{bid, off, len})) {
    recycle(static_cast<uint32_t>(bid));  // nobody will read it (or no memory: fail)
    if (!t->failed && !t->peer_closed) tls_fail(s, -ENOMEM, 0, t->handshaking, KLOOP_ERROR_READ);
    return;
  }
  tls_pump(s);
}

void Engine::tls_socket_eof(Stream *s) {
  s->read_done = true;
  s->tls->in_eof = true;
  tls_pump(s);
}

void Engine::tls_socket_error(Stream *s, int err) {
  s->read_done = true;
  TlsState *t = s->tls;
  if (t->failed) return;
  tls_fail(s, err, 0, t->handshaking, KLOOP_ERROR_READ);
}

// Record why TLS failed (from OpenSSL's error queue when ssl_error is set)
// and report it: as the handshake's result, or as a read/write error.
void Engine::tls_fail(Stream *s, int err, int ssl_error, bool handshake, uint32_t side) {
  TlsState *t = s->tls;
  if (t->failed) {  // reported once; the first reason stays
    clear_ssl_errors();
    return;
  }
  if (ssl_error) {
    kloop_tls_error &e = t->err;
    e = kloop_tls_error{};
    e.size = sizeof(e);
    e.ssl_error = ssl_error;
    unsigned long code = ERR_peek_last_error();
    e.lib = ERR_GET_LIB(code);
    e.reason = ERR_GET_REASON(code);
    copy_text(e.message, sizeof(e.message), code ? ERR_reason_error_string(code) : "");
    if (t->ssl) {
      long v = SSL_get_verify_result(t->ssl);
      e.verify_result = v;
      if (v != X509_V_OK)
        copy_text(e.verify_message, sizeof(e.verify_message), X509_verify_cert_error_string(v));
    }
  }
  clear_ssl_errors();
  t->failed = true;
  t->pt.clear(&wblocks_);
  tls_drop_stage(t);
  s->read_done = true;
  if (handshake) {
    t->handshaking = false;
    if (!s->aborting) emit(s->token, err, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_HANDSHAKE, 0);
  } else if (!s->aborting && !s->closing) {
    emit(s->token, err, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_ERROR, side | KLOOP_ERROR_TLS, -1,
         side == KLOOP_ERROR_READ ? s : nullptr);
  }
}

// ---------------------------------------------------------------------------
// Moving data

bool Engine::tls_encrypt(Stream *s, const void *buf, size_t len) {
  TlsState *t = s->tls;
  // Sealed by the engine unless OpenSSL has a message of its own to send
  // first (a key update the peer asked for, a post-handshake request):
  // SSL_write() sends it, and the data after it, through the BIO.
  if (t->seal && SSL_is_init_finished(t->ssl) &&
      SSL_get_key_update_type(t->ssl) == SSL_KEY_UPDATE_NONE)
    return tls_seal(s, 23, buf, len);
  tls_touch(s);
  const char *p = static_cast<const char *>(buf);
  while (len > 0) {
    int n = len > (1u << 30) ? (1 << 30) : static_cast<int>(len);
    clear_ssl_errors();
    int r = SSL_write(t->ssl, p, n);
    if (r <= 0) {
      tls_fail(s, -EPROTO, SSL_get_error(t->ssl, r), false, KLOOP_ERROR_WRITE);
      return false;
    }
    p += r;
    len -= static_cast<size_t>(r);
  }
  return true;
}

// Adds a small write to the stream's staged plaintext (at most
// kTlsRecordMax in all), in a write-pool block: a small block first, a
// standard one once that is full.
bool Engine::tls_stage(TlsState *t, const void *buf, size_t len) {
  size_t need = t->stage_len + len;
  if (need > t->stage_cap) {
    size_t cap = need;
    char *b = wblocks_.take(&cap);
    if (!b) return false;
    if (t->stage_len) memcpy(b, t->stage, t->stage_len);
    if (t->stage) wblocks_.give(t->stage, t->stage_cap);
    t->stage = b;
    t->stage_cap = cap;
  }
  memcpy(t->stage + t->stage_len, buf, len);
  t->stage_len = need;
  return true;
}

void Engine::tls_drop_stage(TlsState *t) {
  if (t->stage) wblocks_.give(t->stage, t->stage_cap);
  t->stage = nullptr;
  t->stage_len = t->stage_cap = 0;
}

// Encrypts the plaintext waiting in TlsState::pt (written during the
// handshake) in records of up to kTlsRecordMax, then the staged small
// writes of the last iteration as one record: the pieces of several writes
// share a record. False when TLS failed (reported) or on ENOMEM.
bool Engine::tls_flush_pt(Stream *s) {
  TlsState *t = s->tls;
  while (t->pt.size()) {
    iovec iov[kMaxIov];
    int n = t->pt.fill_iov(iov, kMaxIov, kTlsRecordMax);
    const void *p = iov[0].iov_base;
    size_t len = iov[0].iov_len;
    char joined[kTlsRecordMax];
    if (n > 1) {
      len = 0;
      for (int i = 0; i < n; ++i) {
        memcpy(joined + len, iov[i].iov_base, iov[i].iov_len);
        len += iov[i].iov_len;
      }
      p = joined;
    }
    if (!tls_encrypt(s, p, len)) return false;
    encrypted_unsent_ += len;
    t->pt.consume(len, &wblocks_);
  }
  if (t->stage_len) {
    // Taken off the stream first: a failure inside drops what TLS holds.
    char *block = t->stage;
    size_t len = t->stage_len;
    size_t cap = t->stage_cap;
    t->stage = nullptr;
    t->stage_len = t->stage_cap = 0;
    bool ok = tls_encrypt(s, block, len);
    wblocks_.give(block, cap);
    if (!ok) return false;
    encrypted_unsent_ += len;
  }
  return true;
}

// Advance TLS as far as the data at hand allows: the handshake, then
// plaintext into TLS buffers as DATA records (unless paused), or, while a
// graceful close waits, reading up to the peer's close_notify.
void Engine::tls_pump(Stream *s) {
  TlsState *t = s->tls;
  if (!t || t->failed || s->finished || s->aborting || !t->ssl) return;
  tls_touch(s);
  if (t->handshaking) {
    if (s->closing) return;  // closed before it was over: no TLS any more
    for (;;) {
      clear_ssl_errors();
      int r = SSL_do_handshake(t->ssl);
      if (r == 1) break;
      int e = SSL_get_error(t->ssl, r);
      if (e == SSL_ERROR_WANT_READ && t->open) {
        // TLS 1.2 after the peer's ChangeCipherSpec: its Finished is for
        // the engine to open.
        int opened = tls_open(s, false);
        if (opened < 0) return;
        if (opened > 0) continue;
      }
      if (e == SSL_ERROR_WANT_READ && !t->in_eof) return;  // wait for the peer
      bool reset = t->in_eof && t->in.empty() && e != SSL_ERROR_SSL;
      if (t->in_eof && t->in.empty() && e == SSL_ERROR_SSL &&
          ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
        reset = true;
      tls_fail(s, reset ? -ECONNRESET : -EPROTO, e, true, 0);
      return;
    }
    t->handshaking = false;
    tls_open13(s);
    uint32_t offload = (t->tx_offload && !t->seal ? KLOOP_HANDSHAKE_KTLS_TX : 0u) |
                       (t->rx_offload ? KLOOP_HANDSHAKE_KTLS_RX : 0u);
    emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_HANDSHAKE, offload);
    if (!tls_flush_pt(s)) return;  // plaintext written during the handshake
  }
  if (t->peer_closed || (s->paused && !s->closing)) return;
  // Closing: read on until the peer's close_notify, dropping the plaintext.
  bool drop = s->closing;
  for (;;) {
    if (t->open) {
      // The engine opens the records; OpenSSL reads those that are not
      // application data, each before the records after it are opened.
      int opened = tls_open(s, drop);
      if (opened < 0 || (opened == 0 && !t->in_eof)) return;
    }
    // Receiving offloaded: data went out as DATA already; OpenSSL only
    // sees the other records, and the end of the stream.
    if (t->rx_offload && t->rx_ctl.empty() && !t->in_eof) return;
    if (!tls_read(s, drop) || !t->open) return;
  }
}

// Opens the records waiting in TlsState::in with the engine's receive key:
// application data is decrypted straight from the receive buffers into a
// TLS buffer (several records share one) and goes out as DATA records;
// any other record is framed into rx_ctl for OpenSSL, which must read it
// before the records after it are opened. Returns 1 when
// a record waits for OpenSSL, 0 when no complete record is left (at the
// end of the stream the piece of one is dropped), -1 when the stream
// failed or waits for a TLS buffer.
int Engine::tls_open(Stream *s, bool drop) {
  TlsState *t = s->tls;
  RecordCipher *o = t->open;
  const bool tls13 = o->tls13();
  int bid = -1;
  unsigned char *dst = nullptr;
  size_t filled = 0;
  auto flush = [&] {
    if (bid < 0) return;
    if (filled && !drop)
      emit(s->token, static_cast<int32_t>(filled), KLOOP_COMPLETION_MORE,
           reinterpret_cast<uint64_t>(dst), KLOOP_EVENT_DATA, 0, bid, s);
    else
      recycle(static_cast<uint32_t>(bid));
    bid = -1;
    filled = 0;
  };
  auto fail = [&](int alert, int reason) {
    flush();  // what came before the bad record is the peer's
    tls_fail_record(s, alert, reason);
    return -1;
  };
  auto bytes = [&](const TlsChunk &c) {
    return (c.bid < 0 ? t->part
                      : reinterpret_cast<unsigned char *>(buf_addr(static_cast<uint32_t>(c.bid)))) +
           c.off;
  };
  // `len` bytes from `at` bytes into `in`, copied to `out`
  auto peek = [&](size_t at, size_t len, unsigned char *out) {
    for (size_t i = 0; len > 0; ++i) {
      const TlsChunk &c = t->in.at(i);
      if (at >= c.len) {
        at -= c.len;
        continue;
      }
      size_t n = c.len - at < len ? c.len - at : len;
      memcpy(out, bytes(c) + at, n);
      out += n;
      len -= n;
      at = 0;
    }
  };
  for (;;) {
    size_t avail = 0;
    for (size_t i = 0; i < t->in.size(); ++i) avail += t->in.at(i).len;
    if (avail < 5) break;
    unsigned char head[5];
    peek(0, 5, head);
    size_t body = (static_cast<size_t>(head[3]) << 8) | head[4];
    // TLS 1.2: under the new key only the peer's Finished may come before
    // the handshake's end.
    if (t->handshaking && head[0] == 23)
      return fail(SSL_AD_UNEXPECTED_MESSAGE, SSL_R_UNEXPECTED_RECORD);
    // The checks OpenSSL makes of a record header (RFC 8446 5.1, 5.2; RFC
    // 5246 6.2), with its alerts and reasons.
    if (head[1] != 3 || head[2] != 3)
      return fail(SSL_AD_PROTOCOL_VERSION, SSL_R_WRONG_VERSION_NUMBER);
    if (tls13 && head[0] != 23) return fail(SSL_AD_UNEXPECTED_MESSAGE, SSL_R_BAD_RECORD_TYPE);
    if (body > (tls13 ? 16384 + 256 : 16384 + 2048))
      return fail(SSL_AD_RECORD_OVERFLOW, SSL_R_ENCRYPTED_LENGTH_TOO_LONG);
    if (body < o->prefix() + RecordCipher::kTag + (tls13 ? 1 : 0))
      return fail(SSL_AD_BAD_RECORD_MAC, SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC);
    if (avail < 5 + body) break;
    size_t ct_len = body - o->prefix() - RecordCipher::kTag;
    if (bid >= 0 && buf_size_ - filled < ct_len) flush();
    if (bid < 0) {
      bid = take_tls_buffer();
      if (bid < 0) {
        tls_wait_buffer(s);
        return -1;
      }
      dst = reinterpret_cast<unsigned char *>(buf_addr(static_cast<uint32_t>(bid)));
    }
    unsigned char nonce[8];
    unsigned char tag[RecordCipher::kTag];
    if (o->prefix()) peek(5, sizeof nonce, nonce);
    peek(5 + body - sizeof tag, sizeof tag, tag);
    unsigned char *p = dst + filled;
    bool ok = o->begin(head, nonce);
    size_t at = 5 + o->prefix();
    size_t done = 0;
    for (size_t i = 0; ok && done < ct_len; ++i) {  // the ciphertext, piece by piece
      const TlsChunk &c = t->in.at(i);
      if (at >= c.len) {
        at -= c.len;
        continue;
      }
      size_t n = c.len - at < ct_len - done ? c.len - at : ct_len - done;
      ok = o->update(bytes(c) + at, n, p + done);
      done += n;
      at = 0;
    }
    ok = ok && o->finish(tag);
    for (size_t left = 5 + body; left > 0;) {  // the record leaves `in`
      TlsChunk &c = t->in.front();
      size_t n = c.len < left ? c.len : left;
      c.off += static_cast<uint32_t>(n);
      c.len -= static_cast<uint32_t>(n);
      left -= n;
      if (c.len == 0) {
        if (c.bid >= 0) recycle(static_cast<uint32_t>(c.bid));
        t->in.pop_front();
      }
    }
    if (!ok) return fail(SSL_AD_BAD_RECORD_MAC, SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC);
    uint8_t type = head[0];
    size_t plain = ct_len;
    if (tls13) {  // the content type follows the content, then zeros
      while (plain > 0 && p[plain - 1] == 0) --plain;
      if (plain == 0) return fail(SSL_AD_UNEXPECTED_MESSAGE, SSL_R_BAD_RECORD_TYPE);
      type = p[--plain];
    }
    if (plain > 16384) return fail(SSL_AD_RECORD_OVERFLOW, SSL_R_DATA_LENGTH_TOO_LONG);
    if (type == 23) {
      if (plain) {
        filled += plain;
        t->empty_records = 0;
      } else if (++t->empty_records > 32) {  // OpenSSL's limit on empty records in a row
        return fail(SSL_AD_UNEXPECTED_MESSAGE, SSL_R_RECORD_TOO_SMALL);
      }
      continue;
    }
    // For OpenSSL, framed as kernel TLS gives it; TLS 1.3 keeps the type
    // behind the content under an outer type 23 (OpenSSL takes it from there).
    bool key_update = tls13 && type == 22 && o->key_update_in(p, plain);
    bool queued = tls13 ? t->rx_ctl.push(23, p, static_cast<uint32_t>(plain + 1))
                        : t->rx_ctl.push(type, p, static_cast<uint32_t>(plain));
    flush();
    if (!queued) {
      tls_fail(s, -ENOMEM, 0, t->handshaking, KLOOP_ERROR_READ);
      return -1;
    }
    if (key_update && !o->update_key()) {
      tls_fail(s, -EPROTO, 0, false, KLOOP_ERROR_READ);
      copy_text(t->err.message, sizeof t->err.message, "TLS 1.3 key update failed");
      return -1;
    }
    return 1;
  }
  flush();
  if (t->in_eof) {
    // The stream ended inside a record: OpenSSL sees the end (unclean).
    tls_drop_input(t);
  } else if (!t->in.empty() && (t->in.size() > 1 || t->in.front().bid >= 0)) {
    // The start of a record waits for the rest: out of the receive
    // buffers, into the stream's own (as OpenSSL's reading would).
    if (!t->part) t->part = static_cast<unsigned char *>(::operator new(kTlsHsBuf, std::nothrow));
    if (t->part) {
      size_t n = 0;
      while (!t->in.empty()) {  // at most kTlsHsBuf - 1 bytes: less than a record
        TlsChunk c = t->in.front();
        t->in.pop_front();
        memmove(t->part + n, bytes(c), c.len);
        n += c.len;
        if (c.bid >= 0) recycle(static_cast<uint32_t>(c.bid));
      }
      t->in.push_back(TlsChunk{-1, 0, static_cast<uint32_t>(n)});  // room: just emptied
    }
  }
  return 0;
}

// Gives back the receive buffers of the ciphertext waiting in `in`.
void Engine::tls_drop_input(TlsState *t) {
  while (!t->in.empty()) {
    int32_t bid = t->in.front().bid;
    if (bid >= 0) recycle(static_cast<uint32_t>(bid));
    t->in.pop_front();
  }
}

// A received record the engine cannot take: the fatal alert OpenSSL would
// send (sealed, when the engine seals), and the error as OpenSSL reports it.
void Engine::tls_fail_record(Stream *s, int alert, int reason) {
  TlsState *t = s->tls;
  if (t->failed) return;
  if (t->seal && !s->write_failed) {
    const unsigned char rec[2] = {2, static_cast<unsigned char>(alert)};  // fatal
    if (!tls_seal(s, 21, rec, sizeof rec)) return;  // failed the stream already
  }
  tls_fail(s, -EPROTO, 0, t->handshaking, KLOOP_ERROR_READ);
  kloop_tls_error &e = t->err;
  e = kloop_tls_error{};
  e.size = sizeof e;
  e.ssl_error = SSL_ERROR_SSL;
  e.lib = ERR_LIB_SSL;
  e.reason = reason;
  copy_text(e.message, sizeof e.message, ERR_reason_error_string(ERR_PACK(ERR_LIB_SSL, 0, reason)));
}

// OpenSSL's reading: plaintext into TLS buffers as DATA records, the
// peer's close_notify, alerts and the end of the stream. True when OpenSSL
// waits for more of the peer's bytes (and more may come).
bool Engine::tls_read(Stream *s, bool drop) {
  TlsState *t = s->tls;
  for (;;) {
    int bid = take_tls_buffer();
    if (bid < 0) {
      tls_wait_buffer(s);
      return false;
    }
    char *dst = buf_addr(static_cast<uint32_t>(bid));
    size_t filled = 0;
    int e = SSL_ERROR_NONE;
    while (filled < buf_size_) {
      clear_ssl_errors();
      int n = SSL_read(t->ssl, dst + filled, static_cast<int>(buf_size_ - filled));
      if (n > 0) {
        filled += static_cast<size_t>(n);
        // All received ciphertext is in OpenSSL and none of it is left
        // there: the next SSL_read() could only ask for more. Skip that
        // call (an SSL_read, its BIO read and the error-queue check).
        if (t->in.empty() && !t->in_eof && !rx_framed(t) && !SSL_has_pending(t->ssl)) {
          e = SSL_ERROR_WANT_READ;
          break;
        }
        continue;
      }
      e = SSL_get_error(t->ssl, n);
      break;
    }
    if (filled && !drop) {
      emit(s->token, static_cast<int32_t>(filled), KLOOP_COMPLETION_MORE,
           reinterpret_cast<uint64_t>(dst), KLOOP_EVENT_DATA, 0, bid, s);
    } else {
      recycle(static_cast<uint32_t>(bid));
    }
    if (t->tx_offload && !t->seal && SSL_get_key_update_type(t->ssl) != SSL_KEY_UPDATE_NONE &&
        !t->failed) {
      // The peer asked for a TLS 1.3 key update: OpenSSL would answer and
      // change its own send key, the kernel would keep the old one, and
      // the peer could decrypt nothing after it. Fail cleanly instead.
      tls_fail(s, -EPROTO, 0, false, KLOOP_ERROR_WRITE);
      copy_text(t->err.message, sizeof t->err.message, kKeyUpdateText);
      s->write_failed = true;
      wq_clear(s);
      return false;
    }
    if (e == SSL_ERROR_NONE) continue;  // the buffer filled up: there may be more
    if (e == SSL_ERROR_WANT_READ) {
      // More to come, or records before the end still to be opened.
      if (!t->in_eof || (t->open && !t->in.empty())) return true;
      // The socket ended and OpenSSL wants more: the peer cut the stream.
      t->peer_closed = true;
      if (!drop)
        emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_EOF, KLOOP_EOF_UNCLEAN, -1, s);
      clear_ssl_errors();
      return false;
    }
    if (e == SSL_ERROR_ZERO_RETURN) {  // close_notify
      t->peer_closed = true;
      s->read_done = true;
      if (!drop) emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_EOF, 0, -1, s);
      return false;
    }
    unsigned long code = ERR_peek_last_error();
    if (t->in_eof && t->in.empty() &&
        (e == SSL_ERROR_SYSCALL ||
         (e == SSL_ERROR_SSL && ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING))) {
      t->peer_closed = true;
      s->read_done = true;
      if (!drop)
        emit(s->token, 0, KLOOP_COMPLETION_MORE, 0, KLOOP_EVENT_EOF, KLOOP_EOF_UNCLEAN, -1, s);
      clear_ssl_errors();
      return false;
    }
    tls_fail(s, -EPROTO, e, false, KLOOP_ERROR_READ);
    if (drop) t->peer_closed = true;  // nothing more will come: let the close go on
    return false;
  }
}

// A stream waits for a free TLS buffer (tls_unstarve() pumps it again).
void Engine::tls_wait_buffer(Stream *s) {
  TlsState *t = s->tls;
  if (t->starved) return;
  t->starved = true;
  t->next_starved = tls_starved_;
  tls_starved_ = s;
}

// The stream has finished: give back what TLS holds and let go of the SSL.
// The error record stays readable until the Stream is freed.
void Engine::tls_release(Stream *s) {
  TlsState *t = s->tls;
  if (!t) return;
  tls_drop_input(t);
  ::operator delete(t->part);
  t->part = nullptr;
  t->pt.clear(&wblocks_);
  tls_drop_stage(t);
  t->rx_ctl.clear();
  delete t->seal;
  t->seal = nullptr;
  delete t->open;
  t->open = nullptr;
  OPENSSL_cleanse(t->rx_secret, sizeof t->rx_secret);
  if (t->starved) {
    for (Stream **pp = &tls_starved_; *pp; pp = &((*pp)->tls->next_starved))
      if (*pp == s) {
        *pp = t->next_starved;
        break;
      }
    t->starved = false;
    t->next_starved = nullptr;
  }
  if (t->warm) tls_unwarm(s);
  if (t->ssl) {
    BIO_set_data(t->bio, nullptr);
    if (t->own_buffers) {  // as the caller had it, for whoever holds the SSL on
      SSL_set_mode(t->ssl, SSL_MODE_RELEASE_BUFFERS);
      SSL_free_buffers(t->ssl);  // refuses while a record is in them
    }
    SSL_free(t->ssl);
    t->ssl = nullptr;
  }
}

void Engine::tls_unwarm(Stream *s) {
  TlsState *t = s->tls;
  *t->prev_warm = t->next_warm;
  if (t->next_warm) t->next_warm->tls->prev_warm = t->prev_warm;
  t->next_warm = nullptr;
  t->prev_warm = nullptr;
  t->warm = false;
}

// Frees OpenSSL's record buffers of the TLS streams no SSL call touched
// since the last trim, at least kTrimAfterNs ago: what SSL_MODE_RELEASE_
// BUFFERS does after every call, done once a stream is idle. Buffers that
// hold part of a record stay (SSL_free_buffers() refuses); the stream's
// next SSL call puts it back on the list.
void Engine::tls_trim() {
  Stream *s = tls_warm_;
  while (s) {
    TlsState *t = s->tls;
    Stream *next = t->next_warm;
    if (t->used) {
      t->used = false;
    } else {
      SSL_free_buffers(t->ssl);
      if (t->part && t->in.empty()) {
        ::operator delete(t->part);
        t->part = nullptr;
      }
      tls_unwarm(s);
    }
    s = next;
  }
}

int Engine::stream_tls_error(uint64_t token, kloop_tls_error *out) {
  Stream *s = find_stream(token);
  if (!s) return -ENOENT;
  if (!s->tls) return -EINVAL;
  kloop_tls_error e = s->tls->err;
  e.size = out->size;
  memcpy(out, &e, sizeof(e));
  return 0;
}

}  // namespace kl

// ---------------------------------------------------------------------------

extern "C" int kloop_get_tls_info(struct kloop_tls_info *out) {
  if (!out || out->size < sizeof(struct kloop_tls_info)) return -EINVAL;
  uint32_t size = out->size;
  memset(out, 0, sizeof(*out));
  out->size = size;
  out->version_num = OpenSSL_version_num();
  auto *addr = reinterpret_cast<void *>(&SSL_new);
  out->ssl_new_addr = reinterpret_cast<uint64_t>(addr);
  Dl_info info{};
  if (dladdr(addr, &info) && info.dli_fname)
    kl::copy_text(out->libssl_path, sizeof(out->libssl_path), info.dli_fname);
  kl::copy_text(out->version_text, sizeof(out->version_text), OpenSSL_version(OPENSSL_VERSION));
  return 0;
}
