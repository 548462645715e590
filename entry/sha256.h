/* SHA-256 (FIPS 180-4), for the daemon's directory name: the first 16 hex digits of the
 * sha256 of containerd's address (shim/util/paths.py instance_key).  No OpenSSL: its headers are
 * not on a fresh Debian, and loading libcrypto would cost more than the whole fast path. */
#ifndef EMBEDSHIM_SHA256_H
#define EMBEDSHIM_SHA256_H
#include <stddef.h>
#include <stdint.h>

void sha256(const void *data, size_t len, uint8_t digest[32]);

#endif
