// TLS records sealed and opened by the engine (see seal.h). Record formats: RFC 5246
// 6.2.3.3 with RFC 5288 (TLS 1.2 AES-GCM: an 8-byte explicit nonce after
// the header, additional data = sequence number, type, version, length),
// RFC 7905 (TLS 1.2 ChaCha20-Poly1305: nonce = IV xor sequence number, same
// additional data), RFC 8446 5.2 (TLS 1.3: outer type 23, the real type
// after the plaintext, additional data = the record header, nonce = IV xor
// sequence number).
#include "seal.h"

#include <linux/tls.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>

namespace kl {

namespace {

// TLS 1.3 records up to this much plaintext are copied to their place
// first and encrypted there with their type byte in one call.
constexpr size_t kSealJoinMax = 4096;

uint64_t load_be64(const unsigned char *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | p[i];
  return v;
}

void store_be64(unsigned char *p, uint64_t v) {
  for (int i = 7; i >= 0; --i) {
    p[i] = static_cast<unsigned char>(v & 0xff);
    v >>= 8;
  }
}

// The digests and ciphers, fetched once per process. OpenSSL 3.0 fetches
// an implementation by name on every initialisation that names a legacy
// object (EVP_sha256(), EVP_aes_128_gcm(), ...); with HMAC()'s own context
// set-up that made the engine's key derivations of one TLS 1.3 handshake
// cost ~110,000 instructions. Null where a fetch fails: the legacy object
// is used then.
const EVP_MD *fetched_md(const EVP_MD *md) {
  static EVP_MD *const sha256 = EVP_MD_fetch(nullptr, "SHA2-256", nullptr);
  static EVP_MD *const sha384 = EVP_MD_fetch(nullptr, "SHA2-384", nullptr);
  int nid = md ? EVP_MD_get_type(md) : NID_undef;
  if (nid == NID_sha256 && sha256) return sha256;
  if (nid == NID_sha384 && sha384) return sha384;
  return md;
}

const EVP_CIPHER *fetched_cipher(int nid) {
  static EVP_CIPHER *const aes128 = EVP_CIPHER_fetch(nullptr, "AES-128-GCM", nullptr);
  static EVP_CIPHER *const aes256 = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
  static EVP_CIPHER *const chacha = EVP_CIPHER_fetch(nullptr, "ChaCha20-Poly1305", nullptr);
  switch (nid) {
    case NID_aes_128_gcm:
      return aes128 ? aes128 : EVP_aes_128_gcm();
    case NID_aes_256_gcm:
      return aes256 ? aes256 : EVP_aes_256_gcm();
    case NID_chacha20_poly1305:
      return chacha ? chacha : EVP_chacha20_poly1305();
    default:
      return nullptr;
  }
}

// HMAC (RFC 2104) of `msg` under a key no longer than the hash's block,
// with the digest calls alone; `out` gets EVP_MD_get_size(md) bytes.
bool hmac(const EVP_MD *md, const unsigned char *key, size_t key_len, const unsigned char *msg,
          size_t msg_len, unsigned char *out) {
  int block = EVP_MD_get_block_size(md);
  if (block <= 0 || block > 128 || key_len > static_cast<size_t>(block)) return false;
  EVP_MD_CTX *c = EVP_MD_CTX_new();
  if (!c) return false;
  unsigned char pad[128];
  unsigned char inner[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  memset(pad, 0x36, static_cast<size_t>(block));
  for (size_t i = 0; i < key_len; ++i) pad[i] ^= key[i];
  bool ok = EVP_DigestInit_ex2(c, md, nullptr) == 1 &&
            EVP_DigestUpdate(c, pad, static_cast<size_t>(block)) == 1 &&
            EVP_DigestUpdate(c, msg, msg_len) == 1 && EVP_DigestFinal_ex(c, inner, &n) == 1;
  memset(pad, 0x5c, static_cast<size_t>(block));
  for (size_t i = 0; i < key_len; ++i) pad[i] ^= key[i];
  ok = ok && EVP_DigestInit_ex2(c, md, nullptr) == 1 &&
       EVP_DigestUpdate(c, pad, static_cast<size_t>(block)) == 1 &&
       EVP_DigestUpdate(c, inner, n) == 1 && EVP_DigestFinal_ex(c, out, &n) == 1;
  EVP_MD_CTX_free(c);
  OPENSSL_cleanse(pad, sizeof pad);
  OPENSSL_cleanse(inner, sizeof inner);
  return ok;
}

bool expand_label(const EVP_MD *md, const unsigned char *secret, size_t secret_len,
                  const char *label, unsigned char *out, size_t len) {
  unsigned char info[2 + 1 + 6 + 32 + 1 + 1];
  size_t label_len = strlen(label);
  if (label_len > 32 || len > static_cast<size_t>(EVP_MD_get_size(md))) return false;
  size_t n = 0;
  info[n++] = static_cast<unsigned char>(len >> 8);
  info[n++] = static_cast<unsigned char>(len & 0xff);
  info[n++] = static_cast<unsigned char>(6 + label_len);
  memcpy(info + n, "tls13 ", 6);
  n += 6;
  memcpy(info + n, label, label_len);
  n += label_len;
  info[n++] = 0;  // empty context
  info[n++] = 1;  // HKDF's block counter: T(1)
  unsigned char block[EVP_MAX_MD_SIZE];
  if (!hmac(md, secret, secret_len, info, n, block)) return false;
  memcpy(out, block, len);
  OPENSSL_cleanse(block, sizeof block);
  return true;
}

// The key (key_len bytes) and IV of a TLS 1.3 traffic secret (RFC 8446
// 7.3).
bool traffic_key(const EVP_MD *md, const unsigned char *secret, size_t secret_len,
                 unsigned char *key, size_t key_len, unsigned char *iv) {
  return expand_label(md, secret, secret_len, "key", key, key_len) &&
         expand_label(md, secret, secret_len, "iv", iv, 12);
}

// The key, the 12-byte IV (salt first; ChaCha20 has no salt) and the
// record sequence number of a kernel crypto_info of type Info.
template <class Info>
bool read_info(const void *p, size_t len, unsigned char *key, size_t *key_len, unsigned char *iv,
               unsigned char *rec_seq) {
  Info c{};
  static_assert(sizeof c.salt + sizeof c.iv == 12 && sizeof c.key <= 32 && sizeof c.rec_seq == 8);
  if (len != sizeof c) return false;
  memcpy(&c, p, sizeof c);
  *key_len = sizeof c.key;
  memcpy(key, c.key, sizeof c.key);
  memcpy(iv, c.salt, sizeof c.salt);
  memcpy(iv + sizeof c.salt, c.iv, sizeof c.iv);
  memcpy(rec_seq, c.rec_seq, sizeof c.rec_seq);
  OPENSSL_cleanse(&c, sizeof c);
  return true;
}

}  // namespace

RecordCipher::~RecordCipher() {
  EVP_CIPHER_CTX_free(ctx_);
  OPENSSL_cleanse(iv_, sizeof iv_);
  OPENSSL_cleanse(secret_, sizeof secret_);
}

bool RecordCipher::set_key(const unsigned char *key, const unsigned char *iv) {
  if (!ctx_) ctx_ = EVP_CIPHER_CTX_new();
  if (!ctx_ || EVP_CipherInit_ex(ctx_, cipher_, nullptr, key, nullptr, encrypt_ ? 1 : 0) != 1) {
    EVP_CIPHER_CTX_free(ctx_);
    ctx_ = nullptr;
    return false;
  }
  memcpy(iv_, iv, sizeof iv_);
  return true;
}

void RecordCipher::nonce(unsigned char out[12]) const {
  memcpy(out, iv_, 12);
  if (explicit_nonce_) return;
  unsigned char seq[8];
  store_be64(seq, seq_);
  for (int i = 0; i < 8; ++i) out[4 + i] ^= seq[i];
}

void RecordCipher::aad12(unsigned char out[13], uint8_t type, size_t len) const {
  store_be64(out, seq_);
  out[8] = type;
  out[9] = 3;
  out[10] = 3;
  out[11] = static_cast<unsigned char>(len >> 8);
  out[12] = static_cast<unsigned char>(len & 0xff);
}

bool RecordCipher::init(const void *crypto_info, size_t info_len, const SSL *ssl,
                        const unsigned char *secret, size_t secret_len) {
  tls_crypto_info head{};
  if (ctx_ || info_len < sizeof head) return false;
  memcpy(&head, crypto_info, sizeof head);
  if (head.version != TLS_1_2_VERSION && head.version != TLS_1_3_VERSION) return false;
  tls13_ = head.version == TLS_1_3_VERSION;
  unsigned char key[32];
  unsigned char iv[12];
  unsigned char rec_seq[8];
  bool known = false;
  switch (head.cipher_type) {
    case TLS_CIPHER_AES_GCM_128:
      known = read_info<tls12_crypto_info_aes_gcm_128>(crypto_info, info_len, key, &key_len_, iv,
                                                       rec_seq);
      cipher_ = fetched_cipher(NID_aes_128_gcm);
      explicit_nonce_ = !tls13_;
      break;
    case TLS_CIPHER_AES_GCM_256:
      known = read_info<tls12_crypto_info_aes_gcm_256>(crypto_info, info_len, key, &key_len_, iv,
                                                       rec_seq);
      cipher_ = fetched_cipher(NID_aes_256_gcm);
      explicit_nonce_ = !tls13_;
      break;
    case TLS_CIPHER_CHACHA20_POLY1305:
      known = read_info<tls12_crypto_info_chacha20_poly1305>(crypto_info, info_len, key, &key_len_,
                                                             iv, rec_seq);
      cipher_ = fetched_cipher(NID_chacha20_poly1305);
      explicit_nonce_ = false;
      break;
    default:
      break;
  }
  if (!known) {
    OPENSSL_cleanse(key, sizeof key);
    OPENSSL_cleanse(iv, sizeof iv);
    return false;
  }
  bool ok = cipher_ != nullptr;
  if (ok && tls13_) {
    // Following a key update needs the traffic secret the key came from:
    // check that it is that one (it gives the same key and IV).
    const SSL_CIPHER *suite = SSL_get_current_cipher(ssl);
    const EVP_MD *md = suite ? fetched_md(SSL_CIPHER_get_handshake_digest(suite)) : nullptr;
    unsigned char k2[32];
    unsigned char iv2[12];
    ok = md && secret && secret_len == static_cast<size_t>(EVP_MD_get_size(md)) &&
         secret_len <= sizeof secret_ && traffic_key(md, secret, secret_len, k2, key_len_, iv2) &&
         CRYPTO_memcmp(k2, key, key_len_) == 0 && CRYPTO_memcmp(iv2, iv, sizeof iv2) == 0;
    OPENSSL_cleanse(k2, sizeof k2);
    OPENSSL_cleanse(iv2, sizeof iv2);
    if (ok) {
      md_ = md;
      memcpy(secret_, secret, secret_len);
      secret_len_ = secret_len;
    }
  }
  ok = ok && set_key(key, iv);
  OPENSSL_cleanse(key, sizeof key);
  OPENSSL_cleanse(iv, sizeof iv);
  seq_ = load_be64(rec_seq);
  return ok;
}

bool RecordCipher::init13(const SSL *ssl, const unsigned char *secret, size_t secret_len) {
  const SSL_CIPHER *suite = ssl ? SSL_get_current_cipher(ssl) : nullptr;
  if (ctx_ || !suite || !secret || SSL_version(ssl) != TLS1_3_VERSION) return false;
  cipher_ = fetched_cipher(SSL_CIPHER_get_cipher_nid(suite));
  const EVP_MD *md = fetched_md(SSL_CIPHER_get_handshake_digest(suite));
  if (!cipher_ || !md || secret_len != static_cast<size_t>(EVP_MD_get_size(md)) ||
      secret_len > sizeof secret_)
    return false;
  tls13_ = true;
  explicit_nonce_ = false;
  key_len_ = static_cast<size_t>(EVP_CIPHER_get_key_length(cipher_));
  unsigned char key[32];
  unsigned char iv[12];
  bool ok = key_len_ <= sizeof key && traffic_key(md, secret, secret_len, key, key_len_, iv) &&
            set_key(key, iv);
  OPENSSL_cleanse(key, sizeof key);
  OPENSSL_cleanse(iv, sizeof iv);
  if (!ok) return false;
  md_ = md;
  memcpy(secret_, secret, secret_len);
  secret_len_ = secret_len;
  seq_ = 0;
  return true;
}

size_t RecordCipher::seal(uint8_t type, const void *in, size_t len, unsigned char *out) {
  if (!ctx_ || !encrypt_ || len > kSealRecordMax || (len && !in)) return 0;
  unsigned char iv[12];
  nonce(iv);
  unsigned char aad[13];
  size_t aad_len = 0;
  size_t body = 0;
  unsigned char *ct = nullptr;
  if (tls13_) {
    body = len + 1 + 16;
    out[0] = 23;  // application data outside; the real type is inside
    ct = out + 5;
  } else {
    body = (explicit_nonce_ ? 8 : 0) + len + 16;
    out[0] = type;
    ct = out + 5;
    if (explicit_nonce_) {
      memcpy(ct, iv_ + 4, 8);
      ct += 8;
    }
    aad12(aad, type, len);
    aad_len = 13;
  }
  out[1] = 3;
  out[2] = 3;
  out[3] = static_cast<unsigned char>(body >> 8);
  out[4] = static_cast<unsigned char>(body & 0xff);
  if (tls13_) {
    memcpy(aad, out, 5);
    aad_len = 5;
  }
  int n = 0;
  size_t done = 0;
  bool ok = EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) == 1 &&
            EVP_EncryptUpdate(ctx_, nullptr, &n, aad, static_cast<int>(aad_len)) == 1;
  size_t plain = len + (tls13_ ? 1 : 0);
  if (ok && tls13_ && len <= kSealJoinMax) {
    // Plaintext and type in place, encrypted in one call (each call costs
    // some 300 instructions of dispatch besides the cipher).
    if (len) memcpy(ct, in, len);
    ct[len] = type;
    ok = EVP_EncryptUpdate(ctx_, ct, &n, ct, static_cast<int>(plain)) == 1;
    done += static_cast<size_t>(n);
  } else {
    if (ok && len) {
      ok = EVP_EncryptUpdate(ctx_, ct, &n, static_cast<const unsigned char *>(in),
                             static_cast<int>(len)) == 1;
      done += static_cast<size_t>(n);
    }
    if (ok && tls13_) {
      ok = EVP_EncryptUpdate(ctx_, ct + done, &n, &type, 1) == 1;
      done += static_cast<size_t>(n);
    }
  }
  if (ok) {
    ok = EVP_EncryptFinal_ex(ctx_, ct + done, &n) == 1;
    done += static_cast<size_t>(n);
  }
  ok = ok && done == plain && EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_GET_TAG, 16, ct + plain) == 1;
  if (!ok) return 0;
  ++seq_;
  if (explicit_nonce_) {  // the next record's explicit nonce: one more
    for (int i = 11; i >= 4; --i)
      if (++iv_[i] != 0) break;
  }
  return 5 + body;
}

