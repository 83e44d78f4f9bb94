// CRC-32, slicing-by-8 for the bulk and GF(2) polynomial arithmetic for combining chunk CRCs, which is
// what lets flat_buffer.cpp checksum one byte range on many threads and still match zlib.crc32.
#include "crc32.h"

#include <array>
#include <cstring>

namespace gkd {
namespace {

constexpr uint32_t kPoly = 0xEDB88320u;  // x^32 + x^26 + ... + 1, bit-reversed

struct Tables {
  // t[k][b]: CRC contribution of byte b followed by k zero bytes (slicing-by-8).
  std::array<std::array<uint32_t, 256>, 8> t{};
  // x_pow2[k] = x^(2^k) mod P, in the reflected representation (bit 31 is x^0).
  std::array<uint32_t, 64> x_pow2{};
};

// Product a * b mod P, both in the reflected representation.
uint32_t mul_mod_p(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0 && a != 0; m >>= 1) {
    if (a & m) {
      product ^= b;
      a ^= m;
    }
    b = (b & 1u) ? (b >> 1) ^ kPoly : b >> 1;  // b *= x
  }
  return product;
}

Tables make_tables() {
  Tables tables;
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t c = b;
    for (int i = 0; i < 8; ++i) c = (c & 1u) ? (c >> 1) ^ kPoly : c >> 1;
    tables.t[0][b] = c;
  }
  for (int k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) {
      const uint32_t prev = tables.t[k - 1][b];
      tables.t[k][b] = (prev >> 8) ^ tables.t[0][prev & 0xFFu];
    }
  }
  tables.x_pow2[0] = 1u << 30;  // x^1
  for (size_t k = 1; k < tables.x_pow2.size(); ++k) {
    tables.x_pow2[k] = mul_mod_p(tables.x_pow2[k - 1], tables.x_pow2[k - 1]);
  }
  return tables;
}

const Tables& tables() {
  static const Tables instance = make_tables();
  return instance;
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len) {
  const auto& t = tables().t;
  uint32_t c = ~crc;
  while (len >= 8) {
    uint64_t word;
    std::memcpy(&word, data, 8);  // little-endian hosts only (x86-64, aarch64)
    const uint32_t lo = static_cast<uint32_t>(word) ^ c;
    const uint32_t hi = static_cast<uint32_t>(word >> 32);
    c = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
        t[3][hi & 0xFFu] ^ t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    data += 8;
    len -= 8;
  }
  while (len--) c = (c >> 8) ^ t[0][(c ^ *data++) & 0xFFu];
  return ~c;
}

uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  // x^(8 len_b) = prod over set bits j of (8 len_b) of x^(2^j).
  const auto& x_pow2 = tables().x_pow2;
  uint32_t shift = 1u << 31;  // x^0
  uint64_t n = len_b;
  for (size_t k = 3; n != 0; n >>= 1, ++k) {
    if (n & 1u) shift = mul_mod_p(x_pow2[k % x_pow2.size()], shift);
  }
  return mul_mod_p(shift, crc_a) ^ crc_b;
}

}  // namespace gkd
