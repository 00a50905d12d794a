// TLS helpers shared by the engine's TLS tests (tests/engine/test_tls.cc)
// and the kernel TLS tests run in a guest (tests/ktls): a self-signed
// identity, client and server contexts, and the engine's error record.
#pragma once

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "common.h"

namespace kt {

struct SslFree {
  void operator()(SSL *p) const { SSL_free(p); }
  void operator()(SSL_CTX *p) const { SSL_CTX_free(p); }
  void operator()(X509 *p) const { X509_free(p); }
  void operator()(EVP_PKEY *p) const { EVP_PKEY_free(p); }
};
using SslPtr = std::unique_ptr<SSL, SslFree>;
using CtxPtr = std::unique_ptr<SSL_CTX, SslFree>;

// A self-signed certificate for "localhost" (P-256), made once.
struct Identity {
  std::unique_ptr<EVP_PKEY, SslFree> key;
  std::unique_ptr<X509, SslFree> cert;
  Identity() {
    key.reset(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"));
    cert.reset(X509_new());
    X509 *c = cert.get();
    X509_set_version(c, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(c), 1);
    X509_gmtime_adj(X509_getm_notBefore(c), -3600);
    X509_gmtime_adj(X509_getm_notAfter(c), 3600L * 24);
    X509_set_pubkey(c, key.get());
    X509_NAME *name = X509_get_subject_name(c);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
    X509_set_issuer_name(c, name);
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, c, c, nullptr, nullptr, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, "DNS:localhost");
    X509_add_ext(c, ext, -1);
    X509_EXTENSION_free(ext);
    X509_sign(c, key.get(), EVP_sha256());
  }
};

inline const Identity &Id() {
  static Identity id;
  return id;
}

inline CtxPtr ServerCtx(const char *alpn = nullptr) {
  CtxPtr ctx(SSL_CTX_new(TLS_server_method()));
  SSL_CTX_use_certificate(ctx.get(), Id().cert.get());
  SSL_CTX_use_PrivateKey(ctx.get(), Id().key.get());
  if (alpn) {
    static std::string want;
    want = alpn;
    SSL_CTX_set_alpn_select_cb(
        ctx.get(),
        [](SSL *, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
           unsigned int inlen, void *) {
          // pick the first protocol the client offers that equals `want`
          for (unsigned i = 0; i < inlen; i += 1u + in[i])
            if (in[i] == want.size() && memcmp(in + i + 1, want.data(), want.size()) == 0) {
              *out = in + i + 1;
              *outlen = in[i];
              return SSL_TLSEXT_ERR_OK;
            }
          return SSL_TLSEXT_ERR_NOACK;
        },
        nullptr);
  }
  return ctx;
}

// A verifying client context that trusts Id() (or nothing).
inline CtxPtr ClientCtx(bool trust = true) {
  CtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (trust) X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx.get()), Id().cert.get());
  return ctx;
}

inline SslPtr Client(SSL_CTX *ctx, const char *host = "localhost") {
  SslPtr ssl(SSL_new(ctx));
  SSL_set_connect_state(ssl.get());
  if (host) {
    SSL_set_tlsext_host_name(ssl.get(), host);
    SSL_set1_host(ssl.get(), host);
  }
  return ssl;
}

inline SslPtr Server(SSL_CTX *ctx) {
  SslPtr ssl(SSL_new(ctx));
  SSL_set_accept_state(ssl.get());
  return ssl;
}

// An engine TLS client (token 1, driving `client`) and server (token 2,
// `server`, attached with `server_flags`) on one loopback TCP pair, TLS
// started on both. *fds gets the sockets (the server's end first); they
// must stay open while the streams use them.
inline void StartTlsPair(kloop_t *loop, SSL *client, SSL *server, std::pair<Fd, Fd> *fds,
                         uint32_t server_flags = 0) {
  *fds = TcpPair();
  ASSERT_EQ(kloop_stream_attach(loop, 1, fds->second, 0), 0);
  ASSERT_EQ(kloop_stream_attach(loop, 2, fds->first, server_flags), 0);
  ASSERT_EQ(kloop_stream_start_tls(loop, 1, client), 0);
  ASSERT_EQ(kloop_stream_start_tls(loop, 2, server), 0);
}

inline kloop_tls_error TlsError(kloop_t *loop, uint64_t token) {
  kloop_tls_error e{};
  e.size = sizeof e;
  EXPECT_EQ(kloop_stream_tls_error(loop, token, &e), 0);
  return e;
}

}  // namespace kt