bool RecordCipher::update_key() {
  if (!tls13_ || !md_ || !ctx_) return false;
  unsigned char next[64];
  unsigned char key[32];
  unsigned char iv[12];
  bool ok = expand_label(md_, secret_, secret_len_, "traffic upd", next, secret_len_) &&
            traffic_key(md_, next, secret_len_, key, key_len_, iv) && set_key(key, iv);
  if (ok) {
    memcpy(secret_, next, secret_len_);
    seq_ = 0;
  }
  OPENSSL_cleanse(next, sizeof next);
  OPENSSL_cleanse(key, sizeof key);
  OPENSSL_cleanse(iv, sizeof iv);
  return ok;
}

}  // namespace kl

namespace kl {

bool RecordCipher::begin(const unsigned char head[5], const unsigned char *explicit_nonce) {
  size_t body = (static_cast<size_t>(head[3]) << 8) | head[4];
  if (!ctx_ || encrypt_ || body < prefix() + kTag) return false;
  unsigned char iv[12];
  nonce(iv);
  unsigned char aad[13];
  size_t aad_len = 5;
  if (tls13_) {
    memcpy(aad, head, 5);
  } else {
    if (explicit_nonce_) memcpy(iv + 4, explicit_nonce, 8);
    aad12(aad, head[0], body - prefix() - kTag);
    aad_len = 13;
  }
  int n = 0;
  return EVP_DecryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) == 1 &&
         EVP_DecryptUpdate(ctx_, nullptr, &n, aad, static_cast<int>(aad_len)) == 1;
}

