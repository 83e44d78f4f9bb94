// CRC-32 (ISO-HDLC: reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF) -- the checksum of
// zlib, gzip and PNG, so Python's zlib.crc32 is a bit-exact fallback. Plain C++, no torch.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gkd {

// CRC-32 of `len` bytes at `data`, continuing from `crc` (0 for a fresh start), like zlib.crc32.
uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len);

// CRC-32 of A||B from crc(A), crc(B) and len(B) (bytes): crc(A) * x^(8 len(B)) mod P, xor crc(B).
uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);

}  // namespace gkd
