// TLS on engine streams: OpenSSL driven by the engine through a BIO of its
// own. Ciphertext arrives in receive buffers and waits in TlsState::in until
// OpenSSL reads it; what OpenSSL writes goes straight into the stream's
// write queue; plaintext is decrypted into the arena's TLS buffers and
// handed out as ordinary DATA records.
#pragma once

#include <openssl/ssl.h>

#include "engine.h"

namespace kl {

// Ciphertext received and not yet read by OpenSSL: a piece of a receive
// buffer, which is recycled once OpenSSL has read all of it.
struct TlsChunk {
  int32_t bid;
  uint32_t off;
  uint32_t len;
};

struct TlsState {
  Engine *eng = nullptr;
  Stream *s = nullptr;
  SSL *ssl = nullptr;  // our reference (SSL_up_ref), dropped by tls_release
  BIO *bio = nullptr;  // owned by ssl
  Fifo<TlsChunk> in;
  bool in_eof = false;       // the socket reached end of file
  ByteQueue pt;              // plaintext written before the handshake ended
  bool handshaking = true;   // HANDSHAKE not reported yet
  bool failed = false;       // no more TLS I/O: handshake failed or fatal error
  bool peer_closed = false;  // the peer's close_notify arrived
  bool sent_close = false;   // our close_notify is queued
  bool starved = false;      // on Engine::tls_starved_
  Stream *next_starved = nullptr;
  kloop_tls_error err{};
};

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
