"""C++ source of the CPU condensed kernel, compiled on first use by cpu.py.

Kept as a string (not a .cpp file) so that it ships inside the wheel with no package-data rule.
It includes no torch header: it compiles in about a second, exports a C ABI and is called through
ctypes with raw pointers; OpenMP resolves to the libgomp torch already loaded, so it shares torch's
thread pool instead of adding a second one.

Two loops, both exact float32 arithmetic with float32 accumulation:
- one input row (batch 1, memory-bound): per output neuron a dot product of its k values with the k
  inputs its indices select (x is small enough to stay in L1/L2), four accumulators;
- several rows: x is packed into tiles of W <= 32 columns stored input-major (C x W), so the W inputs
  that one index selects are contiguous; each nonzero is then a broadcast-FMA over W lanes, with two
  accumulator sets so that the FMA latency is hidden. Row blocks of 32 neurons keep their values and
  indices in L2 while every tile streams past them; with many tiles, the other way round.
"""

SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CONDENSED_AVX2 1
#endif

namespace {

constexpr int64_t kRowBlock = 32;
// Up to this many 32-row tiles of x, neuron blocks are the outer loop; beyond, tiles are. Measured with
// benchmarks/condensed_layers.py --threads 1 --clock thread, 90% sparsity: at 256 rows tile-outer took
// 5.1 ms vs 7.6 (3072x768) and 71 ms vs 114 (4096x11008); at 64 rows 1.2 vs 1.8 and 22 vs 17.
constexpr int64_t kTilesRowsOuter = 2;


// One neuron, one input row. Scalar loads: AVX2 and AVX-512 gathers (16-bit indices widened, 8 or 16
// lanes) were no faster on the 2-core AMD EPYC (Zen 4) the benchmarks ran on, since a gather issues one
// load per lane anyway; four accumulators hide the FMA latency, so the loop runs near the load-port
// limit of three loads per nonzero.
template <typename I>
inline float row_dot(const float* x, const float* v, const I* idx, int64_t k) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    s0 += v[j] * x[idx[j]];
    s1 += v[j + 1] * x[idx[j + 1]];
    s2 += v[j + 2] * x[idx[j + 2]];
    s3 += v[j + 3] * x[idx[j + 3]];
  }
  for (; j < k; ++j) s0 += v[j] * x[idx[j]];
  return (s0 + s1) + (s2 + s3);
}

template <typename I>
void gemv(const float* x, const float* v, const I* idx, const float* bias, float* y, int64_t R, int64_t K,
          int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    y[r] = row_dot(x, v + r * K, idx + r * K, K) + (bias ? bias[r] : 0.f);
  }
}

// out[t] = sum_j v[j] * xt[idx[j] * W + t] for one neuron and one tile of W = 8 * V input rows.
template <int V, typename I>
inline void row_tile(const float* xt, const float* v, const I* idx, int64_t k, float* out) {
  constexpr int W = 8 * V;
  int64_t j = 0;
#ifdef CONDENSED_AVX2
  __m256 a[V], b[V];
  for (int t = 0; t < V; ++t) { a[t] = _mm256_setzero_ps(); b[t] = _mm256_setzero_ps(); }
  for (; j + 2 <= k; j += 2) {
    const __m256 w0 = _mm256_broadcast_ss(v + j), w1 = _mm256_broadcast_ss(v + j + 1);
    const float* p0 = xt + static_cast<int64_t>(idx[j]) * W;
    const float* p1 = xt + static_cast<int64_t>(idx[j + 1]) * W;
    for (int t = 0; t < V; ++t) {
      a[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p0 + 8 * t), a[t]);
      b[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p1 + 8 * t), b[t]);
    }
  }
  for (int t = 0; t < V; ++t) _mm256_storeu_ps(out + 8 * t, _mm256_add_ps(a[t], b[t]));
#else
  for (int t = 0; t < W; ++t) out[t] = 0.f;
#endif
  for (; j < k; ++j) {
    const float w0 = v[j];
    const float* p0 = xt + static_cast<int64_t>(idx[j]) * W;
    for (int t = 0; t < W; ++t) out[t] += w0 * p0[t];
  }
}

