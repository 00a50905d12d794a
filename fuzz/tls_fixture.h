// What the TLS stream fuzz targets make once per process: a loop, and
// server and client contexts with a self-signed P-256 certificate for
// "localhost" made in memory.
#pragma once

#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "harness.h"

namespace kfuzz {

struct TlsFixture {
  kloop_t *loop = nullptr;
  SSL_CTX *server = nullptr;         // the certificate and its key
  SSL_CTX *client = nullptr;         // verifies nothing
  SSL_CTX *client_verify = nullptr;  // trusts the certificate alone
};

inline TlsFixture MakeTlsFixture() {
  TlsFixture f;
  if (kloop_create(nullptr, &f.loop) != 0) Fail("kloop_create failed");
  EVP_PKEY *key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  X509 *cert = X509_new();
  if (!key || !cert) Fail("cannot make a key and a certificate");
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), 3600L * 24 * 365);
  X509_set_pubkey(cert, key);
  X509_NAME *name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
  X509_set_issuer_name(cert, name);
  if (X509_sign(cert, key, EVP_sha256()) <= 0) Fail("cannot sign the certificate");

  f.server = SSL_CTX_new(TLS_server_method());
  if (!f.server || SSL_CTX_use_certificate(f.server, cert) != 1 ||
      SSL_CTX_use_PrivateKey(f.server, key) != 1)
    Fail("cannot make the server context");
  f.client = SSL_CTX_new(TLS_client_method());
  f.client_verify = SSL_CTX_new(TLS_client_method());
  if (!f.client || !f.client_verify) Fail("cannot make the client contexts");
  SSL_CTX_set_verify(f.client, SSL_VERIFY_NONE, nullptr);
  SSL_CTX_set_verify(f.client_verify, SSL_VERIFY_PEER, nullptr);
  X509_STORE_add_cert(SSL_CTX_get_cert_store(f.client_verify), cert);
  X509_free(cert);
  EVP_PKEY_free(key);
  return f;
}

// kloop_stream_abort() or kloop_stream_close() of a stream that may have
// ended already: anything but 0 or -EALREADY is a failure.
inline void EndStream(kloop_t *loop, uint64_t token, bool close) {
  int rc = close ? kloop_stream_close(loop, token) : kloop_stream_abort(loop, token);
  if (rc != 0 && rc != -EALREADY)
    Fail("kloop_stream_%s returned %d", close ? "close" : "abort", rc);
}

}  // namespace kfuzz
