"""C++ source of the CPU kernels, compiled on first use by cpu.py.

Kept as a string (not a .cpp file) so that it ships inside the wheel with no package-data rule. It
includes no torch header: it compiles in a few seconds, exports a C ABI and is called through ctypes
with raw pointers; OpenMP resolves to the libgomp torch already loaded, so it shares torch's thread
pool instead of adding a second one. Below two threads' worth of work a call never enters an OpenMP
region (entering one costs microseconds, most of a small layer's time).

One row-sparse product serves every sparse inference form: y (N, R) = x (N, C) @ W^T + bias, where row
r of W holds the values [begin(r), end(r)) of `values` at columns given either by an index array
(int16/int32: condensed rows of constant fan-in k, or CSR with a row pointer) or by a bitmask (64-bit
words per row, bit j of word w = column 64 w + j, the values of the set bits in order; a bitmask's
columns are extracted into indices for the call first). Values, x, bias and y share one dtype, float32
or bfloat16 (converted to float32 on load; float32 accumulation).
- one input row (batch 1, memory-bound): per output row a dot product over its non-zeros, four
  accumulators, x read directly (it stays in L1/L2);
- several rows: x is packed into tiles of W <= 32 rows stored input-major (C x W), so the W inputs that
  one column selects are contiguous; each non-zero is then a broadcast-FMA over W lanes, with four (W <=
  16) or two accumulator sets so that the FMA latency is hidden, in 512-bit registers where the build has
  AVX-512. Blocks of 32 output rows keep their values and columns in L2 while every tile streams past
  them; with many tiles, the other way round.
`sparse_to_dense` decodes the same structures into a dense (R, C) matrix (the fallback for shapes where
a dense GEMM wins), and `rps_weight` computes rows of a randomized-parameter-sharing weight from its
shared memory and hash parameters (the integer arithmetic of codecs/rps/hashing.py, bit for bit).
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

namespace {

// ------------------------------------------------------------------------------------------- dtypes

struct F32 {
  using T = float;
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float v) { *p = v; }
};

struct BF16 {
  using T = uint16_t;
  static inline float load(const uint16_t* p) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static inline void store(uint16_t* p, float f) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *p = static_cast<uint16_t>((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    *p = static_cast<uint16_t>(u >> 16);
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

// ------------------------------------------------------------------------------- sparse structure

enum ColKind { kIdx16 = 0, kIdx32 = 1, kBits = 2 };

struct Rows {
  const int64_t* row_ptr;  // nullptr: row r holds k entries from r * k (condensed)
  int64_t k;
  int64_t begin(int64_t r) const { return row_ptr ? row_ptr[r] : r * k; }
  int64_t end(int64_t r) const { return row_ptr ? row_ptr[r + 1] : (r + 1) * k; }
};

// ---------------------------------------------------------------------------------- one input row

template <typename V, typename I>
inline float idx_dot(const float* x, const typename V::T* v, const I* idx, int64_t n) {
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
}

// ------------------------------------------------------------------- bitmask rows -> column indices
// A row's set bits as column indices, `out` needing 16 entries of slack. With AVX-512 16 columns per
// compress instruction; else with AVX2 8 columns per table lookup; else one set bit at a time. The cost is per 16 (or 8) columns, not per non-zero, and there is no data-dependent branch
// but skipping empty words.

#ifdef CCLI_AVX2
struct ByteTable {  // for each byte value: the positions of its set bits, and how many
  uint8_t pos[256][8];
  uint8_t count[256];
  ByteTable() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int j = 0; j < 8; ++j) if (b >> j & 1) pos[b][n++] = static_cast<uint8_t>(j);
      for (int j = n; j < 8; ++j) pos[b][j] = 0;
      count[b] = static_cast<uint8_t>(n);
    }
  }
};
const ByteTable kBytes;

template <typename I>
int64_t extract_avx2(const uint64_t* words, int64_t wpr, I* out) {
  int64_t n = 0;
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m = words[w];
    if (!m) continue;
    for (int q = 0; q < 8; ++q) {
      const unsigned b = static_cast<unsigned>(m >> (8 * q)) & 0xffu;
      const __m128i pos = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kBytes.pos[b]));
      const int base = static_cast<int>(w * 64 + 8 * q);
      if (sizeof(I) == 2) {
        const __m128i v = _mm_add_epi16(_mm_cvtepu8_epi16(pos), _mm_set1_epi16(static_cast<short>(base)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + n), v);
      } else {
        const __m256i v = _mm256_add_epi32(_mm256_cvtepu8_epi32(pos), _mm256_set1_epi32(base));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n), v);
      }
      n += kBytes.count[b];
    }
  }
  return n;
}

#ifdef __AVX512F__
template <typename I>
int64_t extract_avx512(const uint64_t* words, int64_t wpr, I* out) {
  int64_t n = 0;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t w = 0; w < wpr; ++w) {
    const uint64_t m = words[w];
    if (!m) continue;
    for (int q = 0; q < 4; ++q) {
      const __mmask16 k = static_cast<__mmask16>(m >> (16 * q));
      const __m512i base = _mm512_set1_epi32(static_cast<int>(w * 64 + 16 * q));
      const __m512i c = _mm512_maskz_compress_epi32(k, _mm512_add_epi32(lanes, base));
      if (sizeof(I) == 2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + n), _mm512_cvtepi32_epi16(c));
      else _mm512_storeu_si512(out + n, c);
      n += __builtin_popcount(static_cast<unsigned>(k));
    }
  }
  return n;
}
#endif
#endif

template <typename I>
inline int64_t row_columns(const uint64_t* words, int64_t wpr, I* out) {
#if defined(__AVX512F__)
  return extract_avx512(words, wpr, out);
#elif defined(CCLI_AVX2)
  return extract_avx2(words, wpr, out);
#else
  int64_t n = 0;
  for (int64_t w = 0; w < wpr; ++w)
    for (uint64_t m = words[w]; m; m &= m - 1) out[n++] = static_cast<I>(w * 64 + __builtin_ctzll(m));
  return n;
#endif
}

// Scratch memory for one call: reused across calls on this thread while small (a fresh allocation of a few
// MB per call would be page-faulted in again every time), allocated for the call and freed after when
// large, so that a big layer leaves nothing resident behind.
constexpr size_t kKeptScratchBytes = 4u << 20;

enum ScratchUse { kPackedX = 0, kRowColumns = 1, kAllColumns = 2 };  // one kept buffer per use and thread

template <typename T, int Use>
struct Scratch {
  std::vector<T> own;
  T* data;
  explicit Scratch(size_t n) {
    thread_local std::vector<unsigned char> kept;
    if (n * sizeof(T) <= kKeptScratchBytes) {
      if (kept.size() < n * sizeof(T)) kept.resize(n * sizeof(T));
      data = reinterpret_cast<T*>(kept.data());
    } else {
      own.resize(n);
      data = own.data();
    }
  }
};

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

#ifdef __AVX512F__
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
inline void idx_accumulate(AccFor<L>& acc, const float* xt, const typename V::T* v, const I* idx, int64_t n) {
  constexpr int W = 8 * L, S = kSets<L>;
  int64_t j = 0;
  for (; j + S <= n; j += S)
    for (int s = 0; s < S; ++s) acc.add(s, V::load(v + j + s), xt + static_cast<int64_t>(idx[j + s]) * W);
  for (; j < n; ++j) acc.add(0, V::load(v + j), xt + static_cast<int64_t>(idx[j]) * W);
}

template <int L, typename V, typename I>
inline void idx_tile(const float* xt, const typename V::T* v, const I* idx, int64_t n, float* out) {
  AccFor<L> acc;
  acc.zero();
  idx_accumulate<L, V>(acc, xt, v, idx, n);
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
void run(const Product<V>& p, const typename V::T* x, int64_t N, int64_t C, const typename V::T* bias,
         typename V::T* y, int64_t R, int threads) {
  using T = typename V::T;
  if (N == 1) {
    Scratch<float, kPackedX> buf(sizeof(T) == sizeof(float) ? 0 : C);  // bfloat16 x, as float32
    const float* xf = reinterpret_cast<const float*>(x);
    if (sizeof(T) != sizeof(float)) {
      for (int64_t c = 0; c < C; ++c) buf.data[c] = V::load(x + c);
      xf = buf.data;
    }
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

// A bitmask matrix (wpr words per row) computed as explicit columns: the whole matrix's columns are
// extracted first (int16 where they fit; a few cycles per 16 columns, freed after the call when large), then
// the index product runs, every tile of x reusing them.
template <typename V>
void run_bits(const typename V::T* values, const int64_t* row_ptr, const uint64_t* words, int64_t wpr,
              const typename V::T* x, int64_t N, int64_t C, const typename V::T* bias, typename V::T* y, int64_t R,
              int threads) {
  const Rows rows{row_ptr, 0};
  auto all_columns = [&](auto* out) {  // each thread a contiguous share of the rows, one row buffer each
    using I = typename std::remove_pointer<decltype(out)>::type;
    const int parts = threads > 1 ? threads : 1;
    const int64_t share = (R + parts - 1) / parts;
    for_range(parts, threads, [&](int64_t part) {
      // The extraction writes up to 16 entries past a row's end: straight into `out` while they land in
      // rows of this share that are extracted later (and overwrite them), else through a row buffer.
      const int64_t begin = part * share, end = (part + 1) * share < R ? (part + 1) * share : R;
      Scratch<I, kRowColumns> row(C + 16);
      for (int64_t r = begin; r < end; ++r) {
        if (row_ptr[end] - row_ptr[r + 1] >= 16) {
          row_columns(words + r * wpr, wpr, out + row_ptr[r]);
        } else {
          const int64_t n = row_columns(words + r * wpr, wpr, row.data);
          std::memcpy(out + row_ptr[r], row.data, sizeof(I) * n);
        }
      }
    });
  };
  const size_t nnz = static_cast<size_t>(row_ptr[R]);
  if (C <= 32767) {
    Scratch<int16_t, kAllColumns> cols(nnz);
    all_columns(cols.data);
    run(Product<V>{values, rows, kIdx16, cols.data}, x, N, C, bias, y, R, threads);
  } else {
    Scratch<int32_t, kAllColumns> cols(nnz);
    all_columns(cols.data);
    run(Product<V>{values, rows, kIdx32, cols.data}, x, N, C, bias, y, R, threads);
  }
}

template <typename T>
void to_dense(const T* values, Rows rows, int kind, const void* cols, int64_t wpr, T* out, int64_t R, int64_t C,
              int threads) {
  for_range(R, threads, [&](int64_t r) {
    T* row = out + r * C;
    std::memset(row, 0, sizeof(T) * C);
    const int64_t b = rows.begin(r), e = rows.end(r);
    if (kind == kIdx16) {
      const int16_t* idx = static_cast<const int16_t*>(cols);
      for (int64_t j = b; j < e; ++j) row[idx[j]] = values[j];
    } else if (kind == kIdx32) {
      const int32_t* idx = static_cast<const int32_t*>(cols);
      for (int64_t j = b; j < e; ++j) row[idx[j]] = values[j];
    } else {
      const uint64_t* words = static_cast<const uint64_t*>(cols) + r * wpr;
      const T* v = values + b;
      for (int64_t w = 0; w < wpr; ++w)
        for (uint64_t m = words[w]; m; m &= m - 1) row[w * 64 + __builtin_ctzll(m)] = *v++;
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

inline float sign_of(uint64_t p, const RpsSpec& s) {
  const uint64_t x = mod_prime(p);
  uint64_t h = static_cast<uint64_t>(s.sign[0]);
  h = mod_prime(mul31(h, x) + static_cast<uint64_t>(s.sign[1]));
  h = mod_prime(mul31(h, x) + static_cast<uint64_t>(s.sign[2]));
  h = mod_prime(mul31(h, x) + static_cast<uint64_t>(s.sign[3]));
  return (h & 1) ? -1.f : 1.f;
}

inline int64_t tile_location(int64_t x, int64_t y, const RpsSpec& s) {
  const uint64_t h = mul31(static_cast<uint64_t>(s.tile[0]), static_cast<uint64_t>(x) % kPrime) +
                     mul31(static_cast<uint64_t>(s.tile[1]), static_cast<uint64_t>(y) % kPrime) +
                     static_cast<uint64_t>(s.tile[2]);
  return static_cast<int64_t>((h % kPrime) % static_cast<uint64_t>(s.span));
}

// sgn[i] = sign_of(p0 + i) * scale for i < n (n <= kRun): the hash is the cost of an RPS weight, so it runs
// 8 positions at a time where there is AVX-512 (32x32 -> 64-bit multiplies, masked negation).
constexpr int64_t kRun = 256;

inline void scaled_signs(uint64_t p0, int64_t n, const RpsSpec& s, float scale, float* sgn) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512i prime = _mm512_set1_epi64(static_cast<long long>(kPrime));
  auto fold = [&](__m512i y) {  // mod_prime, 8 lanes
    y = _mm512_add_epi64(_mm512_and_si512(y, prime), _mm512_srli_epi64(y, 31));
    y = _mm512_add_epi64(_mm512_and_si512(y, prime), _mm512_srli_epi64(y, 31));
    return _mm512_mask_sub_epi64(y, _mm512_cmpge_epu64_mask(y, prime), y, prime);
  };
  // Lazily reduced: a value below 2^32 is a valid multiplicand (its product with x < 2^31 fits 64 bits) if
  // congruent mod P. c0 * x + c1 < 2^62 + 2^31 is below 2^32 after one fold; h * x + c2 < 2^63 + 2^31 after
  // two; the last is reduced fully, its parity being the sign.
  auto fold_once = [&](__m512i y) { return _mm512_add_epi64(_mm512_and_si512(y, prime), _mm512_srli_epi64(y, 31)); };
  const __m512i c0 = _mm512_set1_epi64(s.sign[0]), c1 = _mm512_set1_epi64(s.sign[1]);
  const __m512i c2 = _mm512_set1_epi64(s.sign[2]), c3 = _mm512_set1_epi64(s.sign[3]);
  const __m512i eight = _mm512_set1_epi64(8), one = _mm512_set1_epi64(1);
  const __m256 plus = _mm256_set1_ps(scale), minus = _mm256_set1_ps(-scale);
  // x = (p0 + i) mod P for 8 consecutive i, stepped by 8 (and wrapped at P) rather than folded each time
  __m512i x = fold(_mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(p0)),
                                    _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)));
  for (; i + 8 <= n; i += 8) {
    __m512i h = fold_once(_mm512_add_epi64(_mm512_mul_epu32(c0, x), c1));
    h = fold_once(fold_once(_mm512_add_epi64(_mm512_mul_epu32(h, x), c2)));
    h = fold(_mm512_add_epi64(_mm512_mul_epu32(h, x), c3));
    _mm256_storeu_ps(sgn + i, _mm256_mask_blend_ps(_mm512_test_epi64_mask(h, one), plus, minus));
    x = _mm512_add_epi64(x, eight);
    x = _mm512_mask_sub_epi64(x, _mm512_cmpge_epu64_mask(x, prime), x, prime);
  }
#endif
  for (; i < n; ++i) sgn[i] = sign_of(p0 + i, s) * scale;
}

// out[i] = mem[slot + i * stride] * sgn(p + i) for i < n: one run of weights whose slots are evenly spaced.
template <typename V>
inline void fill_run(const typename V::T* mem, int64_t slot, int64_t stride, uint64_t p, int64_t n, const RpsSpec& s,
                     float scale, typename V::T* out) {
  float sgn[kRun];
  for (int64_t done = 0; done < n; done += kRun) {
    const int64_t m = (n - done) < kRun ? (n - done) : kRun;
    scaled_signs(p + done, m, s, scale, sgn);
    const typename V::T* src = mem + slot + done * stride;
    typename V::T* dst = out + done;
    if (stride == 1) {
      for (int64_t i = 0; i < m; ++i) V::store(dst + i, V::load(src + i) * sgn[i]);
    } else {
      for (int64_t i = 0; i < m; ++i) V::store(dst + i, V::load(src + i * stride) * sgn[i]);
    }
  }
}

template <typename V>
void rps_row(const typename V::T* mem, const RpsSpec& s, float scale, int64_t r, typename V::T* out) {
  const int64_t cols = s.cols, M = s.memory_size;
  const uint64_t p0 = static_cast<uint64_t>(s.offset + r * cols);
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
        fill_run<V>(mem, slot, 1, p + done, run, s, scale, out + c + done);
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
      fill_run<V>(mem, slot, s.block_n, p0 + c, n, s, scale, out + c);
    } else if (s.layout == 1) {  // conv: tiles of the (out, in * kh * kw) view
      const int64_t slot = tile_location(r / s.block_k, c / s.block_n, s) + (r % s.block_k) * s.block_n +
                           (c % s.block_n);
      fill_run<V>(mem, slot, 1, p0 + c, n, s, scale, out + c);
    } else {  // embedding (ROBE-Z): row r, chunks of block_z columns
      fill_run<V>(mem, tile_location(r, c / s.block_z, s) + c % s.block_z, 1, p0 + c, n, s, scale, out + c);
    }
  }
}

template <typename V>
void rps_rows(const void* memory, const RpsSpec& s, float scale, int64_t row0, int64_t row1, void* out, int threads) {
  using T = typename V::T;
  const T* mem = static_cast<const T*>(memory);
  T* o = static_cast<T*>(out);
  for_range(row1 - row0, threads, [&](int64_t i) { rps_row<V>(mem, s, scale, row0 + i, o + i * s.cols); });
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16. row_ptr (int64, R + 1) or nullptr with k per row; kind: 0 int16 indices,
// 1 int32 indices, 2 bitmask words (wpr uint64 per row, with row_ptr). Returns 0, or 1 for an unknown
// dtype or kind.
int sparse_mm(int dtype, const void* x, int64_t N, int64_t C, const void* values, const int64_t* row_ptr, int64_t k,
              int kind, const void* cols, int64_t wpr, const void* bias, void* y, int64_t R, int threads) {
  if (kind < 0 || kind > 2 || dtype < 0 || dtype > 1 || (kind == kBits && !row_ptr)) return 1;
  const Rows rows{row_ptr, k};
  if (dtype == 0) {
    using V = F32;
    const auto* v = static_cast<const float*>(values);
    if (kind == kBits) run_bits<V>(v, row_ptr, static_cast<const uint64_t*>(cols), wpr, static_cast<const float*>(x),
                                   N, C, static_cast<const float*>(bias), static_cast<float*>(y), R, threads);
    else run(Product<V>{v, rows, kind, cols}, static_cast<const float*>(x), N, C, static_cast<const float*>(bias),
             static_cast<float*>(y), R, threads);
  } else {
    using V = BF16;
    const auto* v = static_cast<const uint16_t*>(values);
    if (kind == kBits) run_bits<V>(v, row_ptr, static_cast<const uint64_t*>(cols), wpr,
                                   static_cast<const uint16_t*>(x), N, C, static_cast<const uint16_t*>(bias),
                                   static_cast<uint16_t*>(y), R, threads);
    else run(Product<V>{v, rows, kind, cols}, static_cast<const uint16_t*>(x), N, C,
             static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), R, threads);
  }
  return 0;
}

int sparse_to_dense(int dtype, const void* values, const int64_t* row_ptr, int64_t k, int kind, const void* cols,
                    int64_t wpr, void* out, int64_t R, int64_t C, int threads) {
  if (kind < 0 || kind > 2 || (kind == kBits && !row_ptr)) return 1;
  const Rows rows{row_ptr, k};
  if (dtype == 0) {
    to_dense(static_cast<const float*>(values), rows, kind, cols, wpr, static_cast<float*>(out), R, C, threads);
  } else if (dtype == 1) {
    to_dense(static_cast<const uint16_t*>(values), rows, kind, cols, wpr, static_cast<uint16_t*>(out), R, C, threads);
  } else {
    return 1;
  }
  return 0;
}

// Rows [row0, row1) of an RPS weight into out ((row1 - row0) x cols). spec: the int64 fields of RpsSpec.
int rps_weight(int dtype, const void* memory, const int64_t* spec, float scale, int64_t row0, int64_t row1, void* out,
               int threads) {
  RpsSpec s;
  std::memcpy(&s, spec, sizeof(RpsSpec));
  if (s.memory_size < 1 || s.span < 1 || s.block_k < 1 || s.block_n < 1 || s.block_z < 1) return 1;
  if (dtype == 0) rps_rows<F32>(memory, s, scale, row0, row1, out, threads);
  else if (dtype == 1) rps_rows<BF16>(memory, s, scale, row0, row1, out, threads);
  else return 1;
  return 0;
}

int compresscli_abi_version() { return 2; }

}  // extern "C"
"""
