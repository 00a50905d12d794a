// Sealing and opening TLS records in the engine: when the kernel has no TLS
// (no TCP ULP "tls"), the keys OpenSSL offers a kernel-TLS BIO still let the
// engine encrypt and decrypt the stream's records itself, with the AEAD
// alone, instead of a full SSL_write() or SSL_read() per record. The stream
// goes on as with kernel TLS (OpenSSL hands its own records to the BIO as
// plaintext with their type, and reads the peer's non-data records framed
// as plaintext); only the socket sees ciphertext, made and read by the
// engine.
#pragma once

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <stddef.h>
#include <stdint.h>

namespace kl {

// What a sealed record adds at most to its plaintext: the header, TLS 1.2
// GCM's explicit nonce or TLS 1.3's content type, the tag.
inline constexpr size_t kSealOverhead = 5 + 8 + 16;

// Plaintext per sealed record: a sealed record fits one standard 16 KiB
// write block.
inline constexpr size_t kSealRecordMax = 16384 - 32;

// The record protection of one direction of a TLS stream: the AEAD
// context and its key, the IV, the record sequence number and, for TLS
// 1.3, the traffic secret a key update derives the next key from. A
// sealer (send side) or an opener (receive side), fixed when made.
class RecordCipher {
 public:
  enum Direction { kSeal, kOpen };
  explicit RecordCipher(Direction d) : encrypt_(d == kSeal) {}
  RecordCipher(const RecordCipher &) = delete;
  RecordCipher &operator=(const RecordCipher &) = delete;
  ~RecordCipher();

  // Takes the key in the kernel's tls12_crypto_info_* layout (what OpenSSL
  // passes a kernel-TLS BIO). `secret` is the TLS 1.3 traffic secret the
  // key came from (`secret_len` bytes; checked against the key, needed to
  // follow a key update), ignored for TLS 1.2. False: a cipher or version
  // this does not do, TLS 1.3 without its secret, or no memory.
  bool init(const void *crypto_info, size_t info_len, const SSL *ssl, const unsigned char *secret,
            size_t secret_len);
  // TLS 1.3 from the traffic secret alone, for the SSL's cipher suite.
  bool init13(const SSL *ssl, const unsigned char *secret, size_t secret_len);
  bool tls13() const { return tls13_; }

  // TLS 1.3 KeyUpdate crossed under the current key: the next records use
  // the next traffic secret's key (RFC 8446 7.2). False on failure.
  bool update_key();

  // Sealing: one record of content type `type` carrying `len` (at most
  // kSealRecordMax) plaintext bytes into `out`, which has room for len +
  // kSealOverhead bytes. Returns the record's size, 0 on failure.
  size_t seal(uint8_t type, const void *in, size_t len, unsigned char *out);

  // Opening, piece by piece as the record lies in the receive buffers:
  // begin() with its header (and the explicit nonce when prefix() is 8),
  // update() over its ciphertext in pieces, each decrypted to `out`,
  // finish() with its tag. finish() is false when the record is not
  // authentic: nothing update() wrote may be used then.
  static constexpr size_t kTag = 16;
  // Bytes of a record's body before its ciphertext (TLS 1.2 AES-GCM's
  // explicit nonce); the tag follows the ciphertext.
  size_t prefix() const { return explicit_nonce_ ? 8 : 0; }
  bool begin(const unsigned char head[5], const unsigned char *explicit_nonce);
  bool update(const unsigned char *in, size_t len, unsigned char *out);
  bool finish(const unsigned char tag[kTag]);

  // The plaintext of a received TLS 1.3 handshake record: true if a
  // KeyUpdate message starts in it (messages may span records; their
  // headers are followed across them).
  bool key_update_in(const unsigned char *p, size_t len);

 private:
  bool set_key(const unsigned char *key, const unsigned char *iv);
  // The per-record nonce: the IV xor the sequence number, or (TLS 1.2
  // AES-GCM) the salt and the explicit nonce.
  void nonce(unsigned char out[12]) const;
  // The TLS 1.2 additional data of a record: sequence number, type,
  // version, plaintext length.
  void aad12(unsigned char out[13], uint8_t type, size_t len) const;

  EVP_CIPHER_CTX *ctx_ = nullptr;
  const EVP_CIPHER *cipher_ = nullptr;
  const EVP_MD *md_ = nullptr;  // TLS 1.3: the suite's hash (HKDF)
  unsigned char iv_[12] = {};   // 1.3 and ChaCha20: the static IV; 1.2 GCM: salt, explicit nonce
  unsigned char secret_[64] = {};
  size_t secret_len_ = 0;
  size_t key_len_ = 0;
  uint64_t seq_ = 0;
  bool tls13_ = false;
  bool explicit_nonce_ = false;  // TLS 1.2 AES-GCM
  bool encrypt_;
  uint32_t hs_left_ = 0;  // opening: bytes of the current handshake message still to come
  unsigned char hs_head_[4] = {};
  uint32_t hs_head_len_ = 0;
};

}  // namespace kl
