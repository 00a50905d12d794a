// TLS on engine streams: OpenSSL driven by the engine through a BIO of its
// own. Ciphertext arrives in receive buffers and waits in TlsState::in until
// OpenSSL reads it; what OpenSSL writes goes straight into the stream's
// write queue; plaintext is decrypted into the arena's TLS buffers and
// handed out as ordinary DATA records.
#pragma once

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include "engine.h"
#include "seal.h"

namespace kl {

// Empties this thread's OpenSSL error queue before an SSL call, so that
// SSL_get_error() judges that call alone. ERR_clear_error() walks and frees
// all 16 slots of the queue every time (5 % of a TLS 1.3 echo server's CPU
// at 1 KiB per message, in a perf profile); the queue is almost always
// empty, and ERR_peek_error() -- what SSL_get_error() consults -- says so
// cheaply.
inline void clear_ssl_errors() {
  if (ERR_peek_error() != 0) ERR_clear_error();
}

// Records the kernel received and decrypted that OpenSSL must see (alerts,
// handshake messages), each framed with the 5-byte TLS record header that
// OpenSSL's kernel-TLS record reader expects, and read back one record (or
// the rest of one) per read.
class RecordQueue {
 public:
  // false: no memory, or a payload no TLS record can carry
  bool push(uint8_t type, const void *payload, uint32_t len);
  // copies at most `len` bytes of the first record; 0 when empty
  size_t read(char *out, size_t len);
  bool empty() const { return lens_.empty(); }
  void clear() {
    bytes_.clear();
    lens_.clear();
  }

 private:
  ByteQueue bytes_;
  Fifo<uint32_t> lens_;  // bytes left of each record
};

// The TLS record type of what a kernel TLS recvmsg returned: the
// SOL_TLS/TLS_GET_RECORD_TYPE control message, application data (23)
// when there is none.
uint8_t record_type_of(const msghdr *m);

// Ciphertext received and not yet read by OpenSSL (or opened by the
// engine): a piece of a receive buffer, which is recycled once all of it
// has been read; bid -1: of TlsState::part.
struct TlsChunk {
  int32_t bid;
  uint32_t off;
  uint32_t len;
};

// A place in the write queue where sending must change once kernel TLS has
// the send key (offsets count bytes ever appended since start_tls): type 0
// = install the key when everything before `at` has been sent; else
// [at, end) is one record of that TLS content type, sent alone with a
// TLS_SET_RECORD_TYPE cmsg (alerts, handshake messages).
struct TlsMark {
  uint64_t at;
  uint64_t end;
  uint32_t type;
};

struct TlsState {
  Engine *eng = nullptr;
  Stream *s = nullptr;
  SSL *ssl = nullptr;  // our reference (SSL_up_ref), dropped by tls_release
  BIO *bio = nullptr;  // owned by ssl
  Fifo<TlsChunk> in;
  bool in_eof = false;  // the socket reached end of file
  ByteQueue pt;         // plaintext written before the handshake ended
  // Small writes since the last poll, in one write-pool block, encrypted
  // together at the poll (Engine::tls_stage(), Engine::tls_flush_pt());
  // freed with ::operator delete if the stream is deleted with it.
  char *stage = nullptr;
  size_t stage_len = 0;
  size_t stage_cap = 0;
  bool handshaking = true;   // HANDSHAKE not reported yet
  bool failed = false;       // no more TLS I/O: handshake failed or fatal error
  bool peer_closed = false;  // the peer's close_notify arrived
  bool sent_close = false;   // our close_notify is queued
  bool starved = false;      // on Engine::tls_starved_
  Stream *next_starved = nullptr;
  // OpenSSL's record buffers (Engine::tls_touch(), Engine::tls_trim()):
  // with own_buffers the engine, not SSL_MODE_RELEASE_BUFFERS, frees them.
  bool own_buffers = false;  // the mode was set; cleared on the SSL meanwhile
  bool used = false;         // an SSL call since the last idle trim
  bool warm = false;         // on Engine::tls_warm_
  Stream *next_warm = nullptr;
  Stream **prev_warm = nullptr;  // the pointer that points at this stream
  kloop_tls_error err{};