template <typename I>
void tile_dispatch(int w, const float* xt, const float* v, const I* idx, int64_t k, float* out) {
  switch (w) {
    case 8: row_tile<1>(xt, v, idx, k, out); break;
    case 16: row_tile<2>(xt, v, idx, k, out); break;
    case 24: row_tile<3>(xt, v, idx, k, out); break;
    default: row_tile<4>(xt, v, idx, k, out); break;
  }
}

template <typename I>
void tiled(const float* x, int64_t N, int64_t C, const float* v, const I* idx, const float* bias, float* y,
           int64_t R, int64_t K, int threads) {
  // Tiles of 32 rows of x; the last one rounded up to a multiple of 8 and zero-padded.
  std::vector<int64_t> start, width;
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const int64_t rest = N - n0;
    start.push_back(n0);
    width.push_back(rest >= 32 ? 32 : ((rest + 7) / 8) * 8);
  }
  const int64_t tiles = static_cast<int64_t>(start.size());
  std::vector<int64_t> offset(tiles);
  int64_t total = 0;
  for (int64_t t = 0; t < tiles; ++t) { offset[t] = total; total += width[t] * C; }
  std::vector<float> packed(total);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {  // packed[t][c][i] = x[start + i][c]
      float* dst = packed.data() + offset[t];
      const int64_t w = width[t], n0 = start[t], real = (N - n0) < w ? (N - n0) : w;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < real; ++i) dst[c * w + i] = x[(n0 + i) * C + c];
        for (int64_t i = real; i < w; ++i) dst[c * w + i] = 0.f;
      }
    }
    float acc[32];
    if (tiles <= kTilesRowsOuter) {
      // Few tiles: they stay in L2 while a block of neurons' values and indices is reused across them.
#pragma omp for schedule(static)
      for (int64_t rb = 0; rb < R; rb += kRowBlock) {
        const int64_t re = (rb + kRowBlock) < R ? (rb + kRowBlock) : R;
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t w = width[t], n0 = start[t], real = (N - n0) < w ? (N - n0) : w;
          for (int64_t r = rb; r < re; ++r) {
            tile_dispatch(static_cast<int>(w), packed.data() + offset[t], v + r * K, idx + r * K, K, acc);
            const float b = bias ? bias[r] : 0.f;
            for (int64_t i = 0; i < real; ++i) y[(n0 + i) * R + r] = acc[i] + b;
          }
        }
      }
    } else {
      // Many tiles: one tile at a time stays in L2 while the values and indices stream past it
      // (tiles write disjoint rows of y, so no barrier between them).
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t w = width[t], n0 = start[t], real = (N - n0) < w ? (N - n0) : w;
#pragma omp for schedule(static) nowait
        for (int64_t r = 0; r < R; ++r) {
          tile_dispatch(static_cast<int>(w), packed.data() + offset[t], v + r * K, idx + r * K, K, acc);
          const float b = bias ? bias[r] : 0.f;
          for (int64_t i = 0; i < real; ++i) y[(n0 + i) * R + r] = acc[i] + b;
        }
      }
    }
  }
}

template <typename I>
void run(const float* x, int64_t N, int64_t C, const float* v, const I* idx, const float* bias, float* y,
         int64_t R, int64_t K, int threads) {
  if (N == 1) {
    gemv(x, v, idx, bias, y, R, K, threads);
  } else {
    tiled(x, N, C, v, idx, bias, y, R, K, threads);
  }
}

}  // namespace

extern "C" int condensed_mm_f32(const float* x, int64_t N, int64_t C, const float* values, const void* indices,
                                int index_bytes, const float* bias, float* y, int64_t R, int64_t K, int threads) {
  if (index_bytes == 2) {
    run(x, N, C, values, static_cast<const int16_t*>(indices), bias, y, R, K, threads);
  } else if (index_bytes == 4) {
    run(x, N, C, values, static_cast<const int32_t*>(indices), bias, y, R, K, threads);
  } else {
    return 1;
  }
  return 0;
}

extern "C" int condensed_abi_version() { return 1; }
"""
