"""C++ source of the CPU kernels, compiled on first use by cpu.py.

Kept as a string (not a .cpp file) so that it ships inside the wheel with no package-data rule. It
includes no torch header: it compiles in a few seconds, exports a C ABI and is called through ctypes
with raw pointers; OpenMP resolves to the libgomp torch already loaded, so it shares torch's thread
pool instead of adding a second one. Below two threads' worth of work a call never enters an OpenMP
region (entering one costs microseconds, most of a small layer's time).

One row-sparse product serves every sparse inference form: y (N, R) = x (N, C) @ W^T + bias, where row
r of W holds the values [begin(r), end(r)) of `values` at columns given either by an index array
(int16/int32: condensed rows of constant fan-in k, or CSR with a row pointer) or by a bitmask (64-bit
words per row, bit j of word w = column 64 w + j, the values of the set bits in order). Values, x, bias
and y share one dtype, float32 or bfloat16 (converted to float32 on load; float32 accumulation).
- one input row (batch 1, memory-bound): per output row a dot product over its non-zeros, two or four
  accumulators, x read directly (it stays in L1/L2);
- several rows: x is packed into tiles of W <= 32 rows stored input-major (C x W), so the W inputs that
  one column selects are contiguous; each non-zero is then a broadcast-FMA over W lanes, with two
  accumulator sets so that the FMA latency is hidden. Blocks of 32 output rows keep their values and
  columns in L2 while every tile streams past them; with many tiles, the other way round.
`sparse_to_dense` decodes the same structures into a dense (R, C) matrix (the fallback for shapes where
a dense GEMM wins), and `rps_weight` computes rows of a randomized-parameter-sharing weight from its
shared memory and hash parameters (the integer arithmetic of modules/rps_hash.py, bit for bit).
"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
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

// The set bits of one 64-bit word as column offsets; returns how many. The extraction's short dependency
// chain (count trailing zeros, clear lowest bit) overlaps with the arithmetic on the previous word.
inline int word_columns(uint64_t m, int32_t* cols) {
  int n = 0;
  for (; m; m &= m - 1) cols[n++] = __builtin_ctzll(m);
  return n;
}

template <typename V>
inline float bits_dot(const float* x, const typename V::T* v, const uint64_t* words, int64_t wpr) {
  float total = 0.f;
  int32_t cols[64];
  for (int64_t w = 0; w < wpr; ++w) {
    const int n = word_columns(words[w], cols);
    total += idx_dot<V>(x + w * 64, v, cols, n);
    v += n;
  }
  return total;
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

template <int L, typename V, typename I>
inline void idx_accumulate(Acc<L>& acc, const float* xt, const typename V::T* v, const I* idx, int64_t n) {
  constexpr int W = 8 * L, S = kSets<L>;
  int64_t j = 0;
  for (; j + S <= n; j += S)
    for (int s = 0; s < S; ++s) acc.add(s, V::load(v + j + s), xt + static_cast<int64_t>(idx[j + s]) * W);
  for (; j < n; ++j) acc.add(0, V::load(v + j), xt + static_cast<int64_t>(idx[j]) * W);
}

template <int L, typename V, typename I>
inline void idx_tile(const float* xt, const typename V::T* v, const I* idx, int64_t n, float* out) {
  Acc<L> acc;
  acc.zero();
  idx_accumulate<L, V>(acc, xt, v, idx, n);
  acc.store(out);
}

template <int L, typename V>
inline void bits_tile(const float* xt, const typename V::T* v, const uint64_t* words, int64_t wpr, float* out) {
  constexpr int W = 8 * L;
  Acc<L> acc;
  acc.zero();
  int32_t cols[64];
  for (int64_t w = 0; w < wpr; ++w) {
    const int n = word_columns(words[w], cols);
    idx_accumulate<L, V>(acc, xt + w * 64 * W, v, cols, n);
    v += n;
  }
  acc.store(out);
}

template <typename V>
struct Product {
  using T = typename V::T;
  const T* values;
  Rows rows;
  int kind;
  const void* cols;
  int64_t wpr;  // bits: words per row

  inline float dot(const float* x, int64_t r) const {
    const int64_t b = rows.begin(r), n = rows.end(r) - b;
    if (kind == kIdx16) return idx_dot<V>(x, values + b, static_cast<const int16_t*>(cols) + b, n);
    if (kind == kIdx32) return idx_dot<V>(x, values + b, static_cast<const int32_t*>(cols) + b, n);
    return bits_dot<V>(x, values + b, static_cast<const uint64_t*>(cols) + r * wpr, wpr);
  }

  template <int L>
  inline void tile_l(const float* xt, int64_t r, float* out) const {
    const int64_t b = rows.begin(r), n = rows.end(r) - b;
    if (kind == kIdx16) idx_tile<L, V>(xt, values + b, static_cast<const int16_t*>(cols) + b, n, out);
    else if (kind == kIdx32) idx_tile<L, V>(xt, values + b, static_cast<const int32_t*>(cols) + b, n, out);
    else bits_tile<L, V>(xt, values + b, static_cast<const uint64_t*>(cols) + r * wpr, wpr, out);
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

// Scratch reused across calls on this thread (packed x, or x in float32): a fresh allocation of a few MB
// per call would be page-faulted in again every time.
std::vector<float>& scratch(size_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer;
}

template <typename V>
void run(const Product<V>& p, const typename V::T* x, int64_t N, int64_t C, const typename V::T* bias,
         typename V::T* y, int64_t R, int threads) {
  using T = typename V::T;
  if (N == 1) {
    const float* xf;
    if (sizeof(T) == sizeof(float)) {
      xf = reinterpret_cast<const float*>(x);
    } else {
      std::vector<float>& buf = scratch(C);
      for (int64_t c = 0; c < C; ++c) buf[c] = V::load(x + c);
      xf = buf.data();
    }
    for_range(R, threads, [&](int64_t r) { V::store(y + r, p.dot(xf, r) + (bias ? V::load(bias + r) : 0.f)); });
    return;
  }
  // Tiles of 32 rows of x; the last one rounded up to a multiple of 8 and zero-padded.
  const int64_t tiles = (N + 31) / 32;
  auto width = [&](int64_t t) { const int64_t rest = N - 32 * t; return rest >= 32 ? 32 : ((rest + 7) / 8) * 8; };
  std::vector<float>& packed = scratch(static_cast<size_t>(tiles) * 32 * C);
  for_range(tiles, threads, [&](int64_t t) {  // packed[t][c][i] = x[32 t + i][c]
    float* dst = packed.data() + t * 32 * C;
    const int64_t w = width(t), n0 = 32 * t, real = (N - n0) < w ? (N - n0) : w;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < real; ++i) dst[c * w + i] = V::load(x + (n0 + i) * C + c);
      for (int64_t i = real; i < w; ++i) dst[c * w + i] = 0.f;
    }
  });
  auto one = [&](int64_t t, int64_t r) {
    float acc[32];
    const int64_t w = width(t), n0 = 32 * t, real = (N - n0) < w ? (N - n0) : w;
    p.tile(static_cast<int>(w), packed.data() + t * 32 * C, r, acc);
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
    // Many tiles: one tile at a time stays in L2 while the values and columns stream past it.
    for (int64_t t = 0; t < tiles; ++t) for_range(R, threads, [&](int64_t r) { one(t, r); });
  }
}

template <typename V>
void to_dense(const Product<V>& p, typename V::T* out, int64_t R, int64_t C, int threads) {
  using T = typename V::T;
  for_range(R, threads, [&](int64_t r) {
    T* row = out + r * C;
    std::memset(row, 0, sizeof(T) * C);
    const int64_t b = p.rows.begin(r), e = p.rows.end(r);
    if (p.kind == kIdx16) {
      const int16_t* idx = static_cast<const int16_t*>(p.cols);
      for (int64_t j = b; j < e; ++j) row[idx[j]] = p.values[j];
    } else if (p.kind == kIdx32) {
      const int32_t* idx = static_cast<const int32_t*>(p.cols);
      for (int64_t j = b; j < e; ++j) row[idx[j]] = p.values[j];
    } else {
      const uint64_t* words = static_cast<const uint64_t*>(p.cols) + r * p.wpr;
      const T* v = p.values + b;
      for (int64_t w = 0; w < p.wpr; ++w)
        for (uint64_t m = words[w]; m; m &= m - 1) row[w * 64 + __builtin_ctzll(m)] = *v++;
    }
  });
}

// --------------------------------------------------------------------------------- RPS weights
// w[r][c] = memory[slot(r, c)] * (sign(p) * scale), p = offset + r * cols + c, as modules/rps_hash.py.

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
        const typename V::T* m = mem + slot;
        typename V::T* dst = out + c + done;
        const uint64_t pr = p + done;
        for (int64_t i = 0; i < run; ++i) V::store(dst + i, V::load(m + i) * (sign_of(pr + i, s) * scale));
        done += run;
        slot = 0;
      }
      c += in_chunk;
    }
    return;
  }
  for (int64_t c = 0; c < cols; ++c) {  // roast: tiles (or ROBE-Z chunks) at hashed locations
    int64_t slot;
    if (s.layout == 0) {  // linear: tiles of the (in, out) view; r is the output, c the input
      slot = tile_location(c / s.block_k, r / s.block_n, s) + (c % s.block_k) * s.block_n + (r % s.block_n);
    } else if (s.layout == 1) {  // conv: tiles of the (out, in * kh * kw) view
      slot = tile_location(r / s.block_k, c / s.block_n, s) + (r % s.block_k) * s.block_n + (c % s.block_n);
    } else {  // embedding (ROBE-Z): row r, chunks of block_z columns
      slot = tile_location(r, c / s.block_z, s) + c % s.block_z;
    }
    V::store(out + c, V::load(mem + slot) * (sign_of(p0 + c, s) * scale));
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
// 1 int32 indices, 2 bitmask words (wpr uint64 per row). Returns 0, or 1 for an unknown dtype or kind.
int sparse_mm(int dtype, const void* x, int64_t N, int64_t C, const void* values, const int64_t* row_ptr, int64_t k,
              int kind, const void* cols, int64_t wpr, const void* bias, void* y, int64_t R, int threads) {
  if (kind < 0 || kind > 2) return 1;
  const Rows rows{row_ptr, k};
  if (dtype == 0) {
    const Product<F32> p{static_cast<const float*>(values), rows, kind, cols, wpr};
    run(p, static_cast<const float*>(x), N, C, static_cast<const float*>(bias), static_cast<float*>(y), R, threads);
  } else if (dtype == 1) {
    const Product<BF16> p{static_cast<const uint16_t*>(values), rows, kind, cols, wpr};
    run(p, static_cast<const uint16_t*>(x), N, C, static_cast<const uint16_t*>(bias), static_cast<uint16_t*>(y), R,
        threads);
  } else {
    return 1;
  }
  return 0;
}

int sparse_to_dense(int dtype, const void* values, const int64_t* row_ptr, int64_t k, int kind, const void* cols,
                    int64_t wpr, void* out, int64_t R, int64_t C, int threads) {
  if (kind < 0 || kind > 2) return 1;
  const Rows rows{row_ptr, k};
  if (dtype == 0) {
    to_dense(Product<F32>{static_cast<const float*>(values), rows, kind, cols, wpr}, static_cast<float*>(out), R, C,
             threads);
  } else if (dtype == 1) {
    to_dense(Product<BF16>{static_cast<const uint16_t*>(values), rows, kind, cols, wpr}, static_cast<uint16_t*>(out),
             R, C, threads);
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