bool RecordCipher::update(const unsigned char *in, size_t len, unsigned char *out) {
  int n = 0;
  return len == 0 || (EVP_DecryptUpdate(ctx_, out, &n, in, static_cast<int>(len)) == 1 &&
                      static_cast<size_t>(n) == len);
}

bool RecordCipher::finish(const unsigned char tag[kTag]) {
  unsigned char t[kTag];
  memcpy(t, tag, kTag);
  unsigned char none[16];  // an AEAD's final step writes nothing
  int n = 0;
  bool ok = EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_AEAD_SET_TAG, kTag, t) == 1 &&
            EVP_DecryptFinal_ex(ctx_, none, &n) == 1 && n == 0;
  // The sequence number moves on either way: a record that fails ends the
  // stream.
  ++seq_;
  return ok;
}

bool RecordCipher::key_update_in(const unsigned char *p, size_t len) {
  bool found = false;
  size_t i = 0;
  while (i < len) {
    if (hs_left_) {
      size_t k = len - i < hs_left_ ? len - i : hs_left_;
      i += k;
      hs_left_ -= static_cast<uint32_t>(k);
      continue;
    }
    hs_head_[hs_head_len_++] = p[i++];
    if (hs_head_len_ == sizeof hs_head_) {
      found |= hs_head_[0] == 24;  // KeyUpdate (RFC 8446 4.6.3)
      hs_left_ = (static_cast<uint32_t>(hs_head_[1]) << 16) |
                 (static_cast<uint32_t>(hs_head_[2]) << 8) | hs_head_[3];
      hs_head_len_ = 0;
    }
  }
  return found;
}

}  // namespace kl
