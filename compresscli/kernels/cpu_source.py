"""C++ source of the CPU kernels, compiled on first use by cpu.py.

Kept as a string (not a .cpp file) so that it ships inside the wheel with no package-data rule. It
includes no torch header: it compiles in a few seconds, exports a C ABI and is called through ctypes
with raw pointers (benchmarks/kernel_thresholds.py measures that call against a torch custom op); OpenMP
resolves to the libgomp torch already loaded, so it shares torch's thread pool instead of adding a second
one. Below two threads' worth of work a call never enters an OpenMP region.

One row-sparse product serves every sparse inference form: y (N, R) = x (N, C) @ W^T + bias, where row
r of W holds the values [begin(r), end(r)) of `values` at columns given either by an index array
(int16/int32: condensed rows of constant fan-in k, or CSR with a row pointer) or by a bitmask (64-bit
words per row, bit j of word w = column 64 w + j, the values of the set bits in order). Values, x, bias
and y share one dtype: float32, bfloat16 or float16; products accumulate in float32.

Decoding (batch 1-8, memory-bound: the kernels must read each stored byte once and keep up with memory):
- bitmask rows: the mask is the instruction. With AVX-512, each 16 (32) columns' mask bits expand the
  next popcount values into their lanes in one instruction (vexpandps, or vpexpandw for 16-bit values
  with VBMI2), and the same mask loads the matching x lanes; bfloat16 multiplies in pairs with vdpbf16ps
  (AVX512_BF16) on x as it is. Nothing is extracted, no index is built, no lane is gathered. AVX2: an
  8-column permutation table does the expansion. Up to 8 input rows share each expanded vector; more rows
  run in groups of 8 while the row's values stay in L1.
- index rows (CSR, condensed): one input row gathers x (converted to float32 once per call) 16 indices at
  a time; several rows pack x input-major (C x W, W <= 32) so that each non-zero is a broadcast FMA over W
  lanes.
- many input rows (prefill): `sparse_to_dense` decodes rows [r0, r1) into a dense tile (the same
  expansion, stored) for a GEMM; the dispatcher picks by measured thresholds.
`rps_weight` computes rows of a randomized-parameter-sharing weight from its shared memory and hash
parameters (codecs/rps/hashing.py, bit for bit), and `rps_mm` multiplies by them without keeping them:
each row is computed into an L1 buffer and used at once. The sign hash is a cubic polynomial mod 2^31 - 1
of the weight's position, so along consecutive positions it is stepped by forward differences: three
modular additions per 16 weights instead of three 64-bit multiplications per 8.
"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CCLI_AVX2 1
#endif
#if defined(CCLI_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CCLI_AVX512 1
#endif
#if defined(CCLI_AVX512) && defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define CCLI_BF16_DOT 1
#endif
#if defined(CCLI_BF16_DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define CCLI_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// ------------------------------------------------------------------------------------------- dtypes

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

struct F32 {
  using T = float;
  static constexpr int code = 0;
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float v) { *p = v; }
};

struct BF16 {
  using T = uint16_t;
  static constexpr int code = 1;
  static inline float load(const uint16_t* p) { return bits_to_float(static_cast<uint32_t>(*p) << 16); }
  static inline void store(uint16_t* p, float f) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *p = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    *p = static_cast<uint16_t>(u >> 16);
  }
};

struct F16 {  // IEEE half; F16C where the build has it, else the exact bit manipulation (F. Giesen's)
  using T = uint16_t;
  static constexpr int code = 2;
  static inline float load(const uint16_t* p) {
#if defined(__F16C__)
    return _cvtsh_ss(*p);
#else
    const uint32_t h = *p, shifted_exp = 0x7c00u << 13;
    uint32_t o = (h & 0x7fffu) << 13;
    const uint32_t exp = shifted_exp & o;
    o += (127u - 15u) << 23;
    if (exp == shifted_exp) {
      o += (128u - 16u) << 23;
    } else if (exp == 0) {
      o += 1u << 23;
      o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
    }
    return bits_to_float(o | ((h & 0x8000u) << 16));
#endif
  }
  static inline void store(uint16_t* p, float f) {
#if defined(__F16C__)
    *p = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t u = float_to_bits(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint32_t o;
    if (u >= (127u + 16u) << 23) {
      o = u > (255u << 23) ? 0x7e00u : 0x7c00u;
    } else if (u < (113u << 23)) {
      o = float_to_bits(bits_to_float(u) + 0.5f) - float_to_bits(0.5f);
    } else {
      const uint32_t odd = (u >> 13) & 1u;
      u += ((15u - 127u) << 23) + 0xfffu;
      u += odd;
      o = u >> 13;
    }
    *p = static_cast<uint16_t>(o | (sign >> 16));
#endif
  }
};

// Runs body(i) for i in [0, n): on the calling thread alone when threads <= 1 (no OpenMP region).
template <typename F>
inline void for_range(int64_t n, int threads, const F& body) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// Scratch memory for one call: reused across calls on this thread while small (a fresh allocation of a few
// MB per call would be page-faulted in again every time), allocated for the call and freed after when
// large, so that a big call leaves nothing resident behind.
constexpr size_t kKeptScratchBytes = 4u << 20;

enum ScratchUse { kPackedX = 0, kRowBuffer = 1 };  // one kept buffer per use and thread

template <typename T, int Use>
struct Scratch {
  std::vector<T> own;
  T* data;
  explicit Scratch(size_t n) {
    thread_local std::vector<unsigned char> kept;
    if (n * sizeof(T) + 64 <= kKeptScratchBytes) {
      if (kept.size() < n * sizeof(T) + 64) kept.resize(n * sizeof(T) + 64);
      data = reinterpret_cast<T*>(kept.data());
    } else {
      own.resize(n + 16);
      data = own.data();
    }
  }
};

// x as float32 (N x C): itself for float32, else converted into `buf` once per call.
template <typename V>
inline const float* x_as_float(const typename V::T* x, int64_t N, int64_t C, Scratch<float, kPackedX>& buf) {
  if (std::is_same<V, F32>::value) return reinterpret_cast<const float*>(x);
  for (int64_t i = 0; i < N * C; ++i) buf.data[i] = V::load(x + i);
  return buf.data;
}

// ------------------------------------------------------------------------------- vectors of 16 lanes

#ifdef CCLI_AVX512
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1u); }
template <typename V> struct Vec;
template <> struct Vec<F32> {
  static inline __m512 load_n(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static inline __m512 expand(__mmask16 m, const float* p) { return _mm512_maskz_expandloadu_ps(m, p); }
  static inline void store_n(__mmask16 m, float* p, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
};
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
template <> struct Vec<BF16> {
  static inline __m512 load_n(__mmask16 m, const uint16_t* p) { return widen_bf16(_mm256_maskz_loadu_epi16(m, p)); }
  static inline __m512 expand(__mmask16 m, const uint16_t* p) {
    const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u);
    return _mm512_maskz_expand_ps(m, load_n(first, p));
  }
  static inline void store_n(__mmask16 m, uint16_t* p, __m512 v) {  // round to nearest even; NaN stays NaN
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  }
};
template <> struct Vec<F16> {
  static inline __m512 load_n(__mmask16 m, const uint16_t* p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static inline __m512 expand(__mmask16 m, const uint16_t* p) {
    const __mmask16 first = static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u);
    return _mm512_maskz_expand_ps(m, load_n(first, p));
  }
  static inline void store_n(__mmask16 m, uint16_t* p, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};
#endif

// ------------------------------------------------------------------------------- sparse structure

enum ColKind { kIdx16 = 0, kIdx32 = 1, kBits = 2 };

// A row kernel's streams (values, mask words, column indices) are read once, front to back, but each step's
// load address comes from the step before (popcount -> pointer), and the hardware prefetcher alone kept the
// bitmask kernel at ~57% of the read bandwidth. Asking for the line this far ahead of each stream, once per
// step, brought it to ~80% (5632x2048 at 50%, bfloat16, one input row: 0.91 -> 0.65 ms; 1 KiB ahead gave
// nothing, 2-8 KiB the same: benchmarks/decode.py layers).
constexpr int64_t kPrefetchAheadBytes = 4096;
inline void prefetch_ahead(const void* stream) {
  __builtin_prefetch(static_cast<const char*>(stream) + kPrefetchAheadBytes, 0, 3);
}

struct Rows {
  const int64_t* row_ptr;  // nullptr: row r holds k entries from r * k (condensed)
  int64_t k;
  int64_t begin(int64_t r) const { return row_ptr ? row_ptr[r] : r * k; }
  int64_t end(int64_t r) const { return row_ptr ? row_ptr[r + 1] : (r + 1) * k; }
};

// ------------------------------------------------------------------ bitmask rows, 1-8 input rows
// out[n] = sum over the set bits j of the row of value_j * x[n][j], for n < NR; x rows C apart.

// x's 32 (16) lanes from column `col` of a row of C: a plain load inside the row. Lanes the row's mask
// leaves out multiply a zero value, as in the masked dense layer; past the row's end they are not read.
#if defined(CCLI_AVX512)
inline __m512i x_lanes32(const uint16_t* x, int64_t col, int64_t C, __mmask32 m) {
  return col + 32 <= C ? _mm512_loadu_si512(x + col) : _mm512_maskz_loadu_epi16(m, x + col);
}
inline __m512 x_lanes16(const float* x, int64_t col, int64_t C, __mmask16 m) {
  return col + 16 <= C ? _mm512_loadu_ps(x + col) : _mm512_maskz_loadu_ps(m, x + col);
}
#endif

#if defined(CCLI_BF16_DOT)
// The next 32 values from v (a plain load, but masked to the popcount near the end of all values).
inline __m512i values32(const uint16_t* v, const uint16_t* v_end, __mmask32 m) {
  if (v + 32 <= v_end) return _mm512_loadu_si512(v);
  const int n = __builtin_popcount(static_cast<unsigned>(m));
  return _mm512_maskz_loadu_epi16(n >= 32 ? ~0u : static_cast<__mmask32>((1u << n) - 1u), v);
}

// 16-bit values, 32 columns per step: vpexpandw puts the next popcount values in their lanes. bfloat16
// multiplies in pairs with x as stored (vdpbf16ps); float16 widens to float32 against float32 x.
template <int NR>
inline void bits_row_bf16(const uint16_t* v, const uint64_t* words, int64_t wpr, const uint16_t* x, int64_t C,
                          float* out, const uint16_t* v_end) {
  __m512 acc[2][NR];
  for (int h = 0; h < 2; ++h) for (int n = 0; n < NR; ++n) acc[h][n] = _mm512_setzero_ps();
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m64 = words[w];
    prefetch_ahead(words + w);
    prefetch_ahead(v);
    if (!m64) continue;
    for (int h = 0; h < 2; ++h) {
      const __mmask32 m = static_cast<__mmask32>(m64 >> (32 * h));
      const __m512i wv = _mm512_maskz_expand_epi16(m, values32(v, v_end, m));
      v += __builtin_popcount(static_cast<unsigned>(m));
      const int64_t col = 64 * w + 32 * h;
      for (int n = 0; n < NR; ++n)
        acc[h][n] = _mm512_dpbf16_ps(acc[h][n], (__m512bh)wv, (__m512bh)x_lanes32(x + n * C, col, C, m));
    }
  }
  for (int n = 0; n < NR; ++n) out[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][n], acc[1][n]));
}

template <int NR>
inline void bits_row_f16(const uint16_t* v, const uint64_t* words, int64_t wpr, const float* x, int64_t C,
                          float* out, const uint16_t* v_end) {
  __m512 acc[2][NR];
  for (int h = 0; h < 2; ++h) for (int n = 0; n < NR; ++n) acc[h][n] = _mm512_setzero_ps();
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m64 = words[w];
    prefetch_ahead(words + w);
    prefetch_ahead(v);
    if (!m64) continue;
    for (int h = 0; h < 2; ++h) {
      const __mmask32 m = static_cast<__mmask32>(m64 >> (32 * h));
      const __m512i wv = _mm512_maskz_expand_epi16(m, values32(v, v_end, m));
      v += __builtin_popcount(static_cast<unsigned>(m));
      const __m512 lo = _mm512_cvtph_ps(_mm512_castsi512_si256(wv));
      const __m512 hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(wv, 1));
      const int64_t col = 64 * w + 32 * h;
      for (int n = 0; n < NR; ++n) {
        acc[0][n] = _mm512_fmadd_ps(lo, x_lanes16(x + n * C, col, C, static_cast<__mmask16>(m)), acc[0][n]);
        acc[1][n] = _mm512_fmadd_ps(hi, x_lanes16(x + n * C, col + 16, C, static_cast<__mmask16>(m >> 16)), acc[1][n]);
      }
    }
  }
  for (int n = 0; n < NR; ++n) out[n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][n], acc[1][n]));
}
#endif

#ifdef CCLI_AVX512
// Any dtype: 16 columns per step, values expanded into float32 lanes, x as float32.
template <typename V, int NR>
inline void bits_row(const typename V::T* v, const uint64_t* words, int64_t wpr, const float* x, int64_t C,
                     float* out, const typename V::T*) {
  constexpr int S = NR == 1 ? 4 : 2;  // independent accumulator sets: hide the FMA latency
  __m512 acc[S][NR];
  for (int s = 0; s < S; ++s) for (int n = 0; n < NR; ++n) acc[s][n] = _mm512_setzero_ps();
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m64 = words[w];
    if (!m64) continue;
    prefetch_ahead(words + w);
    for (int q = 0; q < 4; ++q) {
      const __mmask16 m = static_cast<__mmask16>(m64 >> (16 * q));
      prefetch_ahead(v);
      const __m512 wv = Vec<V>::expand(m, v);
      v += __builtin_popcount(static_cast<unsigned>(m));
      const int64_t col = 64 * w + 16 * q;
      for (int n = 0; n < NR; ++n)
        acc[q % S][n] = _mm512_fmadd_ps(wv, x_lanes16(x + n * C, col, C, m), acc[q % S][n]);
    }
  }
  for (int n = 0; n < NR; ++n) {
    __m512 sum = acc[0][n];
    for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][n]);
    out[n] = _mm512_reduce_add_ps(sum);
  }
}
#elif defined(CCLI_AVX2)
struct ExpandTable {  // for each byte: lane i takes loaded value perm[b][i] (its rank among the set bits)
  int32_t perm[256][8];
  int32_t lanes[256][8];  // -1 where bit i is set
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int i = 0; i < 8; ++i) {
        const bool set = b >> i & 1;
        perm[b][i] = set ? n : 0;
        lanes[b][i] = set ? -1 : 0;
        n += set;
      }
    }
  }
};
const ExpandTable kExpand;

template <typename V>
inline __m256 load8(const typename V::T* p) {
  if (std::is_same<V, F32>::value) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (std::is_same<V, BF16>::value) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// AVX2: 8 columns per step by a permutation table. A vector load of 8 values may only start 8 before the
// end of all values (`v_end`); closer to it the step is done one value at a time.
template <typename V, int NR>
inline void bits_row(const typename V::T* v, const uint64_t* words, int64_t wpr, const float* x, int64_t C,
                     float* out, const typename V::T* v_end) {
  __m256 acc[2][NR];
  for (int s = 0; s < 2; ++s) for (int n = 0; n < NR; ++n) acc[s][n] = _mm256_setzero_ps();
  float tail[NR] = {};
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m64 = words[w];
    if (!m64) continue;
    prefetch_ahead(words + w);
    for (int q = 0; q < 8; ++q) {
      const unsigned b = static_cast<unsigned>(m64 >> (8 * q)) & 0xffu;
      const int64_t col = 64 * w + 8 * q;
      if ((q & 1) == 0) prefetch_ahead(v);
      if (v + 8 <= v_end) {
        const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand.lanes[b]));
        const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kExpand.perm[b]));
        const __m256 wv = _mm256_and_ps(_mm256_permutevar8x32_ps(load8<V>(v), perm), _mm256_castsi256_ps(lanes));
        for (int n = 0; n < NR; ++n)
          acc[q & 1][n] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + n * C + col, lanes), acc[q & 1][n]);
        v += __builtin_popcount(b);
      } else {
        for (unsigned m = b; m; m &= m - 1) {
          const float wv = V::load(v++);
          for (int n = 0; n < NR; ++n) tail[n] += wv * x[n * C + col + __builtin_ctz(m)];
        }
      }
    }
  }
  for (int n = 0; n < NR; ++n) {
    alignas(32) float lane[8];
    _mm256_store_ps(lane, _mm256_add_ps(acc[0][n], acc[1][n]));
    out[n] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail[n];
  }
}
#else
template <typename V, int NR>
inline void bits_row(const typename V::T* v, const uint64_t* words, int64_t wpr, const float* x, int64_t C,
                     float* out, const typename V::T*) {
  for (int n = 0; n < NR; ++n) out[n] = 0.f;
  for (int64_t w = 0; w < wpr; ++w)
    for (uint64_t m = words[w]; m; m &= m - 1) {
      const float wv = V::load(v++);
      const int64_t col = 64 * w + __builtin_ctzll(m);
      for (int n = 0; n < NR; ++n) out[n] += wv * x[n * C + col];
    }
}
#endif

// y[n][r] for every row r and input row n: the rows split between the threads; within a row, the input
// rows in groups of 8 (the row's values and mask stay in L1 from one group to the next).
template <typename V, int NR>
inline void bits_group(const typename V::T* v, const uint64_t* words, int64_t wpr, const typename V::T* x,
                       const float* xf, int64_t C, float* out, const typename V::T* v_end) {
#if defined(CCLI_BF16_DOT)
  if constexpr (std::is_same<V, BF16>::value) {  // vdpbf16ps reads bfloat16 x as it is
    (void)xf;
    bits_row_bf16<NR>(v, words, wpr, x, C, out, v_end);
    return;
  }
  if constexpr (std::is_same<V, F16>::value) {
    bits_row_f16<NR>(v, words, wpr, xf, C, out, v_end);
    return;
  }
#endif
  (void)x;
  bits_row<V, NR>(v, words, wpr, xf, C, out, v_end);
}


#if defined(CCLI_AMX)
// ---------------------------------------------------------------- bitmask rows on AMX, 2-32 input rows
// bfloat16 only. A block of 16 weight rows x 32 columns is expanded (vpexpandw, as one row above) into a
// 1 KiB buffer that one tile load reads; x is laid out once per call as the tile B wants it (pairs of
// columns interleaved per input row, "VNNI"), and one TDPBF16PS multiplies the block by up to 16 input
// rows (two for up to 32). The expansion is the cost, as at one row: the tile unit does the rest.

int amx_allowed = 0;  // set from Python once AMX has been seen to run here (core/cpu_isa.py's probe)

inline bool amx_usable() {
  // Linux hands out the tile state only on request (once per process; oneDNN asks the same way).
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return amx_allowed && granted;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// x (N x C bfloat16) -> xv[kb][p][n][2] = x[n][32 kb + 2 p + {0, 1}], zero past C; np = N padded (16 or 32).
// Pairs of columns move as one 32-bit word.
inline void x_to_vnni(const uint16_t* x, int64_t N, int64_t C, int64_t np, uint16_t* xv) {
  const int64_t blocks = (C + 31) / 32, pairs = C / 2;
  std::memset(xv, 0, sizeof(uint16_t) * blocks * 32 * np);
  uint32_t* out = reinterpret_cast<uint32_t*>(xv);
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* row = x + n * C;
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t pair;
      std::memcpy(&pair, row + 2 * p, 4);
      out[(p / 16) * 16 * np + (p % 16) * np + n] = pair;
    }
    if (C & 1) out[(pairs / 16) * 16 * np + (pairs % 16) * np + n] = row[C - 1];
  }
}

void run_bits_amx(const uint16_t* values, const int64_t* row_ptr, const uint64_t* words, int64_t wpr,
                  const uint16_t* x, int64_t N, int64_t C, const uint16_t* bias, uint16_t* y, int64_t R, int threads) {
  const int64_t np = N <= 16 ? 16 : 32, blocks = (C + 31) / 32, row_blocks = (R + 15) / 16;
  Scratch<uint16_t, kPackedX> xv(static_cast<size_t>(blocks) * 32 * np);
  x_to_vnni(x, N, C, np, xv.data);
  const uint16_t* v_end = values + row_ptr[R];
  const bool two = N > 16;
  TileConfig cfg{};
  cfg.palette = 1;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = cfg.rows[3] = cfg.rows[4] = 16;
  cfg.colsb[0] = cfg.colsb[3] = static_cast<uint16_t>(4 * (N < 16 ? N : 16));
  cfg.colsb[1] = cfg.colsb[4] = static_cast<uint16_t>(two ? 4 * (N - 16) : 4);
  cfg.colsb[2] = 64;
  const int parts = threads > 1 ? threads : 1;
  const int64_t share = (row_blocks + parts - 1) / parts;
  for_range(parts, threads, [&](int64_t part) {
    _tile_loadconfig(&cfg);
    alignas(64) uint16_t a[2][16][32];
    alignas(64) float out[16][32];
    const uint16_t* vp[16];
    for (int64_t blk = part * share; blk < (part + 1) * share && blk < row_blocks; ++blk) {
      const int64_t r0 = 16 * blk, rows = (R - r0) < 16 ? (R - r0) : 16;
      for (int i = 0; i < 16; ++i) vp[i] = i < rows ? values + row_ptr[r0 + i] : nullptr;
      _tile_zero(0);
      if (two) _tile_zero(1);
      for (int64_t kb = 0; kb < blocks; ++kb) {
        uint16_t (*buf)[32] = a[kb & 1];
        for (int i = 0; i < 16; ++i) {
          if (i >= rows) { _mm512_store_si512(buf[i], _mm512_setzero_si512()); continue; }
          const __mmask32 m = static_cast<__mmask32>(words[(r0 + i) * wpr + kb / 2] >> (32 * (kb & 1)));
          if ((kb & 1) == 0) {
            prefetch_ahead(vp[i]);
            prefetch_ahead(words + (r0 + i) * wpr + kb / 2);
          }
          _mm512_store_si512(buf[i], _mm512_maskz_expand_epi16(m, values32(vp[i], v_end, m)));
          vp[i] += __builtin_popcount(static_cast<unsigned>(m));
        }
        _tile_loadd(2, buf, 64);
        _tile_loadd(3, xv.data + kb * 32 * np, np * 4);
        _tile_dpbf16ps(0, 2, 3);
        if (two) {
          _tile_loadd(4, xv.data + kb * 32 * np + 32, np * 4);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      _tile_stored(0, out, 128);
      if (two) _tile_stored(1, &out[0][16], 128);
      for (int64_t i = 0; i < rows; ++i) {
        const float b = bias ? BF16::load(bias + r0 + i) : 0.f;
        for (int64_t n = 0; n < N; ++n) BF16::store(y + n * R + r0 + i, out[i][n] + b);
      }
    }
    _tile_release();
  });
}
#endif

template <typename V>
void run_bits(const typename V::T* values, const int64_t* row_ptr, const uint64_t* words, int64_t wpr,
              const typename V::T* x, int64_t N, int64_t C, const typename V::T* bias, typename V::T* y, int64_t R,
              int threads) {
#if defined(CCLI_AMX)
  if constexpr (std::is_same<V, BF16>::value) {
    if (N >= 2 && N <= 32 && amx_usable()) {
      run_bits_amx(values, row_ptr, words, wpr, x, N, C, bias, y, R, threads);
      return;
    }
  }
#endif
#if defined(CCLI_BF16_DOT)
  constexpr bool raw_x = std::is_same<V, BF16>::value;
#else
  constexpr bool raw_x = false;
#endif
  Scratch<float, kPackedX> buf(std::is_same<V, F32>::value || raw_x ? 0 : N * C);
  const float* xf = raw_x ? nullptr : x_as_float<V>(x, N, C, buf);
  const typename V::T* v_end = values + row_ptr[R];
  for_range(R, threads, [&](int64_t r) {
    const typename V::T* v = values + row_ptr[r];
    const uint64_t* wr = words + r * wpr;
    const float b = bias ? V::load(bias + r) : 0.f;
    float out[8];
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
      const typename V::T* xr = x + n0 * C;
      const float* xfr = xf ? xf + n0 * C : nullptr;
      const int64_t nr = (N - n0) < 8 ? (N - n0) : 8;
      switch (nr) {
        case 1: bits_group<V, 1>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        case 2: bits_group<V, 2>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        case 3: bits_group<V, 3>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        case 4: bits_group<V, 4>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        case 5: bits_group<V, 5>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        case 6: bits_group<V, 6>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        case 7: bits_group<V, 7>(v, wr, wpr, xr, xfr, C, out, v_end); break;
        default: bits_group<V, 8>(v, wr, wpr, xr, xfr, C, out, v_end); break;
      }
      for (int64_t i = 0; i < nr; ++i) V::store(y + (n0 + i) * R + r, out[i] + b);
    }
  });
}

// ------------------------------------------------------------------- index rows, one input row

template <typename V, typename I>
inline float idx_dot(const float* x, const typename V::T* v, const I* idx, int64_t n) {
#ifdef CCLI_AVX512
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  auto lanes = [&](__mmask16 m, const I* p) {
    if (sizeof(I) == 2) return _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_maskz_loadu_epi32(m, p);
  };
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    prefetch_ahead(v + j);
    prefetch_ahead(idx + j);
    a0 = _mm512_fmadd_ps(Vec<V>::load_n(0xffff, v + j), _mm512_i32gather_ps(lanes(0xffff, idx + j), x, 4), a0);
    a1 = _mm512_fmadd_ps(Vec<V>::load_n(0xffff, v + j + 16), _mm512_i32gather_ps(lanes(0xffff, idx + j + 16), x, 4), a1);
  }
  for (; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    const __m512 xg = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, lanes(m, idx + j), x, 4);
    a0 = _mm512_fmadd_ps(Vec<V>::load_n(m, v + j), xg, a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += V::load(v + j) * x[idx[j]];
    s1 += V::load(v + j + 1) * x[idx[j + 1]];
    s2 += V::load(v + j + 2) * x[idx[j + 2]];
    s3 += V::load(v + j + 3) * x[idx[j + 3]];
  }
  for (; j < n; ++j) s0 += V::load(v + j) * x[idx[j]];
  return (s0 + s1) + (s2 + s3);
#endif
}

// --------------------------------------------------------------------------- a tile of input rows
// out[t] = sum over the row's non-zeros (col c, value v) of v * xt[c * W + t], W = 8 * L.

// S independent accumulator sets, so that S non-zeros are in flight and the FMA latency (4 cycles) is hidden
// even for narrow tiles: 4 sets at W = 8 or 16, 2 at W = 24 or 32 (then 6 or 8 chains already).
template <int L>
constexpr int kSets = L <= 2 ? 4 : 2;

#ifdef CCLI_AVX2
template <int L>
struct Acc {
  __m256 a[kSets<L>][L];
  inline void zero() {
    for (int s = 0; s < kSets<L>; ++s) for (int t = 0; t < L; ++t) a[s][t] = _mm256_setzero_ps();
  }
  inline void add(int s, float w, const float* p) {
    const __m256 b = _mm256_set1_ps(w);
    for (int t = 0; t < L; ++t) a[s][t] = _mm256_fmadd_ps(b, _mm256_loadu_ps(p + 8 * t), a[s][t]);
  }
  inline void store(float* out) {
    for (int t = 0; t < L; ++t) {
      __m256 sum = a[0][t];
      for (int s = 1; s < kSets<L>; ++s) sum = _mm256_add_ps(sum, a[s][t]);
      _mm256_storeu_ps(out + 8 * t, sum);
    }
  }
};
#else
template <int L>
struct Acc {
  float a[8 * L];
  inline void zero() { for (int t = 0; t < 8 * L; ++t) a[t] = 0.f; }
  inline void add(int, float w, const float* p) { for (int t = 0; t < 8 * L; ++t) a[t] += w * p[t]; }
  inline void store(float* out) { for (int t = 0; t < 8 * L; ++t) out[t] = a[t]; }
};
#endif

#ifdef CCLI_AVX512
// Even tile widths (16, 32) in 512-bit registers: one load and one FMA per non-zero and 16 lanes.
template <int L>
struct Acc512 {
  static constexpr int Z = L / 2;
  __m512 a[kSets<L>][Z];
  inline void zero() {
    for (int s = 0; s < kSets<L>; ++s) for (int t = 0; t < Z; ++t) a[s][t] = _mm512_setzero_ps();
  }
  inline void add(int s, float w, const float* p) {
    const __m512 b = _mm512_set1_ps(w);
    for (int t = 0; t < Z; ++t) a[s][t] = _mm512_fmadd_ps(b, _mm512_loadu_ps(p + 16 * t), a[s][t]);
  }
  inline void store(float* out) {
    for (int t = 0; t < Z; ++t) {
      __m512 sum = a[0][t];
      for (int s = 1; s < kSets<L>; ++s) sum = _mm512_add_ps(sum, a[s][t]);
      _mm512_storeu_ps(out + 16 * t, sum);
    }
  }
};
template <int L>
using AccFor = typename std::conditional<L % 2 == 0, Acc512<L>, Acc<L>>::type;
#else
template <int L>
using AccFor = Acc<L>;
#endif

template <int L, typename V, typename I>
inline void idx_tile(const float* xt, const typename V::T* v, const I* idx, int64_t n, float* out) {
  constexpr int W = 8 * L, S = kSets<L>;
  AccFor<L> acc;
  acc.zero();
  int64_t j = 0;
  for (; j + S <= n; j += S)
    for (int s = 0; s < S; ++s) acc.add(s, V::load(v + j + s), xt + static_cast<int64_t>(idx[j + s]) * W);
  for (; j < n; ++j) acc.add(0, V::load(v + j), xt + static_cast<int64_t>(idx[j]) * W);
  acc.store(out);
}

template <typename V>
struct Product {  // a row-sparse matrix with explicit column indices (int16 or int32)
  using T = typename V::T;
  const T* values;
  Rows rows;
  int kind;  // kIdx16 or kIdx32
  const void* cols;

  inline float dot(const float* x, int64_t r) const {
    const int64_t b = rows.begin(r), n = rows.end(r) - b;
    if (kind == kIdx16) return idx_dot<V>(x, values + b, static_cast<const int16_t*>(cols) + b, n);
    return idx_dot<V>(x, values + b, static_cast<const int32_t*>(cols) + b, n);
  }

  template <int L>
  inline void tile_l(const float* xt, int64_t r, float* out) const {
    const int64_t b = rows.begin(r), n = rows.end(r) - b;
    if (kind == kIdx16) idx_tile<L, V>(xt, values + b, static_cast<const int16_t*>(cols) + b, n, out);
    else idx_tile<L, V>(xt, values + b, static_cast<const int32_t*>(cols) + b, n, out);
  }

  inline void tile(int w, const float* xt, int64_t r, float* out) const {
    switch (w) {
      case 8: tile_l<1>(xt, r, out); break;
      case 16: tile_l<2>(xt, r, out); break;
      case 24: tile_l<3>(xt, r, out); break;
      default: tile_l<4>(xt, r, out); break;
    }
  }
};

constexpr int64_t kRowBlock = 32;
// Up to this many 32-row tiles of x, blocks of output rows are the outer loop; beyond, tiles are. Measured
// with benchmarks/condensed_layers.py --threads 1 --clock thread, 90% sparsity: at 256 rows tile-outer took
// 5.1 ms vs 7.6 (3072x768) and 71 ms vs 114 (4096x11008); at 64 rows 1.2 vs 1.8 and 22 vs 17.
constexpr int64_t kTilesRowsOuter = 2;

template <typename V>
void run_idx(const Product<V>& p, const typename V::T* x, int64_t N, int64_t C, const typename V::T* bias,
             typename V::T* y, int64_t R, int threads) {
  if (N == 1) {
    Scratch<float, kPackedX> buf(std::is_same<V, F32>::value ? 0 : C);
    const float* xf = x_as_float<V>(x, 1, C, buf);
    for_range(R, threads, [&](int64_t r) { V::store(y + r, p.dot(xf, r) + (bias ? V::load(bias + r) : 0.f)); });
    return;
  }
  // Tiles of 32 rows of x; the last one rounded up to a multiple of 8 and zero-padded.
  const int64_t tiles = (N + 31) / 32;
  auto width = [&](int64_t t) { const int64_t rest = N - 32 * t; return rest >= 32 ? 32 : ((rest + 7) / 8) * 8; };
  Scratch<float, kPackedX> packed(static_cast<size_t>(tiles) * 32 * C);
  for_range(tiles, threads, [&](int64_t t) {  // packed[t][c][i] = x[32 t + i][c]
    float* dst = packed.data + t * 32 * C;
    const int64_t w = width(t), n0 = 32 * t, real = (N - n0) < w ? (N - n0) : w;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < real; ++i) dst[c * w + i] = V::load(x + (n0 + i) * C + c);
      for (int64_t i = real; i < w; ++i) dst[c * w + i] = 0.f;
    }
  });
  auto one = [&](int64_t t, int64_t r) {
    float acc[32];
    const int64_t w = width(t), n0 = 32 * t, real = (N - n0) < w ? (N - n0) : w;
    p.tile(static_cast<int>(w), packed.data + t * 32 * C, r, acc);
    const float b = bias ? V::load(bias + r) : 0.f;
    for (int64_t i = 0; i < real; ++i) V::store(y + (n0 + i) * R + r, acc[i] + b);
  };
  if (tiles <= kTilesRowsOuter) {
    // Few tiles: they stay in L2 while a block of rows' values and columns is reused across them.
    for_range((R + kRowBlock - 1) / kRowBlock, threads, [&](int64_t blk) {
      const int64_t rb = blk * kRowBlock, re = (rb + kRowBlock) < R ? (rb + kRowBlock) : R;
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t r = rb; r < re; ++r) one(t, r);
    });
  } else {
    // Many tiles: one tile at a time stays in L2 while the values and columns stream past it; each thread
    // takes a contiguous share of the rows for every tile (one parallel region, not one per tile).
    const int64_t share = (R + threads - 1) / (threads > 1 ? threads : 1);
    for_range((R + share - 1) / share, threads, [&](int64_t part) {
      const int64_t r0 = part * share, r1 = (r0 + share) < R ? (r0 + share) : R;
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t r = r0; r < r1; ++r) one(t, r);
    });
  }
}

// ------------------------------------------------------------------------------ decoding to dense

template <typename V>
inline void bits_to_dense_row(const typename V::T* v, const uint64_t* words, int64_t wpr, typename V::T* row,
                              int64_t C, const typename V::T* v_end) {
  using T = typename V::T;
#if defined(CCLI_AVX512)
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m64 = words[w];
#if defined(CCLI_BF16_DOT)
    if constexpr (sizeof(T) == 2) {  // 32 columns per vpexpandw
      for (int h = 0; h < 2; ++h) {
        const int64_t col = 64 * w + 32 * h;
        if (col >= C) return;
        const __mmask32 m = static_cast<__mmask32>(m64 >> (32 * h));
        const __mmask32 inside = C - col >= 32 ? ~0u : static_cast<__mmask32>((1u << (C - col)) - 1u);
        _mm512_mask_storeu_epi16(row + col, inside, _mm512_maskz_expand_epi16(m, values32(v, v_end, m)));
        v += __builtin_popcount(static_cast<unsigned>(m));
      }
      continue;
    }
#endif
    for (int q = 0; q < 4; ++q) {
      const int64_t col = 64 * w + 16 * q;
      if (col >= C) return;
      const __mmask16 m = static_cast<__mmask16>(m64 >> (16 * q));
      const __mmask16 inside = first_lanes(C - col);
      if constexpr (sizeof(T) == 4) {
        _mm512_mask_storeu_ps(row + col, inside, _mm512_maskz_expandloadu_ps(m, v));
      } else {
        const __m256i packed = _mm256_maskz_loadu_epi16(first_lanes(__builtin_popcount(m)), v);
        const __m512i wide = _mm512_maskz_expand_epi32(m, _mm512_cvtepu16_epi32(packed));
        _mm256_mask_storeu_epi16(row + col, inside, _mm512_cvtepi32_epi16(wide));
      }
      v += __builtin_popcount(static_cast<unsigned>(m));
    }
  }
#else
  (void)v_end;
  std::memset(row, 0, sizeof(T) * C);
  for (int64_t w = 0; w < wpr; ++w)
    for (uint64_t m = words[w]; m; m &= m - 1) row[w * 64 + __builtin_ctzll(m)] = *v++;
#endif
}

template <typename V>
void to_dense(const typename V::T* values, Rows rows, int kind, const void* cols, int64_t wpr, typename V::T* out,
              int64_t r0, int64_t r1, int64_t R, int64_t C, int threads) {
  using T = typename V::T;
  for_range(r1 - r0, threads, [&](int64_t i) {
    const int64_t r = r0 + i;
    T* row = out + i * C;
    const int64_t b = rows.begin(r), e = rows.end(r);
    if (kind == kBits) {
      bits_to_dense_row<V>(values + b, static_cast<const uint64_t*>(cols) + r * wpr, wpr, row, C, values + rows.end(R - 1));
      return;
    }
    std::memset(row, 0, sizeof(T) * C);
    if (kind == kIdx16) {
      const int16_t* idx = static_cast<const int16_t*>(cols);
      for (int64_t j = b; j < e; ++j) row[idx[j]] = values[j];
    } else {
      const int32_t* idx = static_cast<const int32_t*>(cols);
      for (int64_t j = b; j < e; ++j) row[idx[j]] = values[j];
    }
  });
}

// --------------------------------------------------------------------------------- RPS weights
// w[r][c] = memory[slot(r, c)] * (sign(p) * scale), p = offset + r * cols + c, as codecs/rps/hashing.py.

constexpr uint64_t kPrime = 2147483647ull;  // 2^31 - 1

inline uint64_t mod_prime(uint64_t y) {  // y mod (2^31 - 1) for any 64-bit y, by folding
  y = (y & kPrime) + (y >> 31);
  y = (y & kPrime) + (y >> 31);
  return y >= kPrime ? y - kPrime : y;
}

inline uint64_t mul31(uint64_t a, uint64_t b) {  // a, b < 2^31: the 64-bit product (one vpmuludq)
  return static_cast<uint64_t>(static_cast<uint32_t>(a)) * static_cast<uint32_t>(b);
}

struct RpsSpec {  // the int64 array cpu.py passes, in this order
  int64_t mapper;  // 0 randomfold, 1 roast
  int64_t layout;  // 0 linear, 1 conv, 2 embedding
  int64_t offset, rows, cols, memory_size, block_k, block_n, block_z, span;
  int64_t sign[4], chunk[2], tile[3];
};

inline uint32_t sign_hash(uint64_t p, const RpsSpec& s) {  // c0 x^3 + c1 x^2 + c2 x + c3 mod P, x = p mod P
  const uint64_t x = mod_prime(p);
  uint64_t h = static_cast<uint64_t>(s.sign[0]);
  h = mod_prime(mul31(h, x) + static_cast<uint64_t>(s.sign[1]));
  h = mod_prime(mul31(h, x) + static_cast<uint64_t>(s.sign[2]));
  h = mod_prime(mul31(h, x) + static_cast<uint64_t>(s.sign[3]));
  return static_cast<uint32_t>(h);
}

inline int64_t tile_location(int64_t x, int64_t y, const RpsSpec& s) {
  const uint64_t h = mul31(static_cast<uint64_t>(s.tile[0]), static_cast<uint64_t>(x) % kPrime) +
                     mul31(static_cast<uint64_t>(s.tile[1]), static_cast<uint64_t>(y) % kPrime) +
                     static_cast<uint64_t>(s.tile[2]);
  return static_cast<int64_t>((h % kPrime) % static_cast<uint64_t>(s.span));
}

inline uint32_t add_mod(uint32_t a, uint32_t b) { const uint32_t t = a + b; return t >= kPrime ? t - kPrime : t; }
inline uint32_t sub_mod(uint32_t a, uint32_t b) { return a >= b ? a - b : a + static_cast<uint32_t>(kPrime) - b; }

// Sign bits of positions p0 .. p0 + n - 1 (bit i of bits[i / 64] set: negative). The hash is a cubic
// polynomial in p mod P, so along p it is stepped by forward differences (f, d1, d2, d3: three modular
// additions per position), 16 lanes at a time where there is AVX-512, each lane 16 positions apart.
inline void sign_bits(uint64_t p0, int64_t n, const RpsSpec& s, uint64_t* bits) {
  std::memset(bits, 0, sizeof(uint64_t) * ((n + 63) / 64));
  int64_t i = 0;
#ifdef CCLI_AVX512
  if (n >= 64) {
    alignas(64) uint32_t f[4][16];  // f[t][lane] = hash(p0 + lane + 16 t)
    uint32_t h = sign_hash(p0, s), d1, d2, d3;
    {
      const uint32_t f1 = sign_hash(p0 + 1, s), f2 = sign_hash(p0 + 2, s), f3 = sign_hash(p0 + 3, s);
      d1 = sub_mod(f1, h);
      d2 = sub_mod(sub_mod(f2, f1), d1);
      d3 = sub_mod(sub_mod(sub_mod(f3, f2), sub_mod(f2, f1)), d2);
    }
    for (int j = 0; j < 64; ++j) {  // the first 64 positions, stepped one at a time
      f[j / 16][j % 16] = h;
      h = add_mod(h, d1);
      d1 = add_mod(d1, d2);
      d2 = add_mod(d2, d3);
    }
    const __m512i P = _mm512_set1_epi32(static_cast<int>(kPrime));
    auto add = [&](__m512i a, __m512i b) { const __m512i t = _mm512_add_epi32(a, b); return _mm512_min_epu32(t, _mm512_sub_epi32(t, P)); };
    auto sub = [&](__m512i a, __m512i b) { const __m512i t = _mm512_sub_epi32(a, b); return _mm512_min_epu32(t, _mm512_add_epi32(t, P)); };
    const __m512i f0 = _mm512_load_si512(f[0]), f1 = _mm512_load_si512(f[1]);
    const __m512i f2 = _mm512_load_si512(f[2]), f3 = _mm512_load_si512(f[3]);
    __m512i g = f0, e1 = sub(f1, f0);  // differences with step 16 per lane
    __m512i e2 = sub(sub(f2, f1), e1);
    const __m512i e3 = sub(sub(sub(f3, f2), sub(f2, f1)), e2);
    const __m512i one = _mm512_set1_epi32(1);
    uint16_t* out16 = reinterpret_cast<uint16_t*>(bits);
    for (; i + 16 <= n; i += 16) {
      out16[i / 16] = static_cast<uint16_t>(_mm512_test_epi32_mask(g, one));
      g = add(g, e1);
      e1 = add(e1, e2);
      e2 = add(e2, e3);
    }
  }
#endif
  for (; i < n; ++i)
    if (sign_hash(p0 + i, s) & 1u) bits[i / 64] |= 1ull << (i % 64);
}

// out[i] = mem[slot + i * stride] * (+-scale by bit (c + i) of `neg`) for i < n, as float (the rounding
// to the memory's dtype is the caller's: it stores with V::store).
template <typename V>
inline void fill_run(const typename V::T* mem, int64_t slot, int64_t stride, const uint64_t* neg, int64_t c, int64_t n,
                     float scale, float* out) {
  int64_t i = 0;
#ifdef CCLI_AVX512
  const __m512 plus = _mm512_set1_ps(scale), minus = _mm512_set1_ps(-scale);
  for (; i < n; i += 16) {
    const __mmask16 m = first_lanes(n - i);
    const int64_t q = c + i;  // sign bits q .. q + 15, across at most two words
    const uint64_t lo = neg[q / 64] >> (q % 64);
    const uint64_t hi = (q % 64) > 48 ? neg[q / 64 + 1] << (64 - q % 64) : 0;
    const __mmask16 minus_lanes = static_cast<__mmask16>(lo | hi);
    __m512 w;
    if (stride == 1) {
      w = Vec<V>::load_n(m, mem + slot + i);
    } else {  // roast's linear tiles: a strided run (tile columns apart)
      alignas(64) float g[16];
      for (int64_t j = 0; j < 16 && i + j < n; ++j) g[j] = V::load(mem + slot + (i + j) * stride);
      w = _mm512_maskz_loadu_ps(m, g);
    }
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(w, _mm512_mask_blend_ps(minus_lanes, plus, minus)));
  }
#else
  for (; i < n; ++i) {
    const int64_t q = c + i;
    const float sg = (neg[q / 64] >> (q % 64) & 1) ? -scale : scale;
    out[i] = V::load(mem + slot + i * stride) * sg;
  }
#endif
}

// Row r of the weight, as float32 (each weight exactly mem * (+-scale) in float32), into out[cols]; `neg`
// is scratch for cols sign bits.
template <typename V>
void rps_row(const typename V::T* mem, const RpsSpec& s, float scale, int64_t r, float* out, uint64_t* neg) {
  const int64_t cols = s.cols, M = s.memory_size;
  const uint64_t p0 = static_cast<uint64_t>(s.offset + r * cols);
  sign_bits(p0, cols, s, neg);
  if (s.mapper == 0) {  // randomfold: runs of consecutive slots, one rotation per chunk of M positions
    int64_t c = 0;
    while (c < cols) {
      const uint64_t p = p0 + c, q = p / M;
      const int64_t o = static_cast<int64_t>(p - q * M);
      const int64_t base = static_cast<int64_t>(
          mod_prime(mul31(static_cast<uint64_t>(s.chunk[0]), q % kPrime) + static_cast<uint64_t>(s.chunk[1])) % M);
      int64_t slot = base + o >= M ? base + o - M : base + o;
      const int64_t in_chunk = (M - o) < (cols - c) ? (M - o) : (cols - c);
      for (int64_t done = 0; done < in_chunk;) {  // at most two contiguous runs per chunk (the slot wraps once)
        const int64_t run = (M - slot) < (in_chunk - done) ? (M - slot) : (in_chunk - done);
        fill_run<V>(mem, slot, 1, neg, c + done, run, scale, out + c + done);
        done += run;
        slot = 0;
      }
      c += in_chunk;
    }
    return;
  }
  // roast: runs inside one tile (or ROBE-Z chunk), whose location is hashed once per run
  const int64_t step = s.layout == 0 ? s.block_k : (s.layout == 1 ? s.block_n : s.block_z);
  for (int64_t c = 0; c < cols; c += step - c % step) {
    const int64_t n = (step - c % step) < (cols - c) ? (step - c % step) : (cols - c);
    if (s.layout == 0) {  // linear: tiles of the (in, out) view; r is the output, c the input (stride block_n)
      const int64_t slot = tile_location(c / s.block_k, r / s.block_n, s) + (c % s.block_k) * s.block_n +
                           (r % s.block_n);
      fill_run<V>(mem, slot, s.block_n, neg, c, n, scale, out + c);
    } else if (s.layout == 1) {  // conv: tiles of the (out, in * kh * kw) view
      const int64_t slot = tile_location(r / s.block_k, c / s.block_n, s) + (r % s.block_k) * s.block_n +
                           (c % s.block_n);
      fill_run<V>(mem, slot, 1, neg, c, n, scale, out + c);
    } else {  // embedding (ROBE-Z): row r, chunks of block_z columns
      fill_run<V>(mem, tile_location(r, c / s.block_z, s) + c % s.block_z, 1, neg, c, n, scale, out + c);
    }
  }
}

template <typename V>
void rps_rows(const void* memory, const RpsSpec& s, float scale, int64_t row0, int64_t row1, void* out, int threads) {
  using T = typename V::T;
  const T* mem = static_cast<const T*>(memory);
  T* o = static_cast<T*>(out);
  for_range(row1 - row0, threads, [&](int64_t i) {
    Scratch<float, kRowBuffer> row(s.cols + (s.cols + 63) / 64 * 2 + 16);
    uint64_t* neg = reinterpret_cast<uint64_t*>(row.data + ((s.cols + 15) / 16) * 16);
    rps_row<V>(mem, s, scale, row0 + i, row.data, neg);
    T* dst = o + i * s.cols;
    for (int64_t c = 0; c < s.cols; ++c) V::store(dst + c, row.data[c]);
  });
}

// y (N, rows) = x (N, cols) @ W^T (+ bias), each row of W computed into an L1 buffer and used at once.
template <typename V>
void rps_product(const void* memory, const RpsSpec& s, float scale, const typename V::T* x, int64_t N,
                 const typename V::T* bias, typename V::T* y, int threads) {
  const int64_t C = s.cols, R = s.rows;
  Scratch<float, kPackedX> buf(std::is_same<V, F32>::value ? 0 : N * C);
  const float* xf = x_as_float<V>(x, N, C, buf);
  const typename V::T* mem = static_cast<const typename V::T*>(memory);
  for_range(R, threads, [&](int64_t r) {
    Scratch<float, kRowBuffer> row(C + (C + 63) / 64 * 2 + 16);
    uint64_t* neg = reinterpret_cast<uint64_t*>(row.data + ((C + 15) / 16) * 16);
    rps_row<V>(mem, s, scale, r, row.data, neg);
    const float b = bias ? V::load(bias + r) : 0.f;
    for (int64_t n = 0; n < N; ++n) {
      const float* xn = xf + n * C;
#ifdef CCLI_AVX512
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t c = 0;
      for (; c + 32 <= C; c += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(row.data + c), _mm512_loadu_ps(xn + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(row.data + c + 16), _mm512_loadu_ps(xn + c + 16), a1);
      }
      for (; c < C; c += 16) {
        const __mmask16 m = first_lanes(C - c);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, row.data + c), _mm512_maskz_loadu_ps(m, xn + c), a0);
      }
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
      float sum = 0.f;
      for (int64_t c = 0; c < C; ++c) sum += row.data[c] * xn[c];
#endif
      V::store(y + n * R + r, sum + b);
    }
  });
}

}  // namespace

namespace {
// Calls f(V{}) for the dtype code (0 float32, 1 bfloat16, 2 float16); false for an unknown one.
template <typename F>
inline bool with_dtype(int dtype, const F& f) {
  switch (dtype) {
    case 0: f(F32{}); return true;
    case 1: f(BF16{}); return true;
    case 2: f(F16{}); return true;
    default: return false;
  }
}

// ------------------------------------------------------------ x @ M for a row-major M, few input rows
// y (N, R) = x (N, K) @ M (K, R), N <= 8, M as stored: FiPS's shared U (hidden x rank), which an "in" layer projects
// onto. torch's bfloat16 / float16 GEMM reads M in this orientation at half the bandwidth it reaches as
// F.linear's weight (2048 x 2922 bfloat16, one row: 1.26 ms against 0.65 for the same bytes). Here each thread
// streams a contiguous share of M's rows, adding x[n][k] * M[k] into float32 partial sums (N x R, in cache);
// the threads' partials are summed at the end.
template <typename V>
void row_major_product(const typename V::T* x, int64_t N, int64_t K, const typename V::T* m, int64_t R,
                       typename V::T* y, int threads) {
  const int parts = threads > 1 ? threads : 1;
  const int64_t share = (K + parts - 1) / parts;
  Scratch<float, kRowBuffer> partial(static_cast<size_t>(parts) * N * R);
  for_range(parts, threads, [&](int64_t part) {
    float* acc = partial.data + part * N * R;
    std::memset(acc, 0, sizeof(float) * N * R);
    const int64_t k1 = (part + 1) * share < K ? (part + 1) * share : K;
    for (int64_t k = part * share; k < k1; k += 4) {  // 4 rows of M at a time: one pass over the sums per 4
      const int rows = k1 - k < 4 ? static_cast<int>(k1 - k) : 4;
      float xs[8][4] = {};
      for (int64_t n = 0; n < N; ++n) for (int j = 0; j < rows; ++j) xs[n][j] = V::load(x + n * K + k + j);
      const typename V::T* row[4];
      for (int j = 0; j < 4; ++j) row[j] = m + (k + (j < rows ? j : 0)) * R;  // a missing row is read, times 0
#ifdef CCLI_AVX512
      for (int64_t c = 0; c < R; c += 16) {
        const __mmask16 lanes = first_lanes(R - c);
        __m512 w[4];
        for (int j = 0; j < 4; ++j) {
          prefetch_ahead(row[j] + c);
          w[j] = Vec<V>::load_n(lanes, row[j] + c);
        }
        for (int64_t n = 0; n < N; ++n) {
          float* a = acc + n * R + c;
          __m512 sum = _mm512_maskz_loadu_ps(lanes, a);
          for (int j = 0; j < 4; ++j) sum = _mm512_fmadd_ps(_mm512_set1_ps(xs[n][j]), w[j], sum);
          _mm512_mask_storeu_ps(a, lanes, sum);
        }
      }
#else
      for (int64_t n = 0; n < N; ++n) {
        float* a = acc + n * R;
        for (int64_t c = 0; c < R; ++c)
          a[c] += xs[n][0] * V::load(row[0] + c) + xs[n][1] * V::load(row[1] + c) + xs[n][2] * V::load(row[2] + c) +
                  xs[n][3] * V::load(row[3] + c);
      }
#endif
    }
  });
  for (int64_t i = 0; i < N * R; ++i) {
    float sum = partial.data[i];
    for (int p = 1; p < parts; ++p) sum += partial.data[p * N * R + i];
    V::store(y + i, sum);
  }
}
}  // namespace

// ------------------------------------------------ int8 values in the row-sparse products (issue 21)
// The bitmask / CSR structure as above, but each kept value stored as a signed 8-bit code (one int8 per value,
// in the same row-major kept order) with float scales on a grid over the dense (R, C) coordinates:
// scales[r * groups + c / group] (per row: groups 1, group C), in float32, bfloat16 or float16 (the checkpoint's
// dtype, read as stored: no converted copy is held). Symmetric only: w = code * scale.
// Arithmetic (all in float32): per scale group (the row, or `group` columns when that is a multiple of 64, i.e.
// whole mask words), sum_j code_j * x_j, times the group's scale, summed over the groups; other group sizes:
// each 16-column chunk's codes multiplied by their lanes' scales (code * scale is exact in float32 for
// bfloat16 / float16 scales: 8 + 11 significant bits) before the FMA with x. The decoder writes
// code * scale rounded once to the activation dtype: for scales in that dtype, the dequantized value exactly.
// AVX-512: codes expanded in registers (vpexpandb, 64 columns at a time, where the build has VBMI2; else
// 16 at a time through int32 lanes); bitmask rows with 2 or more bfloat16 input rows and scales per row or per
// multiple of 64 columns multiply by vdpbf16ps (AVX512_BF16) on x as stored, the scale applied to each
// group's sum. Other builds: one set bit at a time (correct, not fast).
namespace {

inline float q8_scale(const void* s, int sd, int64_t i) {
  if (sd == 0) return static_cast<const float*>(s)[i];
  if (sd == 1) return BF16::load(static_cast<const uint16_t*>(s) + i);
  return F16::load(static_cast<const uint16_t*>(s) + i);
}

struct Q8Scales {  // one row's scales, walked left to right: the scale of column `col` when asked in order
  const void* s;
  int sd;
  int64_t base, group, g, next, C;  // the current group g covers columns [next - group, next)
  float cur;
  Q8Scales(const void* s_, int sd_, int64_t row, int64_t groups, int64_t group_, int64_t C_)
      : s(s_), sd(sd_), base(row * groups), group(group_), g(0), next(group_), C(C_),
        cur(q8_scale(s_, sd_, row * groups)) {}
  inline float at(int64_t col) {  // any column (an index row need not be sorted): a division only off the group
    if (col >= next || col < next - group) {
      g = col / group;
      next = (g + 1) * group;
      cur = q8_scale(s, sd, base + g);
    }
    return cur;
  }
#ifdef CCLI_AVX512
  inline __m512 lanes(int64_t col) {  // columns col .. col + 15, col never decreasing from call to call
    while (col >= next) { ++g; next += group; cur = q8_scale(s, sd, base + g); }
    __m512 sv = _mm512_set1_ps(cur);
    int64_t k = g + 1;
    for (int64_t b = next; b < col + 16 && b < C; b += group, ++k)  // boundaries inside the 16 columns
      sv = _mm512_mask_mov_ps(sv, static_cast<__mmask16>(0xffffu << (b - col)), _mm512_set1_ps(q8_scale(s, sd, base + k)));
    return sv;
  }
#endif
};

#ifdef CCLI_AVX512
inline __m512 q8_widen(__m128i codes16) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes16)); }  // CSR

// The codes of 64 columns in their lanes (zero where the mask has no bit), as four 16-lane int8 groups, through
// a 64-byte buffer: four sign-extending loads from it (vpmovsxbd from memory) cost fewer shuffle-port
// operations than extracting the lanes from the register. The codes are read by a plain load while 64 remain.
struct alignas(64) Q8Lanes {
  int8_t b[64];
  inline __m512 widened(int q) const {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(b + 16 * q))));
  }
};

inline void q8_expand64(const int8_t*& v, const int8_t* v_end, uint64_t m64, Q8Lanes& out) {
#if defined(CCLI_BF16_DOT)
  const int pc = __builtin_popcountll(m64);
  const __m512i raw = v + 64 <= v_end ? _mm512_loadu_si512(v)
                                      : _mm512_maskz_loadu_epi8(pc >= 64 ? ~0ull : ((1ull << pc) - 1ull), v);
  _mm512_store_si512(out.b, _mm512_maskz_expand_epi8(m64, raw));
  v += pc;
#else
  (void)v_end;
  for (int q = 0; q < 4; ++q) {
    const __mmask16 m = static_cast<__mmask16>(m64 >> (16 * q));
    const int pc = __builtin_popcount(static_cast<unsigned>(m));
    const __m512i wide = _mm512_maskz_expand_epi32(m, _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(first_lanes(pc), v)));
    _mm_store_si128(reinterpret_cast<__m128i*>(out.b + 16 * q), _mm512_cvtepi32_epi8(wide));
    v += pc;
  }
#endif
  asm volatile("" ::: "memory");  // keep the buffer in memory (not folded back into lane extractions)
}

// Mask word w of a row and its codes in their lanes (v advanced past them), both streams prefetched ahead;
// returns the word (0: nothing stored there, `codes` untouched).
inline uint64_t q8_word_codes(const int8_t*& v, const int8_t* v_end, const uint64_t* words, int64_t w,
                              Q8Lanes& codes) {
  const uint64_t m64 = words[w];
  prefetch_ahead(words + w);
  prefetch_ahead(v);
  if (m64) q8_expand64(v, v_end, m64, codes);
  return m64;
}
#endif

// out[n] = sum over the row's set bits of w_j * x[n][j], n < NR (x float32, rows C apart).
// wpg: words per scale where groups are whole mask words (one scale per row: wpr), each group's sum then times
// its scale; 0 where they are not (each chunk's codes times its lanes' scales).
template <int NR, bool Grouped>
inline void q8_bits_row(const int8_t* v, const int8_t* v_end, const uint64_t* words, int64_t wpr, int64_t wpg,
                        const float* x, int64_t C, Q8Scales sc, float* out) {
#ifdef CCLI_AVX512
  constexpr int S = NR == 1 ? 4 : 2;
  const bool lanes = Grouped && wpg == 0;
  const int64_t step = wpg ? wpg : wpr;
  __m512 total[NR];
  for (int n = 0; n < NR; ++n) total[n] = _mm512_setzero_ps();
  for (int64_t w0 = 0, g = 0; w0 < wpr; w0 += step, ++g) {
    __m512 acc[S][NR];
    for (int s = 0; s < S; ++s) for (int n = 0; n < NR; ++n) acc[s][n] = _mm512_setzero_ps();
    const int64_t w1 = w0 + step < wpr ? w0 + step : wpr;
    for (int64_t w = w0; w < w1; ++w) {
      Q8Lanes codes;
      const uint64_t m64 = q8_word_codes(v, v_end, words, w, codes);
      if (!m64) continue;
      for (int q = 0; q < 4; ++q) {
        const __mmask16 m = static_cast<__mmask16>(m64 >> (16 * q));
        if (!m) continue;
        const int64_t col = 64 * w + 16 * q;
        __m512 wv = codes.widened(q);
        if (Grouped && lanes) wv = _mm512_mul_ps(wv, sc.lanes(col));
        for (int n = 0; n < NR; ++n)
          acc[q % S][n] = _mm512_fmadd_ps(wv, x_lanes16(x + n * C, col, C, m), acc[q % S][n]);
      }
    }
    const __m512 scale = _mm512_set1_ps(lanes ? 1.f : q8_scale(sc.s, sc.sd, sc.base + g));
    for (int n = 0; n < NR; ++n) {
      __m512 sum = acc[0][n];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][n]);
      total[n] = _mm512_fmadd_ps(sum, scale, total[n]);
    }
  }
  for (int n = 0; n < NR; ++n) out[n] = _mm512_reduce_add_ps(total[n]);
#else
  for (int n = 0; n < NR; ++n) out[n] = 0.f;
  (void)v_end;
  (void)wpg;
  for (int64_t w = 0; w < wpr; ++w)
    for (uint64_t m = words[w]; m; m &= m - 1) {
      const int64_t col = 64 * w + __builtin_ctzll(m);
      const float wv = Grouped ? *v++ * sc.at(col) : static_cast<float>(*v++);
      for (int n = 0; n < NR; ++n) out[n] += wv * x[n * C + col];
    }
  if (!Grouped) for (int n = 0; n < NR; ++n) out[n] *= sc.cur;
#endif
}

#if defined(CCLI_BF16_DOT)
// bfloat16 activations, scales per row or per group of a multiple of 64 columns (whole mask words): a code is
// exact in bfloat16, so 32 columns at a time multiply in pairs with x as stored (vdpbf16ps, each product exact
// in float32); each group's sum is multiplied by its scale (wpg: words per group, wpr for one scale per row).
template <int NR>
inline void q8_bits_row_bf16(const int8_t* v, const int8_t* v_end, const uint64_t* words, int64_t wpr, int64_t wpg,
                             const uint16_t* x, int64_t C, const Q8Scales& sc, float* out) {
  __m512 total[NR];
  for (int n = 0; n < NR; ++n) total[n] = _mm512_setzero_ps();
  for (int64_t w0 = 0, g = 0; w0 < wpr; w0 += wpg, ++g) {
    __m512 acc[2][NR];
    for (int h = 0; h < 2; ++h) for (int n = 0; n < NR; ++n) acc[h][n] = _mm512_setzero_ps();
    const int64_t w1 = w0 + wpg < wpr ? w0 + wpg : wpr;
    for (int64_t w = w0; w < w1; ++w) {
      Q8Lanes codes;
      const uint64_t m64 = q8_word_codes(v, v_end, words, w, codes);
      if (!m64) continue;
      for (int h = 0; h < 2; ++h) {
        const __mmask32 m = static_cast<__mmask32>(m64 >> (32 * h));
        if (!m) continue;
        const __m512bh wv = _mm512_cvtne2ps_pbh(codes.widened(2 * h + 1), codes.widened(2 * h));
        const int64_t col = 64 * w + 32 * h;
        for (int n = 0; n < NR; ++n)
          acc[h][n] = _mm512_dpbf16_ps(acc[h][n], wv, (__m512bh)x_lanes32(x + n * C, col, C, m));
      }
    }
    const __m512 scale = _mm512_set1_ps(q8_scale(sc.s, sc.sd, sc.base + g));
    for (int n = 0; n < NR; ++n) total[n] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][n], acc[1][n]), scale, total[n]);
  }
  for (int n = 0; n < NR; ++n) out[n] = _mm512_reduce_add_ps(total[n]);
}
#endif

// The same for index rows (CSR: int16 / int32 columns). One input row with one scale per row gathers x 16
// lanes at a time; otherwise one value at a time, its scale looked up by Q8Scales::at.
template <typename I, int NR>
inline void q8_idx_row(const int8_t* v, const I* idx, int64_t n_vals, const float* x, int64_t C, bool grouped,
                       Q8Scales sc, float* out) {
#ifdef CCLI_AVX512
  if (NR == 1 && !grouped) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j < n_vals; j += 16) {
      const __mmask16 m = first_lanes(n_vals - j);
      prefetch_ahead(v + j);
      prefetch_ahead(idx + j);
      const __m512i lanes = sizeof(I) == 2 ? _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, idx + j))
                                           : _mm512_maskz_loadu_epi32(m, idx + j);
      const __m512 xg = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, lanes, x, 4);
      const __m512 wv = q8_widen(_mm_maskz_loadu_epi8(m, v + j));
      if ((j / 16) & 1) a1 = _mm512_fmadd_ps(wv, xg, a1);
      else a0 = _mm512_fmadd_ps(wv, xg, a0);
    }
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * sc.cur;
    return;
  }
#endif
  for (int n = 0; n < NR; ++n) out[n] = 0.f;
  for (int64_t j = 0; j < n_vals; ++j) {
    const int64_t col = idx[j];
    const float wv = grouped ? v[j] * sc.at(col) : static_cast<float>(v[j]);
    for (int n = 0; n < NR; ++n) out[n] += wv * x[n * C + col];
  }
  if (!grouped) for (int n = 0; n < NR; ++n) out[n] *= sc.cur;
}

struct Q8Matrix {
  const int8_t* codes;
  const int64_t* row_ptr;
  int kind;  // kIdx16, kIdx32 or kBits
  const void* cols;
  int64_t wpr;
  const void* scales;
  int sd;  // the scales' dtype code
  int64_t group, groups, C;
  const int8_t* codes_end;  // no code is read at or past it
  Q8Scales scales_of(int64_t r) const { return Q8Scales(scales, sd, r, groups, group, C); }
};

// Whether bfloat16 x is read as stored (q8_bits_row_bf16) rather than converted to float32 once per call: from 2
// input rows. At one row the float32 FMAs ran faster (5632x2048 at 50%, 2 threads, timed round robin over 730 MB
// of copies: 0.70 ms against 1.27 ms; at 8 rows vdpbf16ps 1.76 ms against 2.88).
template <typename V>
inline bool q8_raw_x(const Q8Matrix& q, int64_t N) {
#if defined(CCLI_BF16_DOT)
  return std::is_same<V, BF16>::value && N >= 2 && q.kind == kBits && (q.groups == 1 || q.group % 64 == 0);
#else
  (void)q;
  (void)N;
  return false;
#endif
}

template <typename V, int NR>
inline void q8_row(const Q8Matrix& q, int64_t r, bool raw, const typename V::T* xr, const float* x, float* out) {
  const int8_t* v = q.codes + q.row_ptr[r];
  const int64_t n_vals = q.row_ptr[r + 1] - q.row_ptr[r];
  const bool grouped = q.groups > 1;
#if defined(CCLI_BF16_DOT)
  if constexpr (std::is_same<V, BF16>::value) {
    if (raw) {
      q8_bits_row_bf16<NR>(v, q.codes_end, static_cast<const uint64_t*>(q.cols) + r * q.wpr, q.wpr,
                           q.groups == 1 ? q.wpr : q.group / 64, xr, q.C, q.scales_of(r), out);
      return;
    }
  }
#endif
  (void)raw;
  (void)xr;
  if (q.kind == kBits) {
    const uint64_t* words = static_cast<const uint64_t*>(q.cols) + r * q.wpr;
    if (grouped) q8_bits_row<NR, true>(v, q.codes_end, words, q.wpr, q.group % 64 ? 0 : q.group / 64, x, q.C,
                                       q.scales_of(r), out);
    else q8_bits_row<NR, false>(v, q.codes_end, words, q.wpr, q.wpr, x, q.C, q.scales_of(r), out);
  } else if (q.kind == kIdx16) {
    q8_idx_row<int16_t, NR>(v, static_cast<const int16_t*>(q.cols) + q.row_ptr[r], n_vals, x, q.C, grouped, q.scales_of(r), out);
  } else {
    q8_idx_row<int32_t, NR>(v, static_cast<const int32_t*>(q.cols) + q.row_ptr[r], n_vals, x, q.C, grouped, q.scales_of(r), out);
  }
}

// y (N, R) = x (N, C) @ W^T (+ bias): rows split between the threads, input rows in groups of 8 per row.
template <typename V>
void q8_product(const Q8Matrix& q, const typename V::T* x, int64_t N, const typename V::T* bias, typename V::T* y,
                int64_t R, int threads) {
  const bool raw = q8_raw_x<V>(q, N);
  Scratch<float, kPackedX> buf(std::is_same<V, F32>::value || raw ? 0 : N * q.C);
  const float* xf = raw ? nullptr : x_as_float<V>(x, N, q.C, buf);
  for_range(R, threads, [&](int64_t r) {
    const float b = bias ? V::load(bias + r) : 0.f;
    float out[8];
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
      const typename V::T* xr = x + n0 * q.C;
      const float* xfr = xf ? xf + n0 * q.C : nullptr;
      const int64_t nr = (N - n0) < 8 ? (N - n0) : 8;
      switch (nr) {
        case 1: q8_row<V, 1>(q, r, raw, xr, xfr, out); break;
        case 2: q8_row<V, 2>(q, r, raw, xr, xfr, out); break;
        case 3: q8_row<V, 3>(q, r, raw, xr, xfr, out); break;
        case 4: q8_row<V, 4>(q, r, raw, xr, xfr, out); break;
        case 5: q8_row<V, 5>(q, r, raw, xr, xfr, out); break;
        case 6: q8_row<V, 6>(q, r, raw, xr, xfr, out); break;
        case 7: q8_row<V, 7>(q, r, raw, xr, xfr, out); break;
        default: q8_row<V, 8>(q, r, raw, xr, xfr, out); break;
      }
      for (int64_t i = 0; i < nr; ++i) V::store(y + (n0 + i) * R + r, out[i] + b);
    }
  });
}

// ------------------------------------------------------------------ dense int8 rows, 1-8 input rows
// out[n] = sum over groups g of scale_g * sum_{c in g} code_c * x[n][c], for a dense row of symmetric int8 codes
// with a scale per `group` columns (a multiple of 16, or the whole row). torch's own int8 kernel runs float32 and
// float16 activations as plain loops and takes no groups; this reads each code once, sign-extended and converted
// in registers, 16 columns per FMA (bfloat16 per row stays with torch's kernel: kernels/quantized.py).
template <int NR>
inline void q8_dense_row(const int8_t* codes, const float* x, int64_t C, int64_t group, const void* scales, int sd,
                         int64_t base, float* out) {
#ifdef CCLI_AVX512
  __m512 total[NR];
  for (int n = 0; n < NR; ++n) total[n] = _mm512_setzero_ps();
  for (int64_t c0 = 0, g = 0; c0 < C; c0 += group, ++g) {
    const int64_t c1 = c0 + group < C ? c0 + group : C;
    __m512 acc[2][NR];
    for (int h = 0; h < 2; ++h) for (int n = 0; n < NR; ++n) acc[h][n] = _mm512_setzero_ps();
    int h = 0;
    for (int64_t c = c0; c < c1; c += 16, h ^= 1) {
      if ((c & 63) == 0) prefetch_ahead(codes + c);
      const __mmask16 m = first_lanes(c1 - c);
      const __m512 wv = q8_widen(_mm_maskz_loadu_epi8(m, codes + c));
      for (int n = 0; n < NR; ++n) acc[h][n] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + n * C + c), acc[h][n]);
    }
    const __m512 scale = _mm512_set1_ps(q8_scale(scales, sd, base + g));
    for (int n = 0; n < NR; ++n) total[n] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][n], acc[1][n]), scale, total[n]);
  }
  for (int n = 0; n < NR; ++n) out[n] = _mm512_reduce_add_ps(total[n]);
#else
  for (int n = 0; n < NR; ++n) out[n] = 0.f;
  for (int64_t c0 = 0, g = 0; c0 < C; c0 += group, ++g) {
    const int64_t c1 = c0 + group < C ? c0 + group : C;
    const float scale = q8_scale(scales, sd, base + g);
    for (int n = 0; n < NR; ++n) {
      float sum = 0.f;
      for (int64_t c = c0; c < c1; ++c) sum += static_cast<float>(codes[c]) * x[n * C + c];
      out[n] += sum * scale;
    }
  }
#endif
}

// y (N, R) = x (N, C) @ (codes * scales)^T (+ bias): x converted to float32 once, rows split between threads.
template <typename V>
void q8_dense_product(const int8_t* codes, const void* scales, int sd, int64_t group, const typename V::T* x,
                      int64_t N, int64_t C, const typename V::T* bias, typename V::T* y, int64_t R, int threads) {
  Scratch<float, kPackedX> buf(std::is_same<V, F32>::value ? 0 : N * C);
  const float* xf = x_as_float<V>(x, N, C, buf);
  const int64_t groups = (C + group - 1) / group;
  for_range(R, threads, [&](int64_t r) {
    const int8_t* row = codes + r * C;
    float out[8];
    switch (N) {
      case 1: q8_dense_row<1>(row, xf, C, group, scales, sd, r * groups, out); break;
      case 2: q8_dense_row<2>(row, xf, C, group, scales, sd, r * groups, out); break;
      case 3: q8_dense_row<3>(row, xf, C, group, scales, sd, r * groups, out); break;
      case 4: q8_dense_row<4>(row, xf, C, group, scales, sd, r * groups, out); break;
      case 5: q8_dense_row<5>(row, xf, C, group, scales, sd, r * groups, out); break;
      case 6: q8_dense_row<6>(row, xf, C, group, scales, sd, r * groups, out); break;
      case 7: q8_dense_row<7>(row, xf, C, group, scales, sd, r * groups, out); break;
      default: q8_dense_row<8>(row, xf, C, group, scales, sd, r * groups, out); break;
    }
    const float b = bias ? V::load(bias + r) : 0.f;
    for (int64_t n = 0; n < N; ++n) V::store(y + n * R + r, out[n] + b);
  });
}

// Rows [r0, r1) of the dense weight in the activation dtype: code * scale rounded once, zeros elsewhere.
template <typename V>
void q8_to_dense(const Q8Matrix& q, typename V::T* out, int64_t r0, int64_t r1, int threads) {
  using T = typename V::T;
  const int64_t C = q.C;
  for_range(r1 - r0, threads, [&](int64_t i) {
    const int64_t r = r0 + i;
    T* row = out + i * C;
    Q8Scales sc = q.scales_of(r);
    const int8_t* v = q.codes + q.row_ptr[r];
    if (q.kind == kBits) {
      const uint64_t* words = static_cast<const uint64_t*>(q.cols) + r * q.wpr;
#ifdef CCLI_AVX512
      for (int64_t w = 0; w < q.wpr; ++w) {
        Q8Lanes codes;
        q8_expand64(v, q.codes_end, words[w], codes);
        for (int q4 = 0; q4 < 4; ++q4) {
          const int64_t col = 64 * w + 16 * q4;
          if (col >= C) break;
          Vec<V>::store_n(first_lanes(C - col), row + col, _mm512_mul_ps(codes.widened(q4), sc.lanes(col)));
        }
      }
#else
      std::memset(row, 0, sizeof(T) * C);
      for (int64_t w = 0; w < q.wpr; ++w)
        for (uint64_t m = words[w]; m; m &= m - 1) {
          const int64_t col = 64 * w + __builtin_ctzll(m);
          V::store(row + col, *v++ * sc.at(col));
        }
#endif
      return;
    }
    std::memset(row, 0, sizeof(T) * C);
    const int64_t b = q.row_ptr[r], e = q.row_ptr[r + 1];
    for (int64_t j = b; j < e; ++j) {
      const int64_t col = q.kind == kIdx16 ? static_cast<const int16_t*>(q.cols)[j] : static_cast<const int32_t*>(q.cols)[j];
      V::store(row + col, q.codes[j] * sc.at(col));
    }
  });
}

}  // namespace

extern "C" {

// dtype: the activation dtype (x, bias, y, out): 0 float32, 1 bfloat16, 2 float16; scale_dtype likewise for the
// scales (R x groups, a boundary every `group` columns). kind and row_ptr as sparse_mm (row_ptr required).
// Returns 0, or 1 for an unknown dtype, scale dtype or kind.
int sparse_q8_mm(int dtype, const void* x, int64_t N, int64_t C, const int8_t* codes, const int64_t* row_ptr, int kind,
                 const void* cols, int64_t wpr, const void* scales, int scale_dtype, int64_t group, int64_t groups,
                 const void* bias, void* y, int64_t R, int threads) {
  if (kind < 0 || kind > 2 || !row_ptr || scale_dtype < 0 || scale_dtype > 2 || group < 1 || groups < 1) return 1;
  const Q8Matrix q{codes, row_ptr, kind, cols, wpr, scales, scale_dtype, group, groups, C, codes + row_ptr[R]};
  const bool known = with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    q8_product<V>(q, static_cast<const T*>(x), N, static_cast<const T*>(bias), static_cast<T*>(y), R, threads);
  });
  return known ? 0 : 1;
}

// y (N, R) = x (N, C) @ W^T (+ bias) for a dense weight of symmetric int8 codes (R x C) with scales (R x
// ceil(C / group), scale_dtype) per `group` columns, a multiple of 16 or >= C; 1 <= N <= 8. dtype as sparse_q8_mm.
// Returns 0, or 1 for an unknown dtype, a group it does not take or N out of range.
int dense_q8_mm(int dtype, const void* x, int64_t N, int64_t C, const int8_t* codes, const void* scales,
                int scale_dtype, int64_t group, const void* bias, void* y, int64_t R, int threads) {
  if (N < 1 || N > 8 || scale_dtype < 0 || scale_dtype > 2 || group < 1 || (group < C && group % 16)) return 1;
  const int64_t g = group < C ? group : C;
  return with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    q8_dense_product<V>(codes, scales, scale_dtype, g, static_cast<const T*>(x), N, C, static_cast<const T*>(bias),
                        static_cast<T*>(y), R, threads);
  }) ? 0 : 1;
}

// Rows [r0, r1) of the dense R x C weight into out ((r1 - r0) x C, dtype), zeros where nothing is stored.
int sparse_q8_to_dense(int dtype, const int8_t* codes, const int64_t* row_ptr, int kind, const void* cols, int64_t wpr,
                       const void* scales, int scale_dtype, int64_t group, int64_t groups, void* out, int64_t r0,
                       int64_t r1, int64_t C, int threads) {
  if (kind < 0 || kind > 2 || !row_ptr || scale_dtype < 0 || scale_dtype > 2 || group < 1 || groups < 1) return 1;
  const Q8Matrix q{codes, row_ptr, kind, cols, wpr, scales, scale_dtype, group, groups, C, codes + row_ptr[r1]};
  const bool known = with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    q8_to_dense<V>(q, static_cast<typename V::T*>(out), r0, r1, threads);
  });
  return known ? 0 : 1;
}

}  // extern "C"

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16. row_ptr (int64, R + 1) or nullptr with k per row; kind: 0 int16
// indices, 1 int32 indices, 2 bitmask words (wpr uint64 per row, with row_ptr). Returns 0, or 1 for an
// unknown dtype or kind.
int sparse_mm(int dtype, const void* x, int64_t N, int64_t C, const void* values, const int64_t* row_ptr, int64_t k,
              int kind, const void* cols, int64_t wpr, const void* bias, void* y, int64_t R, int threads) {
  if (kind < 0 || kind > 2 || (kind == kBits && !row_ptr)) return 1;
  const Rows rows{row_ptr, k};
  const bool known = with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    const T* xv = static_cast<const T*>(x);
    const T* bv = static_cast<const T*>(bias);
    T* yv = static_cast<T*>(y);
    if (kind == kBits) run_bits<V>(static_cast<const T*>(values), row_ptr, static_cast<const uint64_t*>(cols), wpr, xv,
                                   N, C, bv, yv, R, threads);
    else run_idx<V>(Product<V>{static_cast<const T*>(values), rows, kind, cols}, xv, N, C, bv, yv, R, threads);
  });
  return known ? 0 : 1;
}

// Rows [r0, r1) of the dense R x C matrix into out ((r1 - r0) x C), zeros where nothing is stored.
int sparse_to_dense(int dtype, const void* values, const int64_t* row_ptr, int64_t k, int kind, const void* cols,
                    int64_t wpr, void* out, int64_t r0, int64_t r1, int64_t R, int64_t C, int threads) {
  if (kind < 0 || kind > 2 || (kind == kBits && !row_ptr)) return 1;
  const Rows rows{row_ptr, k};
  const bool known = with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    to_dense<V>(static_cast<const T*>(values), rows, kind, cols, wpr, static_cast<T*>(out), r0, r1, R, C, threads);
  });
  return known ? 0 : 1;
}

static bool valid_spec(const RpsSpec& s) {
  return s.memory_size >= 1 && s.span >= 1 && s.block_k >= 1 && s.block_n >= 1 && s.block_z >= 1 && s.cols >= 0;
}

// Rows [row0, row1) of an RPS weight into out ((row1 - row0) x cols). spec: the int64 fields of RpsSpec.
int rps_weight(int dtype, const void* memory, const int64_t* spec, float scale, int64_t row0, int64_t row1, void* out,
               int threads) {
  RpsSpec s;
  std::memcpy(&s, spec, sizeof(RpsSpec));
  if (!valid_spec(s)) return 1;
  return with_dtype(dtype, [&](auto v) { rps_rows<decltype(v)>(memory, s, scale, row0, row1, out, threads); }) ? 0 : 1;
}

// y (N x rows) = x (N x cols) @ W^T (+ bias) for the RPS weight of `spec`, never held whole.
// y (N, R) = x (N, K) @ m (K, R), m row-major; x, m and y of one dtype, 1 <= N <= 8. Returns 0, or 1 for an
// unknown dtype or N out of range.
int row_major_mm(int dtype, const void* x, int64_t N, int64_t K, const void* m, int64_t R, void* y, int threads) {
  if (N < 1 || N > 8) return 1;
  return with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    row_major_product<V>(static_cast<const T*>(x), N, K, static_cast<const T*>(m), R, static_cast<T*>(y), threads);
  }) ? 0 : 1;
}

int rps_mm(int dtype, const void* memory, const int64_t* spec, float scale, const void* x, int64_t N, const void* bias,
           void* y, int threads) {
  RpsSpec s;
  std::memcpy(&s, spec, sizeof(RpsSpec));
  if (!valid_spec(s)) return 1;
  return with_dtype(dtype, [&](auto v) {
    using V = decltype(v);
    using T = typename V::T;
    rps_product<V>(memory, s, scale, static_cast<const T*>(x), N, static_cast<const T*>(bias), static_cast<T*>(y),
                   threads);
  }) ? 0 : 1;
}

// Lets the bfloat16 bitmask kernel use AMX (once Python has seen AMX run here); returns whether it will.
int compresscli_allow_amx(int allowed) {
#if defined(CCLI_AMX)
  amx_allowed = allowed;
  return amx_usable() ? 1 : 0;
#else
  (void)allowed;
  return 0;
#endif
}

// What the build can run: 1 AVX2, 2 AVX-512, 3 AVX-512 with vdpbf16ps / vpexpandw, 4 and AMX; 0 scalar.
int compresscli_isa() {
#if defined(CCLI_AMX)
  return 4;
#elif defined(CCLI_BF16_DOT)
  return 3;
#elif defined(CCLI_AVX512)
  return 2;
#elif defined(CCLI_AVX2)
  return 1;
#else
  return 0;
#endif
}

int compresscli_abi_version() { return 3; }

}  // extern "C"

// ------------------------------------------------ quantized weights decoded a tile at a time for a GEMM
// The many-rows path of the quantized dense layers (kernels/quantized.py): their codes, as held, decoded
// into the caller's buffer in the activation dtype, then multiplied by torch's GEMM. Each value is computed
// as QuantizedValues.dequantize does it, bit for bit: code * scale in float32, rounded to the scales' dtype
// S, then converted to the output dtype O (one rounding when S is O or float32, the usual cases).
namespace {

template <typename S, typename O>
inline void q_store(typename O::T* p, float v) {
  if constexpr (!std::is_same<S, O>::value && !std::is_same<S, F32>::value) {
    typename S::T t;
    S::store(&t, v);
    v = S::load(&t);
  }
  O::store(p, v);
}

#ifdef CCLI_AVX512
template <typename S, typename O>
inline void q_store16(__mmask16 m, typename O::T* p, __m512 v) {
  if constexpr (!std::is_same<S, O>::value && !std::is_same<S, F32>::value) {
    alignas(64) typename S::T t[16];
    Vec<S>::store_n(0xffff, t, v);
    v = Vec<S>::load_n(0xffff, t);
  }
#if defined(CCLI_BF16_DOT)
  if constexpr (std::is_same<O, BF16>::value) {  // vcvtneps2bf16: the same rounding in one instruction (it flushes
    // float32 subnormals, |v| < 1.2e-38, to zero: no code times a stored scale is one)
    _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    return;
  }
#endif
  Vec<O>::store_n(m, p, v);
}
#endif

// int8 codes (R x C), one scale per row and group of `group` inputs (scales R x ceil(C / group)): rows
// [r0, r1) into out ((r1 - r0) x C), rows split between threads.
template <typename S, typename O>
void q8_rows(const int8_t* codes, const typename S::T* scales, int64_t C, int64_t group, typename O::T* out,
             int64_t r0, int64_t r1, int threads) {
  const int64_t groups = (C + group - 1) / group;
  for_range(r1 - r0, threads, [&](int64_t i) {
    const int8_t* c = codes + (r0 + i) * C;
    const typename S::T* s = scales + (r0 + i) * groups;
    typename O::T* o = out + i * C;
    for (int64_t g0 = 0; g0 < C; g0 += group) {
      const int64_t g1 = g0 + group < C ? g0 + group : C;
      const float scale = S::load(s + g0 / group);
      int64_t k = g0;
#ifdef CCLI_AVX512
      const __m512 vs = _mm512_set1_ps(scale);
      for (; k + 16 <= g1; k += 16) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k))));
        q_store16<S, O>(0xffff, o + k, _mm512_mul_ps(q, vs));
      }
      if (k < g1) {
        const __mmask16 m = first_lanes(g1 - k);
        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, c + k)));
        q_store16<S, O>(m, o + k, _mm512_mul_ps(q, vs));
        k = g1;
      }
#endif
      for (; k < g1; ++k) q_store<S, O>(o + k, static_cast<float>(c[k]) * scale);
    }
  });
}

// int4 in torch's CPU kernel layout (kernels/quantized.py `_to_blocks`): `held` rows (padded to 16), per
// block of B rows and input k, B / 2 bytes at block * (B / 2) * C + k * (B / 2), byte j = row j (low nibble)
// | row j + B / 2 (high nibble); the rows past the last full block pair adjacent rows (byte j = row 2j | row
// 2j + 1). Value (nibble - 8) * scale, scale = sz[(k / group) * held + row][0] (symmetric: the zero is 0).
// Rows [r0, r1) are written TRANSPOSED, out[k * (r1 - r0) + row - r0]: a block's rows at one input are then
// one contiguous store (the GEMM takes the tile as x @ out). Threads split the blocks.
template <typename S, typename O>
void q4_blocks_t(const uint8_t* packed, const typename S::T* sz, int64_t held, int64_t C, int64_t group, int64_t B,
                 typename O::T* out, int64_t r0, int64_t r1, int threads) {
  const int64_t T = r1 - r0, half = B / 2, full = held / B * B;
  const int64_t b0 = r0 / B, b1 = ((r1 < full ? r1 : full) + B - 1) / B;
  const int64_t blocks = b1 > b0 ? b1 - b0 : 0, tail = r1 > full ? 1 : 0;
  for_range(blocks + tail, threads, [&](int64_t item) {
    if (item == blocks) {  // the adjacent-row pairs past the last full block
      const int64_t pairs = (held - full) / 2;
      const uint8_t* p = packed + full * (C / 2);
      for (int64_t k = 0; k < C; ++k) {
        for (int64_t r = (r0 > full ? r0 : full); r < r1; ++r) {
          const uint8_t byte = p[k * pairs + (r - full) / 2];
          const int q = ((r - full) & 1 ? byte >> 4 : byte & 15) - 8;
          q_store<S, O>(out + k * T + r - r0, static_cast<float>(q) * S::load(sz + 2 * ((k / group) * held + r)));
        }
      }
      return;
    }
    const int64_t rb = (b0 + item) * B;
    const int64_t lo_row = r0 > rb ? r0 : rb, hi_row = r1 < rb + B ? r1 : rb + B;  // the block's rows written
    const uint8_t* p = packed + rb * (C / 2);
    float scale[64];
    for (int64_t g0 = 0; g0 < C; g0 += group) {
      const int64_t g1 = g0 + group < C ? g0 + group : C;
      for (int64_t j = 0; j < B; ++j) scale[j] = S::load(sz + 2 * ((g0 / group) * held + rb + j));
#ifdef CCLI_AVX512
      if (B == 64) {
        __mmask16 m[4];
        for (int q = 0; q < 4; ++q) {  // lanes of rows rb + 16 q .. rb + 16 q + 15 inside [r0, r1)
          uint32_t bits = 0;
          for (int l = 0; l < 16; ++l) bits |= (rb + 16 * q + l >= lo_row && rb + 16 * q + l < hi_row) << l;
          m[q] = static_cast<__mmask16>(bits);
        }
        const __m512 s0 = _mm512_loadu_ps(scale), s1 = _mm512_loadu_ps(scale + 16);
        const __m512 s2 = _mm512_loadu_ps(scale + 32), s3 = _mm512_loadu_ps(scale + 48);
        const __m256i low4 = _mm256_set1_epi8(15);
        const __m512i eight = _mm512_set1_epi32(8);
        for (int64_t k = g0; k < g1; ++k) {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k * 32));
          const __m256i lo = _mm256_and_si256(bytes, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
          typename O::T* o = out + k * T + (rb - r0);  // lanes before r0 are masked out, never touched
          const auto value = [&](__m128i nibbles, __m512 s) {
            return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles), eight)), s);
          };
          if (m[0]) q_store16<S, O>(m[0], o, value(_mm256_castsi256_si128(lo), s0));
          if (m[1]) q_store16<S, O>(m[1], o + 16, value(_mm256_extracti128_si256(lo, 1), s1));
          if (m[2]) q_store16<S, O>(m[2], o + 32, value(_mm256_castsi256_si128(hi), s2));
          if (m[3]) q_store16<S, O>(m[3], o + 48, value(_mm256_extracti128_si256(hi, 1), s3));
        }
        continue;
      }
#endif
      for (int64_t k = g0; k < g1; ++k) {
        const uint8_t* bytes = p + k * half;
        for (int64_t r = lo_row; r < hi_row; ++r) {
          const int64_t j = r - rb;
          const int q = (j < half ? bytes[j] & 15 : bytes[j - half] >> 4) - 8;
          q_store<S, O>(out + k * T + r - r0, static_cast<float>(q) * scale[j]);
        }
      }
    }
  });
}

// Calls f(S{}, O{}) for a scales dtype and an output dtype (codes as with_dtype); false for an unknown one.
template <typename F>
inline bool with_dtypes(int scale_dtype, int out_dtype, const F& f) {
  if (out_dtype < 0 || out_dtype > 2) return false;
  return with_dtype(scale_dtype, [&](auto s) { with_dtype(out_dtype, [&](auto o) { f(s, o); }); });
}

}  // namespace

extern "C" {

// Rows [r0, r1) of an int8 weight (codes R x C, scales R x ceil(C / group) in scale_dtype) into out
// ((r1 - r0) x C, out_dtype). Returns 0, or 1 for an unknown dtype.
int q8_rows_decode(int scale_dtype, int out_dtype, const int8_t* codes, const void* scales, int64_t C, int64_t group,
                   void* out, int64_t r0, int64_t r1, int threads) {
  if (group < 1) return 1;
  return with_dtypes(scale_dtype, out_dtype, [&](auto s, auto o) {
    using S = decltype(s);
    using O = decltype(o);
    q8_rows<S, O>(codes, static_cast<const typename S::T*>(scales), C, group, static_cast<typename O::T*>(out), r0,
                  r1, threads);
  }) ? 0 : 1;
}

// Rows [r0, r1) of an int4 weight in the int4 kernel's layout (blocks of `block` rows, `held` rows, scales and
// zeros (C / group) x held x 2 in scale_dtype) into out TRANSPOSED (C x (r1 - r0), out_dtype). Returns 0, or 1
// for an unknown dtype or a layout it cannot read.
int q4_blocks_decode_t(int scale_dtype, int out_dtype, const uint8_t* packed, const void* scales_and_zeros,
                       int64_t held, int64_t C, int64_t group, int64_t block, void* out, int64_t r0, int64_t r1,
                       int threads) {
  if (group < 1 || block < 2 || block > 64 || block % 2 || held % 2 || C % 2 || r0 < 0 || r1 > held) return 1;
  return with_dtypes(scale_dtype, out_dtype, [&](auto s, auto o) {
    using S = decltype(s);
    using O = decltype(o);
    q4_blocks_t<S, O>(packed, static_cast<const typename S::T*>(scales_and_zeros), held, C, group, block,
                      static_cast<typename O::T*>(out), r0, r1, threads);
  }) ? 0 : 1;
}

}  // extern "C"
"""
