// Sealing TLS records in the engine: when the kernel has no TLS (no TCP ULP
// "tls"), the send key OpenSSL offers a kernel-TLS BIO still lets the
// engine encrypt the stream's records itself, with the AEAD alone, instead
// of a full SSL_write() per record. The stream goes on exactly as with
// kernel TLS (OpenSSL hands its own records to the BIO as plaintext with
// their type); only the socket gets ciphertext the engine made.
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

class RecordSealer {
 public:
  RecordSealer() = default;
  RecordSealer(const RecordSealer &) = delete;
  RecordSealer &operator=(const RecordSealer &) = delete;
  ~RecordSealer();

  // Takes the send key in the kernel's tls12_crypto_info_* layout (what
  // OpenSSL passes a kernel-TLS BIO). `secret` is the TLS 1.3 traffic
  // secret the key came from (`secret_len` bytes; needed to follow a key
  // update), ignored for TLS 1.2. False: a cipher or version the sealer
  // does not do, TLS 1.3 without its secret, or no memory.
  bool init(const void *crypto_info, size_t info_len, const SSL *ssl, const unsigned char *secret,
            size_t secret_len);
  bool tls13() const { return tls13_; }

  // Seals one record of content type `type` carrying `len` (at most
  // kSealRecordMax) plaintext bytes into `out`, which has room for len +
  // kSealOverhead bytes. Returns the record's size, 0 on failure.
  size_t seal(uint8_t type, const void *in, size_t len, unsigned char *out);

  // TLS 1.3 KeyUpdate went out under the current key: the next records
  // use the next traffic secret's key (RFC 8446 7.2). False on failure.
  bool update_key();

 private:
  bool set_key(const unsigned char *key, const unsigned char *iv);

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
};

}  // namespace kl
