// CRC-32: carry-less-multiply folding (x86-64 with PCLMULQDQ, checked at run time; ~10x the tables)
// or slicing-by-8 for the bulk, and GF(2) polynomial arithmetic for the folding constants and for
// combining chunk CRCs, which lets flat_buffer.cpp checksum one range on many threads and still match
// zlib.crc32.
#include "crc32.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// The table algorithm on the raw register (no pre/post inversion): c is xored into the next 4 bytes.
uint32_t crc32_raw(uint32_t c, const uint8_t* data, size_t len) {
  const auto& t = tables().t;
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
  return c;
}

// x^n mod P, reflected (bit 31 is x^0).
uint32_t x_pow_mod_p(uint64_t n) {
  const auto& x_pow2 = tables().x_pow2;
  uint32_t p = 1u << 31;
  for (size_t k = 0; n != 0; n >>= 1, ++k) {
    if (n & 1u) p = mul_mod_p(x_pow2[k % x_pow2.size()], p);
  }
  return p;
}

#if defined(__x86_64__)
// Folding with carry-less multiplication. A 16-byte chunk A loaded little-endian has bit i <-> x^(127-i)
// (bytes in message order, LSB first: the reflected convention); its low qword holds degrees 127..64.
// Moving A forward by D bits onto a later chunk B: A x^D = A_lo x^(D+64) + A_hi x^D, and each part can be
// replaced by its product with (x^e mod P) without changing the CRC. For the 64x64 product to land
// with bit k <-> x^(127-k), the constant's bit j must mean x^(64-j): fold_constant(e) stores
// x * (x^(e-1) mod P) (degree 1..32) as (reflected 32-bit value) << 32.
uint64_t fold_constant(uint64_t e) { return static_cast<uint64_t>(x_pow_mod_p(e - 1)) << 32; }

__attribute__((target("pclmul,sse4.1"))) __m128i fold(__m128i a, __m128i k, __m128i b) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k, 0x00), _mm_clmulepi64_si128(a, k, 0x11)), b);
}

__attribute__((target("pclmul,sse4.1"))) uint32_t crc32_raw_clmul(uint32_t c, const uint8_t* data, size_t len) {
  static const __m128i k512 = _mm_set_epi64x(static_cast<int64_t>(fold_constant(512)),
                                             static_cast<int64_t>(fold_constant(512 + 64)));
  static const __m128i k128 = _mm_set_epi64x(static_cast<int64_t>(fold_constant(128)),
                                             static_cast<int64_t>(fold_constant(128 + 64)));
  auto load = [](const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
  // The register c is xored into the first 4 bytes, exactly as the table algorithm does.
  __m128i x0 = _mm_xor_si128(load(data), _mm_cvtsi32_si128(static_cast<int>(c)));
  __m128i x1 = load(data + 16), x2 = load(data + 32), x3 = load(data + 48);
  data += 64;
  len -= 64;
  for (; len >= 64; data += 64, len -= 64) {  // four independent chains, each folded 512 bits ahead
    x0 = fold(x0, k512, load(data));
    x1 = fold(x1, k512, load(data + 16));
    x2 = fold(x2, k512, load(data + 32));
    x3 = fold(x3, k512, load(data + 48));
  }
  __m128i x = fold(fold(fold(x0, k128, x1), k128, x2), k128, x3);
  for (; len >= 16; data += 16, len -= 16) x = fold(x, k128, load(data));
  alignas(16) uint8_t rest[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(rest), x);
  return crc32_raw(crc32_raw(0, rest, 16), data, len);
}

bool has_clmul() {
  static const bool yes = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return yes;
}
#endif

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len) {
#if defined(__x86_64__)
  if (len >= 256 && has_clmul()) return ~crc32_raw_clmul(~crc, data, len);
#endif
  return ~crc32_raw(~crc, data, len);
}

uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  return mul_mod_p(x_pow_mod_p(len_b * 8), crc_a) ^ crc_b;
}

}  // namespace gkd