  // kernel TLS (receive side, TLS 1.2): during the handshake the engine
  // reads exactly what OpenSSL asks for, so that no byte after the peer's
  // ChangeCipherSpec has left the socket when the key goes to the kernel;
  // then recvmsg gives plaintext and the record type, and records other
  // than application data go to OpenSSL framed as it expects.
  bool rx_capable = false;  // may offload receiving: read exactly meanwhile
  bool rx_offload = false;  // the kernel has the receive key
  uint32_t want = 0;        // bytes OpenSSL asked for and did not get
  RecordQueue rx_ctl;       // non-data records for OpenSSL
  msghdr rx_msg{};          // the recvmsg of one kernel TLS record
  iovec rx_iov{};
  alignas(8) unsigned char rx_cmsg[64] = {};
  // kernel TLS (send side)
  bool ktls_ok = false;     // SSL_OP_ENABLE_KTLS set: OpenSSL may offer keys
  bool ulp_set = false;     // TCP_ULP "tls" is on the socket
  bool tx_offload = false;  // OpenSSL hands plaintext to the BIO now
  bool tx_applied = false;  // the kernel has the send key
  uint32_t ctrl_type = 0;   // the next BIO write is a record of this type
  uint64_t appended = 0;    // bytes ever appended to the write queue
  uint64_t consumed = 0;    // bytes ever sent from it
  Fifo<TlsMark> marks;
  unsigned char tx_key[64] = {};
  uint32_t tx_key_len = 0;
  // The engine seals records itself (no TLS in the kernel; seal.h): the
  // send key OpenSSL offered went to `seal` instead of the socket, and
  // what OpenSSL and the caller write is sealed into the write queue.
  bool seal_ok = false;              // may take the send key for the sealer
  RecordCipher *seal = nullptr;      // owned; set once the key is taken
  unsigned char tx_secret[64] = {};  // TLS 1.3: the send traffic secret (keylog)
  uint32_t tx_secret_len = 0;
  // ... and opens the peer's records itself (Engine::tls_open()): with
  // `open` set, the ciphertext in `in` is decrypted by the engine,
  // application data goes out as DATA records, and OpenSSL reads the other
  // records from rx_ctl as from kernel TLS.
  RecordCipher *open = nullptr;      // owned; set once the receive key is taken
  unsigned char rx_secret[64] = {};  // TLS 1.3: the receive traffic secret (keylog)
  uint32_t rx_secret_len = 0;
  uint32_t empty_records = 0;  // empty application data records in a row
  // The start of a record still incomplete, moved out of the receive
  // buffers (a peer sending records in small pieces must not hold one
  // receive buffer per piece): an `in` chunk with bid -1. kTlsHsBuf bytes,
  // ::operator new; freed when the stream is idle (tls_trim()) or ends.
  unsigned char *part = nullptr;
  alignas(8) unsigned char cmsg[32] = {};
  msghdr tx_msg{};  // the send in flight (a control record carries cmsg)
};

// OpenSSL reads the peer's records as plaintext framed by the engine: the
// kernel decrypts them, or the engine does.
inline bool rx_framed(const TlsState *t) { return t->rx_offload || t->open; }

// Plaintext not yet encrypted: waiting for the handshake, or staged.
inline size_t plain_waiting(const TlsState *t) { return t->pt.size() + t->stage_len; }

// Before an SSL call that may fill OpenSSL's record buffers.
inline void Engine::tls_touch(Stream *s) {
  TlsState *t = s->tls;
  t->used = true;
  if (!t->own_buffers || t->warm) return;
  t->warm = true;
  t->next_warm = tls_warm_;
  t->prev_warm = &tls_warm_;
  if (tls_warm_) tls_warm_->tls->prev_warm = &t->next_warm;
  tls_warm_ = s;
}

// The most an exact read asks for: one TLS record (header, 2^14 bytes,
// the largest expansion OpenSSL allows).
inline constexpr uint32_t kTlsHsBuf = 16384 + 2048 + 5;

// Whether the stream must keep reading although the caller paused it or
// asked to close: the handshake needs the peer's messages, and a graceful
// close waits for the peer's close_notify.
inline bool tls_must_read(const Stream *s) {
  const TlsState *t = s->tls;
  if (!t || t->failed || s->read_done) return false;
  if (t->handshaking) return !s->closing;
  return s->closing && t->sent_close && !t->peer_closed;
}

}  // namespace kl
