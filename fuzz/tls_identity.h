// A self-signed P-256 certificate for "localhost" and its key, made in
// memory, for the TLS fuzz targets' contexts.
#pragma once

#include <openssl/evp.h>
#include <openssl/x509.h>

#include "harness.h"

namespace kfuzz {

struct TlsIdentity {
  EVP_PKEY *key = nullptr;
  X509 *cert = nullptr;
};

inline TlsIdentity MakeTlsIdentity() {
  TlsIdentity id;
  id.key = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  id.cert = X509_new();
  if (!id.key || !id.cert) Fail("cannot make a key and a certificate");
  X509_set_version(id.cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(id.cert), 1);
  X509_gmtime_adj(X509_getm_notBefore(id.cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(id.cert), 3600L * 24 * 365);
  X509_set_pubkey(id.cert, id.key);
  X509_NAME *name = X509_get_subject_name(id.cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char *>("localhost"), -1, -1, 0);
  X509_set_issuer_name(id.cert, name);
  if (X509_sign(id.cert, id.key, EVP_sha256()) <= 0) Fail("cannot sign the certificate");
  return id;
}

}  // namespace kfuzz
