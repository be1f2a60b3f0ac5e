/* Aviary's CPU decode kernels: the matrix products of a decode step (a few rows of x against a large
 * weight matrix, at memory speed), the one-token WKV state updates, RWKV-7's one-token time-mix tail,
 * and the worker threads they share.
 *
 *     y[m, o] = scale[o] * sum_i W[o, i] * x[m, i]      W [out, in] float32, bfloat16 or int8 (row scales),
 *                                                       x [M, in] and y [M, out] float32, scale optional
 *
 * A decode step is a chain of such products with M = 1 (or the batch size). torch's kernels for them
 * leave bandwidth unused on the test machine: `aten._weight_int8pack_mm` widens every int8 weight to
 * bf16 and is compute-bound at one row (4-9 GB/s), and oneDNN's bf16 product reads at ~17 GB/s with a
 * fixed cost of ~100 us per call. Here each weight is widened to float32 in SIMD registers, x stays
 * float32, and every weight is read once for all M rows (blocked 4x4 register tiles for M > 1).
 *
 * ISA: AVX-512 versions of all three and an AVX2 version of int8; the module picks at import (`ISA`:
 * "avx512", "avx2" or "none"). Where there is no SIMD version, `linear` refuses and Python uses torch
 * (a plain C loop would be slower than torch's kernels). On Linux, output rows are split across this
 * module's own worker threads (see "threads" below); the caller passes the count.
 *
 * Called from `aviary.kernels` with raw data pointers of contiguous CPU tensors whose dtypes and
 * shapes the Python side has checked: this module trusts its arguments. The references beside it are
 * F.linear and `aviary.quant.int8_linear_reference`; tests/test_kernels.py compares.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <stdlib.h>

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };
static const int64_t wsize[3] = {4, 2, 1}; /* bytes per weight */

typedef void (*rows_fn)(const void *, const float *, const float *, float *, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float f32_scalar(float v) { return v; }
static inline float i8_scalar(int8_t v) { return (float)v; }

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define AVIARY_X86 1
#if defined(__linux__)
#define AVIARY_POOL 1 /* the worker pool below (pthreads) */
#endif

/* 16 weights widened to float32. */
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define LOAD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))

/* The 16 sums of 16 accumulators at once (a shuffle tree), for the tiles below. */
static int hsum16_order[16]; /* hsum16's raw output position -> accumulator; filled by pick_kernels */

/* [sum(v[0]), ..., sum(v[15])] in the raw order fixed by the shuffles (hsum16_order maps it). */
__attribute__((target("avx512f"), always_inline)) static inline __m512 hsum16_raw(__m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int k = 0; k < 8; k++) /* 128-bit lanes {0,1} + {2,3} of two vectors: 8 partial sums each */
        a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; k++) /* lanes {0,2} + {1,3}: one 128-bit lane of 4 partial sums per vector */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; k++) /* within lanes: elements {0,1} + {2,3} */
        c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44), _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

static __m512i hsum16_perm; /* permutes hsum16_raw's output into accumulator order */

__attribute__((target("avx512f"))) static void hsum16_init(void) {
    __m512 v[16];
    float out[16];
    for (int j = 0; j < 16; j++) v[j] = _mm512_set1_ps((float)j);
    _mm512_storeu_ps(out, hsum16_raw(v)); /* 16 * (the accumulator each position holds) */
    int idx[16];
    for (int p = 0; p < 16; p++) hsum16_order[p] = (int)(out[p] / 16.0f + 0.5f);
    for (int p = 0; p < 16; p++) idx[hsum16_order[p]] = p;
    hsum16_perm = _mm512_loadu_si512(idx);
}

/* The sums of v[0..15], in order. */
__attribute__((target("avx512f"), always_inline)) static inline __m512 hsum16(__m512 v[16]) {
    return _mm512_permutexvar_ps(hsum16_perm, hsum16_raw(v));
}

/* acc[j] += a * b_j for four weight vectors: one row of a 4x4 register tile. */
#define FMA4(acc, a, b0, b1, b2, b3)                   \
    do {                                               \
        __m512 a_ = (a);                               \
        (acc)[0] = _mm512_fmadd_ps(a_, b0, (acc)[0]);  \
        (acc)[1] = _mm512_fmadd_ps(a_, b1, (acc)[1]);  \
        (acc)[2] = _mm512_fmadd_ps(a_, b2, (acc)[2]);  \
        (acc)[3] = _mm512_fmadd_ps(a_, b3, (acc)[3]);  \
    } while (0)

/* M > 1 (a batch), for float32 weights and for bfloat16 and int8 weights widened to float32.
 *
 * Each weight still comes from memory once, but at 16 rows it is used 16 times, so the product needs as
 * much compute as memory traffic, and the two have to overlap. On the test machine (Zen 4, C
 * microbenchmarks, one core): a loop doing 16 FMAs per 64-byte line it streams from memory kept both its
 * full FMA rate (~110 GFLOPS) and ~14 GB/s when it read one or two runs of consecutive addresses and its
 * other loads hit L1; four runs at once dropped it to ~68 GFLOPS, other loads from L2 to ~64. The earlier
 * 4x4 tiles over whole rows read four runs and re-read 16 rows of x (48 KB at in = 768) from L2 for every
 * tile: ~50 GFLOPS per core from memory against ~100 on weights already in cache. So:
 *   - outputs go in blocks of BLOCK_OUT rows; within a block, `in` is taken in chunks sized so that the
 *     chunk of x (all M rows) is X_CHUNK_BYTES and stays in L1 while each 4-row tile of the block uses it;
 *   - a tile (4 weight rows x 4 rows of x, 16 accumulators) sums one chunk; hsum16 folds its 16 sums into
 *     the block's partial sums (acc, on the stack);
 *   - while a block computes, the next block's weights (consecutive addresses) are prefetched into L2 in
 *     order, spread evenly over the block's steps.
 * Rows of x past the last multiple of 4 take tiles of 1-3 rows; a tail of `in` past the last multiple of
 * 16 is added per output in plain C. Block sizes were picked by paired timings (docs/benchmarks.md). */
#define BLOCK_OUT 8 /* weight rows per block */
#define BLOCK_M 32 /* rows of x per pass (the stack holds BLOCK_M x BLOCK_OUT sums) */
#define X_CHUNK_BYTES 16384 /* x's share of L1 */

#define PF_HINT _MM_HINT_T1 /* into L2: prefetching into L1 as well was ~5 % slower at batch 16 (paired) */
#define DEFINE_BLOCKED(NAME, WTYPE, WLOAD, WSCALAR)                                                            \
    /* Tile: weight rows w, w + in, w + 2 in, w + 3 in x R rows of x (stride in), over [i0, i1); adds the */  \
    /* 4R sums to acc[r * BLOCK_OUT + j]. */                                                                   \
    __attribute__((target("avx512f"), always_inline)) static inline void NAME##_tile(                         \
        const WTYPE *w, const float *x, int64_t in, int64_t i0, int64_t i1, float *acc, const int R,          \
        const char **pf, int64_t pf_step) {                                                                  \
        __m512 c[16];                                                                                        \
        for (int j = 0; j < 16; j++) c[j] = _mm512_setzero_ps();                                             \
        const char *p = *pf;                                                                                 \
        for (int64_t i = i0; i < i1; i += 16) {                                                              \
            _mm_prefetch(p, PF_HINT);                                                                        \
            p += pf_step;                                                                                    \
            __m512 b0 = WLOAD(w + i), b1 = WLOAD(w + in + i), b2 = WLOAD(w + 2 * in + i),                    \
                   b3 = WLOAD(w + 3 * in + i);                                                               \
            for (int r = 0; r < R; r++) {                                                                    \
                __m512 a = _mm512_loadu_ps(x + r * in + i);                                                  \
                c[4 * r] = _mm512_fmadd_ps(a, b0, c[4 * r]);                                                 \
                c[4 * r + 1] = _mm512_fmadd_ps(a, b1, c[4 * r + 1]);                                         \
                c[4 * r + 2] = _mm512_fmadd_ps(a, b2, c[4 * r + 2]);                                         \
                c[4 * r + 3] = _mm512_fmadd_ps(a, b3, c[4 * r + 3]);                                         \
            }                                                                                                \
        }                                                                                                    \
        *pf = p;                                                                                             \
        float s[16];                                                                                         \
        _mm512_storeu_ps(s, hsum16(c));                                                                      \
        for (int r = 0; r < R; r++)                                                                          \
            _mm_storeu_ps(acc + r * BLOCK_OUT, _mm_add_ps(_mm_loadu_ps(acc + r * BLOCK_OUT), _mm_loadu_ps(s + 4 * r))); \
    }                                                                                                        \
                                                                                                             \
    /* Outputs [o0, o1) (a multiple of 4 of them) for all M rows of x. */                                   \
    __attribute__((target("avx512f"))) static void NAME##_blocked(const WTYPE *W, const float *scale,        \
                                                                  const float *x, float *y, int64_t o0,      \
                                                                  int64_t o1, int64_t in, int64_t out,       \
                                                                  int64_t M) {                               \
        const int64_t in16 = in / 16 * 16;                                                                   \
        for (int64_t mb = 0; mb < M; mb += BLOCK_M) {                                                        \
            const int64_t Mb = M - mb < BLOCK_M ? M - mb : BLOCK_M;                                          \
            const float *xb = x + mb * in;                                                                   \
            int64_t chunk = X_CHUNK_BYTES / (4 * Mb) / 16 * 16;                                              \
            if (chunk < 64) chunk = 64;                                                                      \
            for (int64_t o = o0; o < o1; o += BLOCK_OUT) {                                                   \
                const int64_t nb = o1 - o < BLOCK_OUT ? o1 - o : BLOCK_OUT; /* a multiple of 4 */            \
                float acc[BLOCK_M * BLOCK_OUT] __attribute__((aligned(64)));                                 \
                for (int64_t m = 0; m < Mb; m++) memset(acc + m * BLOCK_OUT, 0, (size_t)nb * sizeof(float)); \
                /* the next block's weights, in order, spread over this block's steps */                    \
                const int64_t steps = (nb / 4) * ((Mb + 3) / 4) * (in16 / 16);                               \
                const int64_t pf_step = steps ? BLOCK_OUT * in * (int64_t)sizeof(WTYPE) / steps : 0;         \
                const char *pf = (const char *)(W + (o + nb) * in);                                          \
                for (int64_t k0 = 0; k0 < in16; k0 += chunk) {                                               \
                    const int64_t k1 = k0 + chunk < in16 ? k0 + chunk : in16;                                \
                    for (int64_t t = 0; t < nb; t += 4) {                                                    \
                        const WTYPE *w = W + (o + t) * in;                                                   \
                        int64_t m = 0;                                                                       \
                        for (; m + 4 <= Mb; m += 4)                                                          \
                            NAME##_tile(w, xb + m * in, in, k0, k1, acc + m * BLOCK_OUT + t, 4, &pf, pf_step); \
                        switch (Mb - m) {                                                                    \
                        case 3: NAME##_tile(w, xb + m * in, in, k0, k1, acc + m * BLOCK_OUT + t, 3, &pf, pf_step); break; \
                        case 2: NAME##_tile(w, xb + m * in, in, k0, k1, acc + m * BLOCK_OUT + t, 2, &pf, pf_step); break; \
                        case 1: NAME##_tile(w, xb + m * in, in, k0, k1, acc + m * BLOCK_OUT + t, 1, &pf, pf_step); break; \
                        default: break;                                                                      \
                        }                                                                                    \
                    }                                                                                        \
                }                                                                                            \
                for (int64_t m = 0; m < Mb; m++) {                                                           \
                    const float *xm = xb + m * in;                                                           \
                    float *ym = y + (mb + m) * out + o;                                                      \
                    for (int64_t j = 0; j < nb; j++) {                                                       \
                        float s = acc[m * BLOCK_OUT + j];                                                    \
                        const WTYPE *wj = W + (o + j) * in;                                                  \
                        for (int64_t i = in16; i < in; i++) s += WSCALAR(wj[i]) * xm[i];                     \
                        ym[j] = scale ? s * scale[o + j] : s;                                                 \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_BLOCKED(f32_rows_avx512, float, LOAD_F32, f32_scalar)
DEFINE_BLOCKED(bf16_rows_avx512, uint16_t, LOAD_BF16, bf16_to_f32)
DEFINE_BLOCKED(i8_rows_avx512, int8_t, LOAD_I8, i8_scalar)

/* M == 1: four independent accumulators over 64 weights per iteration (hides the FMA latency).
 * M > 1: NAME##_blocked (above) for the outputs up to the last multiple of 4; the rest, one at a time. */
#define DEFINE_AVX512(NAME, WTYPE, WLOAD, WSCALAR)                                                             \
    __attribute__((target("avx512f"))) static float NAME##_dot1(const WTYPE *w, const float *x, int64_t in) { \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),                 \
               a3 = _mm512_setzero_ps();                                                                     \
        int64_t i = 0;                                                                                       \
        for (; i + 64 <= in; i += 64) {                                                                      \
            a0 = _mm512_fmadd_ps(WLOAD(w + i), _mm512_loadu_ps(x + i), a0);                                  \
            a1 = _mm512_fmadd_ps(WLOAD(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);                        \
            a2 = _mm512_fmadd_ps(WLOAD(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);                        \
            a3 = _mm512_fmadd_ps(WLOAD(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);                        \
        }                                                                                                    \
        for (; i + 16 <= in; i += 16) {                                                                      \
            a0 = _mm512_fmadd_ps(WLOAD(w + i), _mm512_loadu_ps(x + i), a0);                                  \
        }                                                                                                    \
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));        \
        for (; i < in; i++) {                                                                                \
            s += WSCALAR(w[i]) * x[i];                                                                       \
        }                                                                                                    \
        return s;                                                                                            \
    }                                                                                                        \
                                                                                                             \
    __attribute__((target("avx512f"))) static void NAME(const void *wp, const float *scale, const float *x,   \
                                                        float *y, int64_t o0, int64_t o1, int64_t in,        \
                                                        int64_t out, int64_t M) {                            \
        const WTYPE *W = (const WTYPE *)wp;                                                                  \
        int64_t o = o0;                                                                                      \
        if (M > 1) {                                                                                         \
            o = o0 + (o1 - o0) / 4 * 4;                                                                      \
            NAME##_blocked(W, scale, x, y, o0, o, in, out, M);                                               \
        }                                                                                                    \
        for (; o < o1; o++) {                                                                                \
            for (int64_t m = 0; m < M; m++) {                                                                \
                float s = NAME##_dot1(W + o * in, x + m * in, in);                                           \
                y[m * out + o] = scale ? s * scale[o] : s;                                                   \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_AVX512(f32_rows_avx512, float, LOAD_F32, f32_scalar)
DEFINE_AVX512(bf16_rows_avx512, uint16_t, LOAD_BF16, bf16_to_f32)
DEFINE_AVX512(i8_rows_avx512, int8_t, LOAD_I8, i8_scalar)

/* bfloat16 weights with the CPU's bf16 dot-product instruction (AVX512_BF16 `vdpbf16ps`): each step
 * multiplies 32 weights by 32 inputs in pairs and adds into 16 float32 sums, twice the multiply-adds per
 * instruction of widening to float32 (DEFINE_AVX512). So x is rounded to bfloat16 first, as torch's
 * bf16 product does (a bf16 model's activations are bf16 already; the rounding is then exact). One row
 * of x takes tiles of 16 weight rows; several rows, and one row's last weight rows, take the blocked
 * order of DEFINE_BLOCKED (bf16dp_blocked). Input lengths that are not multiples of 32 take a masked last step. */
/* The blocked order of DEFINE_BLOCKED (blocks of BLOCK_OUT weight rows, chunks of the bf16 x
 * that fit X_CHUNK_BYTES, the next block prefetched in order). A tile sums [i0, i1) of 4 weight rows x R
 * rows of xb (stride inp) and adds its 4R sums to acc[r * BLOCK_OUT + j]; the step at in32, if i1 passes
 * it, loads the weights under `tail`. */
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline)) static inline void
bf16dp_chunk_tile(const uint16_t *w, int64_t in, const uint16_t *xb, int64_t inp, int64_t i0, int64_t i1,
                  int64_t in32, __mmask32 tail, float *acc, const int R, const char **pf, int64_t pf_step) {
    __m512 c[16];
    for (int j = 0; j < 16; j++) c[j] = _mm512_setzero_ps();
    const char *p = *pf;
    for (int64_t i = i0; i < i1; i += 32) {
        _mm_prefetch(p, PF_HINT);
        p += pf_step;
        __m512bh b0, b1, b2, b3;
        if (i < in32) {
            b0 = (__m512bh)_mm512_loadu_si512(w + i);
            b1 = (__m512bh)_mm512_loadu_si512(w + in + i);
            b2 = (__m512bh)_mm512_loadu_si512(w + 2 * in + i);
            b3 = (__m512bh)_mm512_loadu_si512(w + 3 * in + i);
        } else {
            b0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + i);
            b1 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + in + i);
            b2 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + 2 * in + i);
            b3 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + 3 * in + i);
        }
        for (int r = 0; r < R; r++) {
            __m512bh a = (__m512bh)_mm512_load_si512(xb + r * inp + i);
            c[4 * r] = _mm512_dpbf16_ps(c[4 * r], a, b0);
            c[4 * r + 1] = _mm512_dpbf16_ps(c[4 * r + 1], a, b1);
            c[4 * r + 2] = _mm512_dpbf16_ps(c[4 * r + 2], a, b2);
            c[4 * r + 3] = _mm512_dpbf16_ps(c[4 * r + 3], a, b3);
        }
    }
    *pf = p;
    float s[16];
    _mm512_storeu_ps(s, hsum16(c));
    for (int r = 0; r < R; r++)
        _mm_storeu_ps(acc + r * BLOCK_OUT, _mm_add_ps(_mm_loadu_ps(acc + r * BLOCK_OUT), _mm_loadu_ps(s + 4 * r)));
}

/* Outputs [o0, o1) (a multiple of 4 of them) for all M rows of xb. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void bf16dp_blocked(const uint16_t *W,
                                                                                 const uint16_t *xbase, float *y,
                                                                                 int64_t o0, int64_t o1,
                                                                                 int64_t in, int64_t out, int64_t M) {
    const int64_t in32 = in / 32 * 32, inp = (in + 31) / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (in - in32)) - 1);
    for (int64_t mb = 0; mb < M; mb += BLOCK_M) {
        const int64_t Mb = M - mb < BLOCK_M ? M - mb : BLOCK_M;
        const uint16_t *xb = xbase + mb * inp;
        int64_t chunk = X_CHUNK_BYTES / (2 * Mb) / 32 * 32;
        if (chunk < 64) chunk = 64;
        for (int64_t o = o0; o < o1; o += BLOCK_OUT) {
            const int64_t nb = o1 - o < BLOCK_OUT ? o1 - o : BLOCK_OUT; /* a multiple of 4 */
            float acc[BLOCK_M * BLOCK_OUT] __attribute__((aligned(64)));
            for (int64_t m = 0; m < Mb; m++) memset(acc + m * BLOCK_OUT, 0, (size_t)nb * sizeof(float));
            const int64_t steps = (nb / 4) * ((Mb + 3) / 4) * (inp / 32);
            const int64_t pf_step = steps ? BLOCK_OUT * in * 2 / steps : 0;
            const char *pf = (const char *)(W + (o + nb) * in);
            for (int64_t k0 = 0; k0 < inp; k0 += chunk) {
                const int64_t k1 = k0 + chunk < inp ? k0 + chunk : inp;
                for (int64_t t = 0; t < nb; t += 4) {
                    const uint16_t *w = W + (o + t) * in;
                    float *a = acc + t;
                    int64_t m = 0;
                    for (; m + 4 <= Mb; m += 4)
                        bf16dp_chunk_tile(w, in, xb + m * inp, inp, k0, k1, in32, tail, a + m * BLOCK_OUT, 4, &pf, pf_step);
                    switch (Mb - m) {
                    case 3: bf16dp_chunk_tile(w, in, xb + m * inp, inp, k0, k1, in32, tail, a + m * BLOCK_OUT, 3, &pf, pf_step); break;
                    case 2: bf16dp_chunk_tile(w, in, xb + m * inp, inp, k0, k1, in32, tail, a + m * BLOCK_OUT, 2, &pf, pf_step); break;
                    case 1: bf16dp_chunk_tile(w, in, xb + m * inp, inp, k0, k1, in32, tail, a + m * BLOCK_OUT, 1, &pf, pf_step); break;
                    default: break;
                    }
                }
            }
            for (int64_t m = 0; m < Mb; m++) memcpy(y + (mb + m) * out + o, acc + m * BLOCK_OUT, (size_t)nb * sizeof(float));
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) static void bf16dp_rows(const void *wp, const float *scale,
                                                                              const float *x, float *y, int64_t o0,
                                                                              int64_t o1, int64_t in, int64_t out,
                                                                              int64_t M) {
    const uint16_t *W = (const uint16_t *)wp;
    (void)scale;
    const int64_t in32 = in / 32 * 32, inp = (in + 31) / 32 * 32;
    const __mmask32 tail = (__mmask32)((1ull << (in - in32)) - 1); /* weights past in32 */
    uint16_t *xb = aligned_alloc(64, (size_t)(M * inp * 2 + 64));
    if (xb == NULL) { /* no memory for the rounded copy: the widening kernel (same results up to rounding) */
        bf16_rows_avx512(wp, scale, x, y, o0, o1, in, out, M);
        return;
    }
    for (int64_t m = 0; m < M; m++) { /* x rounded to bf16, zero-padded to a multiple of 32 */
        const float *xm = x + m * in;
        for (int64_t i = 0; i < inp; i += 32) {
            __mmask16 lo = (__mmask16)(i + 16 <= in ? 0xFFFF : i < in ? (1u << (in - i)) - 1 : 0);
            __mmask16 hi = (__mmask16)(i + 32 <= in ? 0xFFFF : i + 16 < in ? (1u << (in - i - 16)) - 1 : 0);
            __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, xm + i + 16), _mm512_maskz_loadu_ps(lo, xm + i));
            _mm512_storeu_si512(xb + m * inp + i, (__m512i)v);
        }
    }
    int64_t o = o0;
    if (M == 1) { /* one row of x: tiles of 16 weight rows, so one hsum16 gives 16 outputs */
        for (; o + 16 <= o1; o += 16) {
            __m512 c[16];
            for (int j = 0; j < 16; j++) c[j] = _mm512_setzero_ps();
            for (int j = 0; j < 16; j++) { /* row by row: the weights stream in order */
                const uint16_t *wj = W + (o + j) * in;
                __m512 d = _mm512_setzero_ps(); /* a second chain: the instruction's latency is ~6 steps */
                int64_t i = 0;
                for (; i + 64 <= in32; i += 64) {
                    c[j] = _mm512_dpbf16_ps(c[j], (__m512bh)_mm512_load_si512(xb + i), (__m512bh)_mm512_loadu_si512(wj + i));
                    d = _mm512_dpbf16_ps(d, (__m512bh)_mm512_load_si512(xb + i + 32),
                                         (__m512bh)_mm512_loadu_si512(wj + i + 32));
                }
                c[j] = _mm512_add_ps(c[j], d);
                for (; i < in32; i += 32)
                    c[j] = _mm512_dpbf16_ps(c[j], (__m512bh)_mm512_load_si512(xb + i), (__m512bh)_mm512_loadu_si512(wj + i));
                if (i < inp)
                    c[j] = _mm512_dpbf16_ps(c[j], (__m512bh)_mm512_load_si512(xb + i),
                                            (__m512bh)_mm512_maskz_loadu_epi16(tail, wj + i));
            }
            _mm512_storeu_ps(y + o, hsum16(c));
        }
    }
    const int64_t o4 = o + (o1 - o) / 4 * 4; /* several rows of x, or one row's weight rows past the last 16 */
    bf16dp_blocked(W, xb, y, o, o4, in, out, M);
    o = o4;
    for (; o < o1; o++) { /* leftover outputs, one at a time */
        const uint16_t *wo = W + o * in;
        for (int64_t m = 0; m < M; m++) {
            __m512 c = _mm512_setzero_ps();
            for (int64_t i = 0; i < inp; i += 32) {
                __m512bh b = (__m512bh)(i < in32 ? _mm512_loadu_si512(wo + i) : _mm512_maskz_loadu_epi16(tail, wo + i));
                c = _mm512_dpbf16_ps(c, (__m512bh)_mm512_load_si512(xb + m * inp + i), b);
            }
            y[m * out + o] = _mm512_reduce_add_ps(c);
        }
    }
    free(xb);
}

/* Weights stored [in, out] ("input-major": the LoRA matrices of RWKV-6/7, used as x @ W):
 *     y[m, o] = sum_i x[m, i] * W[i, o]
 * Tiles of 64 outputs (4 vectors) x 4 rows of x, 16 accumulators: each step of i widens 4 weight
 * vectors once and broadcasts one x value per row. Outputs past the last multiple of 16 take a scalar
 * loop. */
#define DEFINE_AVX512_T(NAME, WTYPE, WLOAD, WSCALAR)                                                            \
    __attribute__((target("avx512f"))) static void NAME(const void *wp, const float *scale, const float *x,   \
                                                        float *y, int64_t o0, int64_t o1, int64_t in,        \
                                                        int64_t out, int64_t M) {                            \
        const WTYPE *W = (const WTYPE *)wp;                                                                  \
        (void)scale;                                                                                         \
        int64_t o16 = o0 + (o1 - o0) / 16 * 16;                                                              \
        for (int64_t m = 0; m < M; m += 4) {                                                                 \
            int rows = M - m < 4 ? (int)(M - m) : 4;                                                         \
            for (int64_t o = o0; o < o16; o += 64) {                                                         \
                int nv = (int)((o16 - o) / 16 < 4 ? (o16 - o) / 16 : 4);                                     \
                __m512 c[4][4];                                                                              \
                for (int r = 0; r < 4; r++)                                                                  \
                    for (int j = 0; j < 4; j++) c[r][j] = _mm512_setzero_ps();                               \
                if (nv == 4 && rows == 4) {                                                                  \
                    for (int64_t i = 0; i < in; i++) {                                                       \
                        const WTYPE *wi = W + i * out + o;                                                   \
                        __m512 b0 = WLOAD(wi), b1 = WLOAD(wi + 16), b2 = WLOAD(wi + 32), b3 = WLOAD(wi + 48); \
                        for (int r = 0; r < 4; r++) FMA4(c[r], _mm512_set1_ps(x[(m + r) * in + i]), b0, b1, b2, b3); \
                    }                                                                                        \
                } else {                                                                                     \
                    for (int64_t i = 0; i < in; i++) {                                                       \
                        const WTYPE *wi = W + i * out + o;                                                   \
                        for (int j = 0; j < nv; j++) {                                                       \
                            __m512 b = WLOAD(wi + 16 * j);                                                   \
                            for (int r = 0; r < rows; r++)                                                   \
                                c[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(x[(m + r) * in + i]), b, c[r][j]);  \
                        }                                                                                    \
                    }                                                                                        \
                }                                                                                            \
                for (int r = 0; r < rows; r++)                                                               \
                    for (int j = 0; j < nv; j++) _mm512_storeu_ps(y + (m + r) * out + o + 16 * j, c[r][j]);  \
            }                                                                                                \
            for (int64_t o = o16; o < o1; o++) {                                                             \
                for (int r = 0; r < rows; r++) {                                                             \
                    float s = 0.0f;                                                                          \
                    for (int64_t i = 0; i < in; i++) s += x[(m + r) * in + i] * WSCALAR(W[i * out + o]);      \
                    y[(m + r) * out + o] = s;                                                                \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_AVX512_T(f32_t_rows_avx512, float, LOAD_F32, f32_scalar)
DEFINE_AVX512_T(bf16_t_rows_avx512, uint16_t, LOAD_BF16, bf16_to_f32)

/* AVX2 + FMA, int8 only: 32 weights per iteration, one (o, m) dot product at a time. */
__attribute__((target("avx2,fma"))) static void i8_rows_avx2(const void *wp, const float *scale, const float *x,
                                                            float *y, int64_t o0, int64_t o1, int64_t in,
                                                            int64_t out, int64_t M) {
    const int8_t *W = (const int8_t *)wp;
    for (int64_t o = o0; o < o1; o++) {
        const int8_t *w = W + o * in;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * in;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int64_t i = 0;
#define W8(off) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i + (off)))))
            for (; i + 32 <= in; i += 32) {
                a0 = _mm256_fmadd_ps(W8(0), _mm256_loadu_ps(xm + i), a0);
                a1 = _mm256_fmadd_ps(W8(8), _mm256_loadu_ps(xm + i + 8), a1);
                a2 = _mm256_fmadd_ps(W8(16), _mm256_loadu_ps(xm + i + 16), a2);
                a3 = _mm256_fmadd_ps(W8(24), _mm256_loadu_ps(xm + i + 24), a3);
            }
#undef W8
            __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float acc = _mm_cvtss_f32(h);
            for (; i < in; i++) {
                acc += (float)w[i] * xm[i];
            }
            y[m * out + o] = acc * scale[o];
        }
    }
}
#endif

static rows_fn kernels[3] = {NULL, NULL, NULL};  /* W [out, in]; NULL: no SIMD kernel here, Python uses torch's */
static rows_fn kernels_t[3] = {NULL, NULL, NULL}; /* W [in, out] (no int8 version) */
static const char *isa = "none";
static int bf16_dot = 0; /* bfloat16 products use vdpbf16ps (x rounded to bf16): exported as BF16_DOT */
static int vec_math = 0; /* the gates below take 16-wide exponentials (exp512): an AVX-512 CPU */

static void pick_kernels(void) {
#ifdef AVIARY_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        hsum16_init();
        vec_math = 1;
        kernels[W_F32] = f32_rows_avx512;
        kernels[W_BF16] = bf16_rows_avx512;
        if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) {
            kernels[W_BF16] = bf16dp_rows;
            bf16_dot = 1;
        }
        kernels[W_I8] = i8_rows_avx512;
        kernels_t[W_F32] = f32_t_rows_avx512;
        kernels_t[W_BF16] = bf16_t_rows_avx512;
        isa = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        kernels[W_I8] = i8_rows_avx2;
        isa = "avx2";
    }
#endif
}

/* ---- threads -------------------------------------------------------------------------------------
 * The products of a decode step come every ~20-400 us, with one-thread small ops in between. A torch
 * (OpenMP) parallel region under OMP_WAIT_POLICY=PASSIVE wakes a sleeping worker each time, ~50 us:
 * 3-4 ms of a 32 ms RWKV-7 step. These workers instead wait for the next job by spinning for SPIN_NS
 * after each one (first with `pause`, then yielding the core to anything else runnable), and only then
 * sleep on a condition variable: a decode step keeps its helpers awake, and the machine gets its cores
 * back within SPIN_NS of the last job.
 *
 * A job is cut into a few chunks per thread, and every thread, the caller included, claims chunks one
 * at a time with a compare-and-swap on (job number, next chunk). The caller waits only for chunks that a
 * worker has claimed and is running. A worker that is not on a core (torch's OpenMP workers may be
 * spinning on it, under OpenMP's default wait policy) claims nothing: the caller does its chunks and the
 * job runs at one-thread speed instead of stalling. One caller at a time uses the pool (a second one,
 * from another Python thread, runs its job alone); workers are started on first use, up to the count
 * asked for, and a forked child starts with none. */
#ifdef AVIARY_POOL
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MAX_THREADS 256
#define SPIN_NS 300000   /* 0.3 ms: longer than most gaps between the products of a decode step */
#define PAUSE_NS 20000   /* of which the first 20 us spin on `pause` without yielding */
#define CHUNKS_PER_THREAD 4

/* A parallel job: run(ctx, lo, hi) over [0, n) in chunks of `chunk` items. */
typedef struct {
    void (*run)(const void *ctx, int64_t lo, int64_t hi);
    const void *ctx;
    int64_t n, chunk, nchunks;
} task_t;

static task_t pool_task;                 /* written by the pool's holder before it publishes a job */
static _Atomic uint64_t pool_claim;      /* (job number << 32) | next unclaimed chunk */
static atomic_int pool_done;             /* chunks of the current job finished */
static atomic_int pool_sleepers;         /* workers asleep on pool_cv */
static pthread_mutex_t pool_sleep_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER; /* held by the caller that uses the pool */
static int pool_size;                                        /* workers started */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of job `job` until none is left. A claim made with a stale job number fails. */
static void run_chunks(uint32_t job) {
    uint64_t v = atomic_load(&pool_claim);
    while ((uint32_t)(v >> 32) == job && (int64_t)(v & 0xffffffffu) < pool_task.nchunks) {
        if (atomic_compare_exchange_weak(&pool_claim, &v, v + 1)) { /* chunk (v & mask) is ours */
            int64_t lo = (int64_t)(v & 0xffffffffu) * pool_task.chunk;
            int64_t hi = lo + pool_task.chunk < pool_task.n ? lo + pool_task.chunk : pool_task.n;
            pool_task.run(pool_task.ctx, lo, hi);
            atomic_fetch_add(&pool_done, 1);
            v = atomic_load(&pool_claim);
        }
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    uint32_t seen = (uint32_t)(atomic_load(&pool_claim) >> 32);
    for (;;) {
        uint32_t job = (uint32_t)(atomic_load(&pool_claim) >> 32);
        if (job == seen) {
            int64_t start = now_ns(), spun = 0;
            while ((job = (uint32_t)(atomic_load(&pool_claim) >> 32)) == seen && spun < SPIN_NS) {
                if (spun < PAUSE_NS) {
                    for (int i = 0; i < 64; i++) _mm_pause();
                } else {
                    sched_yield();
                }
                spun = now_ns() - start;
            }
            if (job == seen) { /* asleep until the next job: see pool_run for the handshake */
                pthread_mutex_lock(&pool_sleep_mu);
                atomic_fetch_add(&pool_sleepers, 1);
                while ((job = (uint32_t)(atomic_load(&pool_claim) >> 32)) == seen) {
                    pthread_cond_wait(&pool_cv, &pool_sleep_mu);
                }
                atomic_fetch_sub(&pool_sleepers, 1);
                pthread_mutex_unlock(&pool_sleep_mu);
            }
        }
        seen = job;
        run_chunks(job);
    }
    return NULL;
}

static void pool_forget(void) { /* in a forked child: the workers did not come along */
    pool_size = 0;
    atomic_store(&pool_sleepers, 0);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_mutex_init(&pool_sleep_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
}

/* Start workers up to n - 1 (the caller is the n-th thread). Caller holds pool_mu. */
static void pool_grow(int n) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, pool_forget);
        registered = 1;
    }
    if (n > MAX_THREADS) n = MAX_THREADS;
    while (pool_size < n - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int err = pthread_create(&th, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (err != 0) {
            break; /* fewer workers: the caller claims what they do not */
        }
        pool_size++;
    }
}

/* Run job(ctx, 0, n) on up to n_threads threads, in chunks that are multiples of `align`. */
static void pool_run(void (*job)(const void *, int64_t, int64_t), const void *ctx, int64_t n, int64_t align,
                     int n_threads) {
    if (n_threads <= 1 || pthread_mutex_trylock(&pool_mu) != 0) { /* busy: another thread has the pool */
        job(ctx, 0, n);
        return;
    }
    pool_grow(n_threads);
    int64_t pieces = (int64_t)n_threads * CHUNKS_PER_THREAD;
    int64_t chunk = ((n + pieces - 1) / pieces + align - 1) / align * align;
    pool_task = (task_t){job, ctx, n, chunk, (n + chunk - 1) / chunk};
    atomic_store(&pool_done, 0);
    uint32_t id = (uint32_t)(atomic_load(&pool_claim) >> 32) + 1;
    atomic_store(&pool_claim, (uint64_t)id << 32); /* publishes the job (seq_cst) */
    if (atomic_load(&pool_sleepers) > 0) { /* a sleeper counted itself before its last look at the job */
        pthread_mutex_lock(&pool_sleep_mu);
        pthread_cond_broadcast(&pool_cv);
        pthread_mutex_unlock(&pool_sleep_mu);
    }
    run_chunks(id);
    for (int spins = 0; atomic_load(&pool_done) < pool_task.nchunks; spins++) { /* chunks workers run */
        if (spins < 4096) {
            _mm_pause();
        } else {
            sched_yield();
        }
    }
    pthread_mutex_unlock(&pool_mu);
}
#endif

/* Run job(ctx, 0, n) on `threads` threads in chunks of multiples of `align` (one thread without the pool). */
static void parallel(void (*job)(const void *, int64_t, int64_t), const void *ctx, int64_t n, int64_t align,
                     int threads) {
#ifdef AVIARY_POOL
    pool_run(job, ctx, n, align, threads);
#else
    (void)align;
    (void)threads;
    job(ctx, 0, n);
#endif
}

typedef struct {
    rows_fn fn;
    const void *w;
    const float *scale, *x;
    float *y;
    int64_t in, out, M;
} linear_args;

static void linear_job(const void *ctx, int64_t o0, int64_t o1) {
    const linear_args *a = ctx;
    a->fn(a->w, a->scale, a->x, a->y, o0, o1, a->in, a->out, a->M);
}

static PyObject *linear(PyObject *self, PyObject *args) {
    unsigned long long pw, ps, px, py;
    long long in, out, M, batch = 1;
    int threads, wtype, input_major = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLLii|pL", &pw, &ps, &px, &py, &in, &out, &M, &threads, &wtype, &input_major,
                          &batch)) {
        return NULL;
    }
    if (wtype < 0 || wtype > 2 || in < 0 || out < 0 || M < 0 || batch < 0) {
        PyErr_SetString(PyExc_ValueError, "linear: bad weight type or size");
        return NULL;
    }
    rows_fn fn = (input_major ? kernels_t : kernels)[wtype];
    if (fn == NULL) {
        PyErr_Format(PyExc_RuntimeError, "linear: no %s kernel for weight type %d on this CPU (ISA %s)",
                     input_major ? "input-major" : "output-major", wtype, isa);
        return NULL;
    }
    const char *w = (const char *)(uintptr_t)pw;
    const float *scale = (const float *)(uintptr_t)ps; /* 0: no scale */
    const float *x = (const float *)(uintptr_t)px;
    float *y = (float *)(uintptr_t)py;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t b = 0; b < batch; b++) { /* batch: [batch, M, in] x [batch, W] -> [batch, M, out] */
        const char *wb = w + b * in * out * wsize[wtype];
        const float *xb = x + b * M * in, *sb = scale ? scale + b * out : NULL;
        float *yb = y + b * M * out;
        linear_args a = {fn, wb, sb, xb, yb, in, out, M};
        parallel(linear_job, &a, out, 16, out >= 64 ? threads : 1); /* whole 16-row blocks per thread */
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- one-token WKV steps --------------------------------------------------------------------------
 * The state update of a decode step, per (batch, head) pair, with the state read once and written
 * once (the torch forms in aviary/ops read and write it several times, which dominates a batch-16
 * step: 3 MB of state per layer). All float32; S [K, V] per pair (row k = key channel); S_out may be
 * S_in (the update reads each pair's block before writing it). References: aviary.ops.gla.gla_step and
 * aviary.ops.delta.delta_rule_step (tests/test_kernels.py compares).
 *
 *   gla:   y[v] = sum_k r[k] S[k, v] + (sum_k r[k] u[k] k[k]) v[v]          (u: the per-head bonus)
 *          S'[k, v] = exp(logw[k]) S[k, v] + k[k] v[v]
 *   delta: aS[v] = sum_k a[k] S[k, v]
 *          S'[k, v] = exp(logw[k]) S[k, v] + b[k] aS[v] + k[k] v[v];   y[v] = sum_k r[k] S'[k, v]
 * Plain C loops over v (contiguous), which the compiler vectorises; target_clones builds an AVX-512,
 * an AVX2 and a baseline version and picks one at load. */
typedef struct {
    const float *r, *k, *v, *logw, *u, *a, *b, *S_in;
    float *S_out, *y;
    int64_t H, K, V;
} wkv_args;

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION static void gla_job(const void *ctx, int64_t lo, int64_t hi) {
    const wkv_args *p = ctx;
    const int64_t K = p->K, V = p->V;
    for (int64_t bh = lo; bh < hi; bh++) {
        const float *r = p->r + bh * K, *k = p->k + bh * K, *lw = p->logw + bh * K, *u = p->u + (bh % p->H) * K;
        const float *v = p->v + bh * V, *S = p->S_in + bh * K * V;
        float *So = p->S_out + bh * K * V, *y = p->y + bh * V;
        float bonus = 0.0f;
        for (int64_t i = 0; i < K; i++) bonus += r[i] * u[i] * k[i];
        for (int64_t j = 0; j < V; j++) y[j] = bonus * v[j];
        for (int64_t i = 0; i < K; i++) {
            const float ri = r[i], wi = expf(lw[i]), ki = k[i];
            const float *row = S + i * V;
            float *out = So + i * V;
            for (int64_t j = 0; j < V; j++) {
                float sj = row[j];
                y[j] += ri * sj;
                out[j] = wi * sj + ki * v[j];
            }
        }
    }
}

MULTIVERSION static void delta_job(const void *ctx, int64_t lo, int64_t hi) {
    const wkv_args *p = ctx;
    const int64_t K = p->K, V = p->V;
    float aS[1024]; /* V <= 1024, checked by the caller */
    for (int64_t bh = lo; bh < hi; bh++) {
        const float *r = p->r + bh * K, *k = p->k + bh * K, *lw = p->logw + bh * K, *a = p->a + bh * K;
        const float *b = p->b + bh * K, *v = p->v + bh * V, *S = p->S_in + bh * K * V;
        float *So = p->S_out + bh * K * V, *y = p->y + bh * V;
        for (int64_t j = 0; j < V; j++) aS[j] = 0.0f;
        for (int64_t i = 0; i < K; i++) {
            const float ai = a[i], *row = S + i * V;
            for (int64_t j = 0; j < V; j++) aS[j] += ai * row[j];
        }
        for (int64_t j = 0; j < V; j++) y[j] = 0.0f;
        for (int64_t i = 0; i < K; i++) {
            const float ri = r[i], wi = expf(lw[i]), bi = b[i], ki = k[i];
            const float *row = S + i * V;
            float *out = So + i * V;
            for (int64_t j = 0; j < V; j++) {
                float sj = wi * row[j] + bi * aS[j] + ki * v[j];
                out[j] = sj;
                y[j] += ri * sj;
            }
        }
    }
}

/* ---- RWKV-7: the rest of a one-token time-mix after its products ----------------------------------
 * Everything between the time-mix's matrix products and its output projection, per (batch row, head),
 * in one pass: the reference is aviary/model/v7.py (TimeMix.forward with T = 1), which tests compare
 * against. With C = H*N channels, all float32, every per-row input [B, C]:
 *   v     = v + (v_first - v) * sigmoid(v0 + v_lora)           (layers >= 1; v_lora = NULL on layer 0)
 *   a     = sigmoid(a0 + a_lora);   decay = exp(-decay_scale * sigmoid(w0 + w_lora))
 *   kk    = normalize_head(k * k_k);   k' = k * (1 + (a - 1) * k_a)
 *   S'    = diag(decay) S + (kk * a) (-kk^T S) + k' v^T          (delta_job's update: a_op = -kk, b_op = kk a)
 *   y     = GroupNorm_head(S'^T r; ln_w, ln_b, eps) + (sum_head r * k' * r_k) v
 *   out   = y * g                                               (the output projection's input) */
typedef struct {
    const float *r, *k, *v, *w_lora, *a_lora, *v_lora, *v_first, *g;
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *ln_w, *ln_b, *S_in;
    float *S_out, *out;
    int64_t H, N, S_in_stride, S_out_stride; /* floats from one batch row's state to the next */
    float eps, decay_scale;
} v7_args;

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

#ifdef AVIARY_X86
/* e^x for 16 floats, within 1 ulp of expf (checked in C over the float range): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by
 * its Taylor polynomial to r^7 (remainder < 6e-9 relative, under float32's 6e-8), times 2^n by vscalefps
 * (which also gives 0 and inf past the ends of the range). NaN stays NaN. */
__attribute__((target("avx512f"), always_inline)) static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 q = _mm512_set1_ps(1.0f / 5040.0f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 720.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 120.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 24.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 6.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(q, n);
}

__attribute__((target("avx512f"), always_inline)) static inline __m512 sigmoid512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* v7_gates with AVX-512 (see there). */
__attribute__((target("avx512f"))) static void v7_gates_avx512(const float *w0, const float *wl, const float *a0,
                                                               const float *al, const float *v0, const float *vl,
                                                               float decay_scale, float *dec, float *a, float *vs,
                                                               int64_t n) {
    const __m512 ds = _mm512_set1_ps(-decay_scale);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = (__mmask16)(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
#define LD(ptr) _mm512_maskz_loadu_ps(m, (ptr) + i)
        _mm512_mask_storeu_ps(a + i, m, sigmoid512(_mm512_add_ps(LD(a0), LD(al))));
        _mm512_mask_storeu_ps(dec + i, m, exp512(_mm512_mul_ps(ds, sigmoid512(_mm512_add_ps(LD(w0), LD(wl))))));
        if (vl) _mm512_mask_storeu_ps(vs + i, m, sigmoid512(_mm512_add_ps(LD(v0), LD(vl))));
#undef LD
    }
}
#endif

/* RWKV-7's per-channel gates of one head: a = sigmoid(a0 + a_lora), dec = exp(-decay_scale sigmoid(w0 +
 * w_lora)), and (when vl is not NULL) vs = sigmoid(v0 + v_lora). At batch 16 these are ~600,000
 * exponentials per step; the AVX-512 version does 16 at a time. */
static void v7_gates(const float *w0, const float *wl, const float *a0, const float *al, const float *v0,
                     const float *vl, float decay_scale, float *dec, float *a, float *vs, int64_t n) {
#ifdef AVIARY_X86
    if (vec_math) {
        v7_gates_avx512(w0, wl, a0, al, v0, vl, decay_scale, dec, a, vs, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) {
        a[i] = sigmoidf_(a0[i] + al[i]);
        dec[i] = expf(-decay_scale * sigmoidf_(w0[i] + wl[i]));
        if (vl) vs[i] = sigmoidf_(v0[i] + vl[i]);
    }
}

#ifdef AVIARY_X86
__attribute__((target("avx512f"))) static void decays_avx512(const float *a, const float *b, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = (__mmask16)(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
        const __m512 e = exp512(_mm512_add_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i)));
        _mm512_mask_storeu_ps(out + i, m, exp512(_mm512_sub_ps(_mm512_setzero_ps(), e)));
    }
}

__attribute__((target("avx512f"))) static void gate_avx512(const float *x, float *out, int64_t n, int times_x) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = (__mmask16)(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i), s = sigmoid512(v);
        _mm512_mask_storeu_ps(out + i, m, times_x ? _mm512_mul_ps(v, s) : s);
    }
}
#endif

/* RWKV-6's decays of one head: out = exp(-exp(a + b)). */
static void decays(const float *a, const float *b, float *out, int64_t n) {
#ifdef AVIARY_X86
    if (vec_math) {
        decays_avx512(a, b, out, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) out[i] = expf(-expf(a[i] + b[i]));
}

/* out = sigmoid(x), or x sigmoid(x) (silu) when times_x; out may be x. */
static void gate(const float *x, float *out, int64_t n, int times_x) {
#ifdef AVIARY_X86
    if (vec_math) {
        gate_avx512(x, out, n, times_x);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) out[i] = times_x ? x[i] * sigmoidf_(x[i]) : sigmoidf_(x[i]);
}

MULTIVERSION static void v7_tail_job(const void *ctx, int64_t lo, int64_t hi) {
    const v7_args *p = ctx;
    const int64_t H = p->H, N = p->N, C = H * N;
    float vv[1024], dec[1024], kk[1024], kn[1024], bb[1024], aS[1024], y[1024]; /* N <= 1024 */
    for (int64_t bh = lo; bh < hi; bh++) {
        const int64_t b = bh / H, h = bh % H, row = b * C + h * N, ch = h * N;
        const float *r = p->r + row, *k = p->k + row, *v = p->v + row, *g = p->g + row;
        const float *S = p->S_in + b * p->S_in_stride + h * N * N;
        float *So = p->S_out + b * p->S_out_stride + h * N * N, *out = p->out + row;
        float norm = 0.0f, bonus = 0.0f;
        v7_gates(p->w0 + ch, p->w_lora + row, p->a0 + ch, p->a_lora + row, p->v0 + ch,
                 p->v_lora ? p->v_lora + row : NULL, p->decay_scale, dec, bb, vv, N);
        for (int64_t i = 0; i < N; i++) {
            const int64_t c = ch + i;
            vv[i] = p->v_lora ? v[i] + (p->v_first[row + i] - v[i]) * vv[i] : v[i];
            const float a = bb[i];
            kk[i] = k[i] * p->k_k[c];
            norm += kk[i] * kk[i];
            kn[i] = k[i] * (1.0f + (a - 1.0f) * p->k_a[c]);
            /* bb[i] = a, times kk below once kk is normalised */
            bonus += r[i] * kn[i] * p->r_k[c];
        }
        norm = sqrtf(norm);
        const float inv = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
        for (int64_t i = 0; i < N; i++) {
            kk[i] *= inv;
            bb[i] *= kk[i];
        }
        for (int64_t j = 0; j < N; j++) aS[j] = 0.0f;
        for (int64_t i = 0; i < N; i++) { /* aS = a_op^T S with a_op = -kk */
            const float ai = -kk[i], *srow = S + i * N;
            for (int64_t j = 0; j < N; j++) aS[j] += ai * srow[j];
        }
        for (int64_t j = 0; j < N; j++) y[j] = 0.0f;
        for (int64_t i = 0; i < N; i++) {
            const float ri = r[i], di = dec[i], bi = bb[i], ki = kn[i], *srow = S + i * N;
            float *orow = So + i * N;
            for (int64_t j = 0; j < N; j++) {
                float sj = di * srow[j] + bi * aS[j] + ki * vv[j];
                orow[j] = sj;
                y[j] += ri * sj;
            }
        }
        float mean = 0.0f, var = 0.0f;
        for (int64_t j = 0; j < N; j++) mean += y[j];
        mean /= (float)N;
        for (int64_t j = 0; j < N; j++) var += (y[j] - mean) * (y[j] - mean);
        const float rstd = 1.0f / sqrtf(var / (float)N + p->eps);
        for (int64_t j = 0; j < N; j++) {
            const int64_t c = ch + j;
            out[j] = ((y[j] - mean) * rstd * p->ln_w[c] + p->ln_b[c] + bonus * vv[j]) * g[j];
        }
    }
}

/* v7_tail(pointers..., B, H, N, eps, decay_scale, threads): see v7_args for the pointer order. */
static PyObject *v7_tail(PyObject *self, PyObject *args) {
    unsigned long long q[19];
    long long B, H, N;
    float eps, decay_scale;
    int threads;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKKKKKKKKLLLffi", &q[0], &q[1], &q[2], &q[3], &q[4], &q[5], &q[6], &q[7],
                          &q[8], &q[9], &q[10], &q[11], &q[12], &q[13], &q[14], &q[15], &q[16], &q[17], &q[18], &B,
                          &H, &N, &eps, &decay_scale, &threads)) {
        return NULL;
    }
    if (B < 0 || H <= 0 || N <= 0 || N > 1024) {
        PyErr_SetString(PyExc_ValueError, "v7_tail: bad size (head sizes up to 1024)");
        return NULL;
    }
#define PTR(i) ((const float *)(uintptr_t)q[i])
    v7_args a = {PTR(0), PTR(1), PTR(2), PTR(3), PTR(4), PTR(5), PTR(6), PTR(7), PTR(8), PTR(9), PTR(10),
                 PTR(11), PTR(12), PTR(13), PTR(14), PTR(15), PTR(16), (float *)(uintptr_t)q[17],
                 (float *)(uintptr_t)q[18], H, N, H * N * N, H * N * N, eps, decay_scale};
#undef PTR
    Py_BEGIN_ALLOW_THREADS
    parallel(v7_tail_job, &a, B * H, 1, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- RWKV-7: whole one-token blocks --------------------------------------------------------------
 * Block.forward (aviary/model/rwkv.py) with RWKV-7's mixers (aviary/model/v7.py) for one token, all the
 * model's blocks in one call (v7_blocks): between the products there is nothing but a few loops over C
 * numbers, so the ~100 torch ops and ~13 Python-level products of a layer become 6 parallel jobs and
 * some plain loops. With x [B, C], per block (v7_block_run):
 *   xa  = LN1(x);   xx = sx_att - xa;   x_f = xa + xx * x_f        f in r, w, k, v, a, g
 *   r, k, v = W x_r, W x_k, W x_v;   h_w, h_a, h_v, h_g = x_w w1, x_a a1, x_v v1, x_g g1    (one job)
 *   w_lora, a_lora, v_lora, g = tanh(h_w) w2, h_a a2, h_v v2, sigmoid(h_g) g2            (one job)
 *   y*g, S' = v7_tail_job(...);   x1 = x + W_o (y*g)                                     (two jobs)
 *   xf  = LN2(x1);   x_out = x1 + W_fv relu(W_fk (xf + (sx_ffn - xf) * ffn_x_k))^2      (two jobs)
 *   shift' = (xa, xf);   layer 0 writes v_first = v and has no v LoRA
 * The pointers come as one tuple in the order of V7_BLOCK_FIELDS (the module exports the names, and
 * Python builds the tuple from them). Products take any of the three weight types (the *_scale fields
 * are the int8 row scales, else 0); LoRA matrices are float32 or bfloat16 [in, out]; everything else is
 * float32 (a bfloat16 model's vectors arrive as float32 copies).
 * The state slices may be strided over the batch (a batch-major state): the shift and wkv row strides
 * are arguments; within a row they are contiguous. shift_out may be shift_in and wkv_out may be wkv_in:
 * each row is read before it is written. The reference is the torch path of the same modules, which
 * tests/test_kernels.py compares. */
#define FIELD_NAME(name) #name,
/* Up to 8 products that share one parallel job; outputs are claimed 16 at a time across all of them. */
typedef struct {
    rows_fn fn;
    const void *w;
    const float *scale, *x;
    float *y;
    int64_t in, out;
    int wtype;
} product_t;

typedef struct {
    product_t p[8];
    int n;
    int64_t M, start[9]; /* start[i]: product i's first 16-output unit */
} products_t;

static void products_job(const void *ctx, int64_t lo, int64_t hi) {
    const products_t *a = ctx;
    for (int i = 0; i < a->n; i++) {
        const int64_t s = a->start[i], e = a->start[i + 1];
        if (e <= lo || s >= hi) continue;
        const product_t *p = &a->p[i];
        int64_t o0 = ((lo > s ? lo : s) - s) * 16, o1 = ((hi < e ? hi : e) - s) * 16;
        p->fn(p->w, p->scale, p->x, p->y, o0, o1 < p->out ? o1 : p->out, p->in, p->out, a->M);
    }
}

static void add_product(products_t *a, int wtype, int input_major, const void *w, const float *scale, const float *x,
                        float *y, int64_t in, int64_t out) {
    if (a->n == 8) abort(); /* a job holds at most 8 products; the blocks add at most 7 */
    a->p[a->n++] = (product_t){(input_major ? kernels_t : kernels)[wtype], w, scale, x, y, in, out, wtype};
}

/* Run the products, on `threads` threads when they read at least min_bytes of weights (times rows). */
static void run_products(products_t *a, int threads, int64_t min_bytes) {
    int64_t bytes = 0;
    a->start[0] = 0;
    for (int i = 0; i < a->n; i++) {
        a->start[i + 1] = a->start[i] + (a->p[i].out + 15) / 16;
        bytes += a->p[i].in * a->p[i].out * wsize[a->p[i].wtype];
    }
    parallel(products_job, a, a->start[a->n], 1, bytes * a->M >= min_bytes ? threads : 1);
    a->n = 0;
}

static void layer_norm_row(const float *x, float *y, const float *w, const float *b, int64_t C, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t c = 0; c < C; c++) mean += x[c];
    mean /= (float)C;
    for (int64_t c = 0; c < C; c++) var += (x[c] - mean) * (x[c] - mean);
    const float rstd = 1.0f / sqrtf(var / (float)C + eps);
    for (int64_t c = 0; c < C; c++) y[c] = (x[c] - mean) * rstd * w[c] + b[c];
}

/* One block's sizes and settings, as v_parse_layer reads them. */
typedef struct {
    int64_t B, C, H, F, rank[4];                  /* rows, channels, heads, channel-mix width, LoRA ranks */
    int wtype[8], lora_wtype;                     /* each product's weight type (W_F32, W_BF16, W_I8), the LoRAs' */
    int64_t shift_in, shift_out, wkv_in, wkv_out; /* row strides in floats */
    float eps[4];                                 /* ln1, ln2, ln_x eps, and one constant of the version */
    int threads, layer0;
    int64_t min_bytes, step_min_numel;            /* thresholds for using the threads (kernels.py) */
} block_dims;

#define MAX_FIELDS 64
typedef struct {
    uintptr_t q[MAX_FIELDS];
    block_dims d;
} block_layer;

/* One layer's (pointers, (B, C, H, F, 4 LoRA ranks), (n_mats product wtypes..., LoRA wtype), (shift_in,
 * shift_out, wkv_in, wkv_out row strides), (4 floats: ln1, ln2, ln_x eps, a version's constant), layer0),
 * checked, into *L. 0 on success; -1 with a Python error set. */
static int parse_layer(PyObject *item, block_layer *L, int n_fields, int n_mats) {
    PyObject *ptrs, *wtypes;
    block_dims *d = &L->d;
    if (!PyArg_ParseTuple(item, "O!(LLLLLLLL)O!(LLLL)(ffff)p", &PyTuple_Type, &ptrs, &d->B, &d->C, &d->H, &d->F,
                          &d->rank[0], &d->rank[1], &d->rank[2], &d->rank[3], &PyTuple_Type, &wtypes, &d->shift_in,
                          &d->shift_out, &d->wkv_in, &d->wkv_out, &d->eps[0], &d->eps[1], &d->eps[2], &d->eps[3],
                          &d->layer0)) {
        return -1;
    }
    if (PyTuple_GET_SIZE(ptrs) != n_fields || PyTuple_GET_SIZE(wtypes) != n_mats + 1) {
        PyErr_Format(PyExc_ValueError, "blocks: %d pointers and %d weight types expected, got %zd and %zd", n_fields,
                     n_mats + 1, PyTuple_GET_SIZE(ptrs), PyTuple_GET_SIZE(wtypes));
        return -1;
    }
    if (d->B <= 0 || d->C <= 0 || d->H <= 0 || d->C % d->H || d->C / d->H > 1024 || d->F <= 0 || d->rank[0] < 0 ||
        d->rank[1] < 0 || d->rank[2] < 0 || d->rank[3] < 0) {
        PyErr_SetString(PyExc_ValueError, "blocks: bad size (head sizes up to 1024)");
        return -1;
    }
    for (int i = 0; i <= n_mats; i++) {
        long t = PyLong_AsLong(PyTuple_GET_ITEM(wtypes, i));
        if (PyErr_Occurred()) return -1;
        int lora = i == n_mats; /* the last: the LoRA matrices' type, float32 or bfloat16, input-major */
        if (t < 0 || t > (lora ? 1 : 2) || (lora ? kernels_t : kernels)[t] == NULL) {
            PyErr_Format(PyExc_RuntimeError, "blocks: no %s kernel for weight type %ld on this CPU (ISA %s)",
                         lora ? "LoRA" : "product", t, isa);
            return -1;
        }
        if (lora) {
            d->lora_wtype = (int)t;
        } else {
            d->wtype[i] = (int)t;
        }
    }
    for (int i = 0; i < n_fields; i++) {
        L->q[i] = (uintptr_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(ptrs, i));
        if (PyErr_Occurred()) return -1;
    }
    return 0;
}

typedef void (*block_fn)(const uintptr_t *q, const block_dims *d, float *scratch);

/* (layers, threads, min_bytes, step_min_numel): parse every layer, then run them one after another with
 * the GIL released, so no Python runs between them: between two calls the ~47 MB of weights a layer
 * streams (L12-D768 fp32) have pushed Python's own data out of the caches, and the next ~30 us of
 * Python took ~200 us. The caller chains them (layer i's x_out is layer i+1's x_in). scratch_per_row:
 * the floats a block needs per row of x. */
static PyObject *run_blocks(PyObject *args, int n_fields, int n_mats, block_fn run,
                            int64_t (*scratch_per_row)(const block_dims *)) {
    PyObject *layers;
    int threads;
    long long min_bytes, step_min_numel;
    if (!PyArg_ParseTuple(args, "O!iLL", &PyTuple_Type, &layers, &threads, &min_bytes, &step_min_numel)) {
        return NULL;
    }
    const Py_ssize_t n = PyTuple_GET_SIZE(layers);
    block_layer *L = malloc((size_t)(n > 0 ? n : 1) * sizeof(block_layer));
    if (L == NULL) return PyErr_NoMemory();
    size_t floats = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse_layer(PyTuple_GET_ITEM(layers, i), &L[i], n_fields, n_mats) < 0) {
            free(L);
            return NULL;
        }
        block_dims *d = &L[i].d;
        d->threads = threads;
        d->min_bytes = min_bytes;
        d->step_min_numel = step_min_numel;
        size_t need = (size_t)d->B * (size_t)scratch_per_row(d);
        if (need > floats) floats = need;
    }
    float *scratch = malloc(floats * sizeof(float) + 64);
    if (scratch == NULL) {
        free(L);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) run(L[i].q, &L[i].d, scratch);
    Py_END_ALLOW_THREADS
    free(scratch);
    free(L);
    Py_RETURN_NONE;
}

/* RWKV-7. Product weight types in the order receptance, key, value, output, ffn_key, ffn_value; ranks
 * (w, a, v, g); eps[3] = decay_scale. */
#define V7_BLOCK_FIELDS(X)                                                                                    \
    X(ln1_w) X(ln1_b) X(ln2_w) X(ln2_b) X(x_r) X(x_w) X(x_k) X(x_v) X(x_a) X(x_g) X(w0) X(a0) X(v0) X(k_k)   \
    X(k_a) X(r_k) X(ln_x_w) X(ln_x_b) X(w1) X(w2) X(a1) X(a2) X(v1) X(v2) X(g1) X(g2) X(receptance)         \
    X(receptance_scale) X(key) X(key_scale) X(value) X(value_scale) X(output) X(output_scale) X(ffn_x_k)   \
    X(ffn_key) X(ffn_key_scale) X(ffn_value) X(ffn_value_scale) X(x_in) X(x_out) X(shift_in) X(shift_out)  \
    X(wkv_in) X(wkv_out) X(v_first)
#define V7_ENUM(name) V7F_##name,
enum { V7_BLOCK_FIELDS(V7_ENUM) V7F_COUNT };
static const char *v7_block_fields[] = {V7_BLOCK_FIELDS(FIELD_NAME)};

static int64_t v7_scratch(const block_dims *d) {
    return 19 * d->C + d->F + d->rank[0] + d->rank[1] + d->rank[2] + d->rank[3];
}

static void v7_block_run(const uintptr_t *q, const block_dims *d, float *scratch) {
#define P(name) ((const float *)q[V7F_##name])
#define W(name) ((const void *)q[V7F_##name])
    const int64_t B = d->B, C = d->C, F = d->F, BC = B * C;
    float *xa = scratch, *xr = xa + BC, *xw = xr + BC, *xk = xw + BC, *xv = xk + BC, *xaa = xv + BC, *xg = xaa + BC;
    float *r = xg + BC, *k = r + BC, *v = k + BC, *wl = v + BC, *al = wl + BC, *vl = al + BC, *g = vl + BC;
    float *yg = g + BC, *x1 = yg + BC, *xf = x1 + BC, *xkf = xf + BC, *fo = xkf + BC, *kf = fo + BC;
    float *hw = kf + B * F, *ha = hw + B * d->rank[0], *hv = ha + B * d->rank[1], *hg = hv + B * d->rank[2];
    const float *x_in = P(x_in);
    float *x_out = (float *)q[V7F_x_out];
    float *shift_out = (float *)q[V7F_shift_out];
    const float *shift_in = P(shift_in);
    const int layer0 = d->layer0;

    for (int64_t b = 0; b < B; b++) { /* LN1 and the six token mixes */
        const int64_t o = b * C;
        const float *sx = shift_in + b * d->shift_in;
        layer_norm_row(x_in + o, xa + o, P(ln1_w), P(ln1_b), C, d->eps[0]);
        for (int64_t c = 0; c < C; c++) {
            const float x = xa[o + c], xx = sx[c] - x;
            xr[o + c] = x + xx * P(x_r)[c];
            xw[o + c] = x + xx * P(x_w)[c];
            xk[o + c] = x + xx * P(x_k)[c];
            xv[o + c] = x + xx * P(x_v)[c];
            xaa[o + c] = x + xx * P(x_a)[c];
            xg[o + c] = x + xx * P(x_g)[c];
        }
    }
    products_t job = {.M = B};
    add_product(&job, d->wtype[0], 0, W(receptance), P(receptance_scale), xr, r, C, C);
    add_product(&job, d->wtype[1], 0, W(key), P(key_scale), xk, k, C, C);
    add_product(&job, d->wtype[2], 0, W(value), P(value_scale), xv, v, C, C);
    add_product(&job, d->lora_wtype, 1, W(w1), NULL, xw, hw, C, d->rank[0]);
    add_product(&job, d->lora_wtype, 1, W(a1), NULL, xaa, ha, C, d->rank[1]);
    if (!layer0) {
        add_product(&job, d->lora_wtype, 1, W(v1), NULL, xv, hv, C, d->rank[2]);
    }
    add_product(&job, d->lora_wtype, 1, W(g1), NULL, xg, hg, C, d->rank[3]);
    run_products(&job, d->threads, d->min_bytes);

    for (int64_t i = 0; i < B * d->rank[0]; i++) hw[i] = tanhf(hw[i]);
    for (int64_t i = 0; i < B * d->rank[3]; i++) hg[i] = sigmoidf_(hg[i]);
    add_product(&job, d->lora_wtype, 1, W(w2), NULL, hw, wl, d->rank[0], C);
    add_product(&job, d->lora_wtype, 1, W(a2), NULL, ha, al, d->rank[1], C);
    if (!layer0) add_product(&job, d->lora_wtype, 1, W(v2), NULL, hv, vl, d->rank[2], C);
    add_product(&job, d->lora_wtype, 1, W(g2), NULL, hg, g, d->rank[3], C);
    run_products(&job, d->threads, d->min_bytes);

    float *v_first = (float *)q[V7F_v_first];
    if (layer0) memcpy(v_first, v, (size_t)BC * sizeof(float));
    v7_args tail = {r, k, v, wl, al, layer0 ? NULL : vl, layer0 ? NULL : v_first, g, P(w0), P(a0), P(v0), P(k_k),
                    P(k_a), P(r_k), P(ln_x_w), P(ln_x_b), P(wkv_in), (float *)q[V7F_wkv_out], yg, d->H, C / d->H,
                    d->wkv_in, d->wkv_out, d->eps[2], d->eps[3]};
    parallel(v7_tail_job, &tail, B * d->H, 1, B * C * (C / d->H) >= d->step_min_numel ? d->threads : 1);

    add_product(&job, d->wtype[3], 0, W(output), P(output_scale), yg, x1, C, C);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t b = 0; b < B; b++) { /* residual, LN2, the channel-mix token mix, the new shift */
        const int64_t o = b * C;
        const float *sx = shift_in + b * d->shift_in + C;
        float *so = shift_out + b * d->shift_out;
        for (int64_t c = 0; c < C; c++) x1[o + c] += x_in[o + c];
        layer_norm_row(x1 + o, xf + o, P(ln2_w), P(ln2_b), C, d->eps[1]);
        for (int64_t c = 0; c < C; c++) xkf[o + c] = xf[o + c] + (sx[c] - xf[o + c]) * P(ffn_x_k)[c];
        memcpy(so, xa + o, (size_t)C * sizeof(float)); /* the time-mix half was read in the first loop */
        memcpy(so + C, xf + o, (size_t)C * sizeof(float));
    }
    add_product(&job, d->wtype[4], 0, W(ffn_key), P(ffn_key_scale), xkf, kf, C, F);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t i = 0; i < B * F; i++) kf[i] = kf[i] > 0.0f ? kf[i] * kf[i] : 0.0f;
    add_product(&job, d->wtype[5], 0, W(ffn_value), P(ffn_value_scale), kf, fo, F, C);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t i = 0; i < BC; i++) x_out[i] = x1[i] + fo[i];
#undef P
#undef W
}

_Static_assert(V7F_COUNT <= MAX_FIELDS, "raise MAX_FIELDS");

static PyObject *v7_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return run_blocks(args, V7F_COUNT, 6, v7_block_run, v7_scratch);
}

/* The end of an RWKV-4, 5 or 6 block, once x1 holds its time-mix output: the residual, LN2, the
 * receptance-gated channel-mix (RWKV-4's, which RWKV-5 imports unchanged and RWKV-6 keeps up to its token
 * mix) and the new shift. buf: 5 [B, C] buffers then one [B, F]:
 *   x_out = x1 + sigmoid(W_r x_r) * W_v relu(W_k x_k)^2,   x_f = xf + (sx_ffn - xf) * mix_f   (RWKV-6)
 *                                                          x_f = xf * mix_f + sx_ffn * (1 - mix_f)  (4, 5) */
typedef struct {
    const float *ln2_w, *ln2_b, *mix_k, *mix_r, *k_scale, *r_scale, *v_scale;
    const void *key, *receptance, *value;
    int k_type, r_type, v_type;
    int delta_mix; /* 1: RWKV-6's form of the token mix; 0: RWKV-4/5's (the references round differently) */
} gated_cmix;

static void gated_channel_mix(const block_dims *d, const gated_cmix *p, const float *x_in, const float *xa,
                              const float *shift_in, float *shift_out, float *x1, float *buf, float *x_out) {
    const int64_t B = d->B, C = d->C, F = d->F, BC = B * C;
    float *xf = buf, *xkf = xf + BC, *xrf = xkf + BC, *rf = xrf + BC, *fo = rf + BC, *kf = fo + BC;
    for (int64_t b = 0; b < B; b++) {
        const int64_t o = b * C;
        const float *sx = shift_in + b * d->shift_in + C;
        float *so = shift_out + b * d->shift_out;
        for (int64_t c = 0; c < C; c++) x1[o + c] += x_in[o + c];
        layer_norm_row(x1 + o, xf + o, p->ln2_w, p->ln2_b, C, d->eps[1]);
        for (int64_t c = 0; c < C; c++) {
            const float x = xf[o + c], s = sx[c];
            if (p->delta_mix) {
                xkf[o + c] = x + (s - x) * p->mix_k[c];
                xrf[o + c] = x + (s - x) * p->mix_r[c];
            } else {
                xkf[o + c] = x * p->mix_k[c] + s * (1.0f - p->mix_k[c]);
                xrf[o + c] = x * p->mix_r[c] + s * (1.0f - p->mix_r[c]);
            }
        }
        memcpy(so, xa + o, (size_t)C * sizeof(float)); /* the time-mix half was read before the time-mix */
        memcpy(so + C, xf + o, (size_t)C * sizeof(float));
    }
    products_t job = {.M = B};
    add_product(&job, p->k_type, 0, p->key, p->k_scale, xkf, kf, C, F);
    add_product(&job, p->r_type, 0, p->receptance, p->r_scale, xrf, rf, C, C);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t i = 0; i < B * F; i++) kf[i] = kf[i] > 0.0f ? kf[i] * kf[i] : 0.0f;
    add_product(&job, p->v_type, 0, p->value, p->v_scale, kf, fo, F, C);
    run_products(&job, d->threads, d->min_bytes);
    gate(rf, rf, BC, 0);
    for (int64_t i = 0; i < BC; i++) x_out[i] = x1[i] + rf[i] * fo[i];
}

/* RWKV-6, per block (v6_block_run); the reference is aviary/model/v6.py (TimeMix and ChannelMix with
 * T = 1). Product weight types in the order receptance, key, value, gate, output, ffn_key,
 * ffn_receptance, ffn_value; ranks (D = time_maa_w1's per-mix rank, Dd = the decay LoRA's, 0, 0).
 *   xa = LN1(x);   xx = sx_att - xa;   h = tanh((xa + xx * maa_x) maa_w1)             (one job, [B, 5D])
 *   m_f = h_f maa_w2[f];   x_f = xa + xx * (maa_f + m_f)     f in w, k, v, r, g       (one job)
 *   r, k, v, g' = W x_r, W x_k, W x_v, W x_g;   h_d = x_w decay_w1                      (one job)
 *   w_lora = tanh(h_d) decay_w2                                                        (one job)
 *   g = silu(g');   logw = -exp(decay + w_lora);   y, S' = the gla step with u = faaaa  (v6_tail_job)
 *   x1 = x + W_o (GroupNorm_head(y) * g)                                               (one job)
 *   xf = LN2(x1);   k_f, r_f = W_fk (xf + (sx_ffn - xf) maa_k), W_fr (xf + (sx_ffn - xf) maa_r)  (one job)
 *   x_out = x1 + sigmoid(r_f) * W_fv relu(k_f)^2                                        (one job) */
#define V6_BLOCK_FIELDS(X)                                                                                    \
    X(ln1_w) X(ln1_b) X(ln2_w) X(ln2_b) X(maa_x) X(maa_w) X(maa_k) X(maa_v) X(maa_r) X(maa_g) X(maa_w1)      \
    X(maa_w2) X(decay) X(decay_w1) X(decay_w2) X(faaaa) X(ln_x_w) X(ln_x_b) X(receptance) X(receptance_scale) \
    X(key) X(key_scale) X(value) X(value_scale) X(gate) X(gate_scale) X(output) X(output_scale) X(ffn_maa_k) \
    X(ffn_maa_r) X(ffn_key) X(ffn_key_scale) X(ffn_receptance) X(ffn_receptance_scale) X(ffn_value)         \
    X(ffn_value_scale) X(x_in) X(x_out) X(shift_in) X(shift_out) X(wkv_in) X(wkv_out)
#define V6_ENUM(name) V6F_##name,
enum { V6_BLOCK_FIELDS(V6_ENUM) V6F_COUNT };
static const char *v6_block_fields[] = {V6_BLOCK_FIELDS(FIELD_NAME)};

typedef struct {
    const float *r, *k, *v, *g, *w_lora, *decay, *u, *ln_w, *ln_b, *S_in;
    float *S_out, *out;
    int64_t H, N, S_in_stride, S_out_stride;
    float eps;
} v6_args;

/* Per (batch row, head): the gla step (gla_job's formulas, decay exp(-exp(decay + w_lora))), then the
 * head's GroupNorm times the gate: out = GroupNorm(y) * g. */
MULTIVERSION static void v6_tail_job(const void *ctx, int64_t lo, int64_t hi) {
    const v6_args *p = ctx;
    const int64_t H = p->H, N = p->N, C = H * N;
    float y[1024], wd[1024]; /* N <= 1024 */
    for (int64_t bh = lo; bh < hi; bh++) {
        const int64_t b = bh / H, h = bh % H, row = b * C + h * N, ch = h * N;
        const float *r = p->r + row, *k = p->k + row, *v = p->v + row, *g = p->g + row, *u = p->u + ch;
        decays(p->decay + ch, p->w_lora + row, wd, N);
        const float *S = p->S_in + b * p->S_in_stride + h * N * N;
        float *So = p->S_out + b * p->S_out_stride + h * N * N, *out = p->out + row;
        float bonus = 0.0f;
        for (int64_t i = 0; i < N; i++) bonus += r[i] * u[i] * k[i];
        for (int64_t j = 0; j < N; j++) y[j] = bonus * v[j];
        for (int64_t i = 0; i < N; i++) {
            const float ri = r[i], wi = wd[i], ki = k[i];
            const float *srow = S + i * N;
            float *orow = So + i * N;
            for (int64_t j = 0; j < N; j++) {
                const float sj = srow[j];
                y[j] += ri * sj;
                orow[j] = wi * sj + ki * v[j];
            }
        }
        float mean = 0.0f, var = 0.0f;
        for (int64_t j = 0; j < N; j++) mean += y[j];
        mean /= (float)N;
        for (int64_t j = 0; j < N; j++) var += (y[j] - mean) * (y[j] - mean);
        const float rstd = 1.0f / sqrtf(var / (float)N + p->eps);
        for (int64_t j = 0; j < N; j++) out[j] = ((y[j] - mean) * rstd * p->ln_w[ch + j] + p->ln_b[ch + j]) * g[j];
    }
}

static int64_t v6_scratch(const block_dims *d) {
    return 24 * d->C + d->F + 10 * d->rank[0] + d->rank[1]; /* the buffers at the top of v6_block_run */
}

static void v6_block_run(const uintptr_t *q, const block_dims *d, float *scratch) {
#define P(name) ((const float *)q[V6F_##name])
#define W(name) ((const void *)q[V6F_##name])
    const int64_t B = d->B, C = d->C, F = d->F, D = d->rank[0], Dd = d->rank[1], BC = B * C;
    float *xa = scratch, *xx = xa + BC, *xs = xx + BC, *m = xs + 5 * BC; /* xs: x_w, x_k, x_v, x_r, x_g */
    float *r = m + 5 * BC, *k = r + BC, *v = k + BC, *g = v + BC, *wl = g + BC, *yg = wl + BC, *x1 = yg + BC;
    float *cmix = x1 + BC; /* gated_channel_mix's buffers: 5 [B, C], then [B, F] */
    float *h = cmix + 5 * BC + B * F, *hf = h + 5 * B * D, *hd = hf + 5 * B * D; /* h [B, 5D]; hf [5, B, D] */
    const float *x_in = P(x_in), *shift_in = P(shift_in);
    float *x_out = (float *)q[V6F_x_out], *shift_out = (float *)q[V6F_shift_out];
    const float *maa[5] = {P(maa_w), P(maa_k), P(maa_v), P(maa_r), P(maa_g)};

    for (int64_t b = 0; b < B; b++) { /* LN1, xx, and the input of the mix LoRA (in x1 for now) */
        const int64_t o = b * C;
        const float *sx = shift_in + b * d->shift_in;
        layer_norm_row(x_in + o, xa + o, P(ln1_w), P(ln1_b), C, d->eps[0]);
        for (int64_t c = 0; c < C; c++) {
            xx[o + c] = sx[c] - xa[o + c];
            x1[o + c] = xa[o + c] + xx[o + c] * P(maa_x)[c];
        }
    }
    products_t job = {.M = B};
    add_product(&job, d->lora_wtype, 1, W(maa_w1), NULL, x1, h, C, 5 * D);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t b = 0; b < B; b++) /* tanh, and [B, 5, D] -> [5, B, D] for one product per mix */
        for (int64_t f = 0; f < 5; f++)
            for (int64_t i = 0; i < D; i++) hf[(f * B + b) * D + i] = tanhf(h[(b * 5 + f) * D + i]);
    for (int64_t f = 0; f < 5; f++) {
        const char *w2 = (const char *)W(maa_w2) + f * D * C * wsize[d->lora_wtype];
        add_product(&job, d->lora_wtype, 1, w2, NULL, hf + f * B * D, m + f * BC, D, C);
    }
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t f = 0; f < 5; f++)
        for (int64_t b = 0; b < B; b++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t i = f * BC + b * C + c;
                xs[i] = xa[b * C + c] + xx[b * C + c] * (maa[f][c] + m[i]);
            }
    add_product(&job, d->wtype[0], 0, W(receptance), P(receptance_scale), xs + 3 * BC, r, C, C);
    add_product(&job, d->wtype[1], 0, W(key), P(key_scale), xs + BC, k, C, C);
    add_product(&job, d->wtype[2], 0, W(value), P(value_scale), xs + 2 * BC, v, C, C);
    add_product(&job, d->wtype[3], 0, W(gate), P(gate_scale), xs + 4 * BC, g, C, C);
    add_product(&job, d->lora_wtype, 1, W(decay_w1), NULL, xs, hd, C, Dd);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t i = 0; i < B * Dd; i++) hd[i] = tanhf(hd[i]);
    gate(g, g, BC, 1); /* silu */
    add_product(&job, d->lora_wtype, 1, W(decay_w2), NULL, hd, wl, Dd, C);
    run_products(&job, d->threads, d->min_bytes);

    v6_args tail = {r, k, v, g, wl, P(decay), P(faaaa), P(ln_x_w), P(ln_x_b), P(wkv_in), (float *)q[V6F_wkv_out], yg,
                    d->H, C / d->H, d->wkv_in, d->wkv_out, d->eps[2]};
    parallel(v6_tail_job, &tail, B * d->H, 1, B * C * (C / d->H) >= d->step_min_numel ? d->threads : 1);
    add_product(&job, d->wtype[4], 0, W(output), P(output_scale), yg, x1, C, C);
    run_products(&job, d->threads, d->min_bytes);

    const gated_cmix cm = {P(ln2_w), P(ln2_b), P(ffn_maa_k), P(ffn_maa_r), P(ffn_key_scale), P(ffn_receptance_scale),
                           P(ffn_value_scale), W(ffn_key), W(ffn_receptance), W(ffn_value), d->wtype[5], d->wtype[6],
                           d->wtype[7], 1};
    gated_channel_mix(d, &cm, x_in, xa, shift_in, shift_out, x1, cmix, x_out);
#undef P
#undef W
}

_Static_assert(V6F_COUNT <= MAX_FIELDS, "raise MAX_FIELDS");

static PyObject *v6_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return run_blocks(args, V6F_COUNT, 8, v6_block_run, v6_scratch);
}

/* RWKV-4, per block (v4_block_run); the reference is aviary/model/v4.py (TimeMix and ChannelMix with
 * T = 1) and aviary/ops/wkv4.py's recurrence. Product weight types in the order receptance, key, value,
 * output, ffn_key, ffn_receptance, ffn_value, then an unused LoRA type; ranks 0; the state row is
 * (aa, bb, pp) [3, C]; H is unused (the caller passes C).
 *   xa = LN1(x);   x_f = xa * mix_f + sx_att * (1 - mix_f)      f in k, v, r
 *   r', k, v = W x_r, W x_k, W x_v                              (one job)
 *   y = wkv4 step (u = first, w = -exp(decay));   x1 = x + W_o (sigmoid(r') * y)   (one job)
 *   channel-mix as RWKV-5's                                     (two jobs) */
#define V4_BLOCK_FIELDS(X)                                                                                    \
    X(ln1_w) X(ln1_b) X(ln2_w) X(ln2_b) X(mix_k) X(mix_v) X(mix_r) X(decay) X(first) X(receptance)            \
    X(receptance_scale) X(key) X(key_scale) X(value) X(value_scale) X(output) X(output_scale) X(ffn_mix_k)   \
    X(ffn_mix_r) X(ffn_key) X(ffn_key_scale) X(ffn_receptance) X(ffn_receptance_scale) X(ffn_value)         \
    X(ffn_value_scale) X(x_in) X(x_out) X(shift_in) X(shift_out) X(wkv_in) X(wkv_out)
#define V4_ENUM(name) V4F_##name,
enum { V4_BLOCK_FIELDS(V4_ENUM) V4F_COUNT };
static const char *v4_block_fields[] = {V4_BLOCK_FIELDS(FIELD_NAME)};

static int64_t v4_scratch(const block_dims *d) {
    return 14 * d->C + d->F; /* 9 [B, C] buffers in v4_block_run, then gated_channel_mix's */
}

static void v4_block_run(const uintptr_t *q, const block_dims *d, float *scratch) {
#define P(name) ((const float *)q[V4F_##name])
#define W(name) ((const void *)q[V4F_##name])
    const int64_t B = d->B, C = d->C, BC = B * C;
    float *xa = scratch, *xk = xa + BC, *xv = xk + BC, *xr = xv + BC, *r = xr + BC, *k = r + BC, *v = k + BC;
    float *yr = v + BC, *x1 = yr + BC; /* then gated_channel_mix's buffers */
    const float *x_in = P(x_in), *shift_in = P(shift_in), *S_in = P(wkv_in);
    float *x_out = (float *)q[V4F_x_out], *shift_out = (float *)q[V4F_shift_out], *S_out = (float *)q[V4F_wkv_out];

    for (int64_t b = 0; b < B; b++) { /* LN1 and the three token mixes */
        const int64_t o = b * C;
        const float *sx = shift_in + b * d->shift_in;
        layer_norm_row(x_in + o, xa + o, P(ln1_w), P(ln1_b), C, d->eps[0]);
        for (int64_t c = 0; c < C; c++) {
            const float x = xa[o + c], s = sx[c];
            xk[o + c] = x * P(mix_k)[c] + s * (1.0f - P(mix_k)[c]);
            xv[o + c] = x * P(mix_v)[c] + s * (1.0f - P(mix_v)[c]);
            xr[o + c] = x * P(mix_r)[c] + s * (1.0f - P(mix_r)[c]);
        }
    }
    products_t job = {.M = B};
    add_product(&job, d->wtype[0], 0, W(receptance), P(receptance_scale), xr, r, C, C);
    add_product(&job, d->wtype[1], 0, W(key), P(key_scale), xk, k, C, C);
    add_product(&job, d->wtype[2], 0, W(value), P(value_scale), xv, v, C, C);
    run_products(&job, d->threads, d->min_bytes);
    for (int64_t b = 0; b < B; b++) { /* the WKV step: output from the state before the update */
        const float *S = S_in + b * d->wkv_in;
        float *So = S_out + b * d->wkv_out;
        for (int64_t c = 0; c < C; c++) {
            const int64_t i = b * C + c;
            const float aa = S[c], bb = S[C + c], pp = S[2 * C + c], kt = k[i], vt = v[i];
            float ww = P(first)[c] + kt, p = pp > ww ? pp : ww;
            float e1 = expf(pp - p), e2 = expf(ww - p);
            yr[i] = sigmoidf_(r[i]) * ((e1 * aa + e2 * vt) / (e1 * bb + e2));
            ww = -expf(P(decay)[c]) + pp;
            p = ww > kt ? ww : kt;
            e1 = expf(ww - p);
            e2 = expf(kt - p);
            So[c] = e1 * aa + e2 * vt;
            So[C + c] = e1 * bb + e2;
            So[2 * C + c] = p;
        }
    }
    add_product(&job, d->wtype[3], 0, W(output), P(output_scale), yr, x1, C, C);
    run_products(&job, d->threads, d->min_bytes);

    const gated_cmix cm = {P(ln2_w), P(ln2_b), P(ffn_mix_k), P(ffn_mix_r), P(ffn_key_scale), P(ffn_receptance_scale),
                           P(ffn_value_scale), W(ffn_key), W(ffn_receptance), W(ffn_value), d->wtype[4], d->wtype[5],
                           d->wtype[6], 0};
    gated_channel_mix(d, &cm, x_in, xa, shift_in, shift_out, x1, x1 + BC, x_out);
#undef P
#undef W
}

_Static_assert(V4F_COUNT <= MAX_FIELDS, "raise MAX_FIELDS");

static PyObject *v4_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return run_blocks(args, V4F_COUNT, 7, v4_block_run, v4_scratch);
}

/* RWKV-5, per block (v5_block_run); the reference is aviary/model/v5.py (TimeMix, and RWKV-4's ChannelMix
 * from aviary/model/v4.py, with T = 1). Product weight types in the order receptance, key, value, gate,
 * output, ffn_key, ffn_receptance, ffn_value, then an unused LoRA type (there are no LoRAs); ranks 0.
 *   xa = LN1(x);   x_f = xa * mix_f + sx_att * (1 - mix_f)      f in k, v, r, g
 *   r, k, v, g' = W x_r, W x_k, W x_v, W x_g                    (one job)
 *   g = silu(g');   y, S' = the gla step with decay exp(-exp(decay)), u = faaaa (v6_tail_job, w_lora = 0)
 *   x1 = x + W_o (GroupNorm_head(y) * g)                        (one job)
 *   xf = LN2(x1);   k_f, r_f = W_fk (xf mix_k + sx_ffn (1 - mix_k)), W_fr (... mix_r ...)   (one job)
 *   x_out = x1 + sigmoid(r_f) * W_fv relu(k_f)^2                (one job) */
#define V5_BLOCK_FIELDS(X)                                                                                    \
    X(ln1_w) X(ln1_b) X(ln2_w) X(ln2_b) X(mix_k) X(mix_v) X(mix_r) X(mix_g) X(decay) X(faaaa) X(ln_x_w)       \
    X(ln_x_b) X(receptance) X(receptance_scale) X(key) X(key_scale) X(value) X(value_scale) X(gate)          \
    X(gate_scale) X(output) X(output_scale) X(ffn_mix_k) X(ffn_mix_r) X(ffn_key) X(ffn_key_scale)            \
    X(ffn_receptance) X(ffn_receptance_scale) X(ffn_value) X(ffn_value_scale) X(x_in) X(x_out) X(shift_in)   \
    X(shift_out) X(wkv_in) X(wkv_out)
#define V5_ENUM(name) V5F_##name,
enum { V5_BLOCK_FIELDS(V5_ENUM) V5F_COUNT };
static const char *v5_block_fields[] = {V5_BLOCK_FIELDS(FIELD_NAME)};

static int64_t v5_scratch(const block_dims *d) {
    return 17 * d->C + d->F; /* 12 [B, C] buffers in v5_block_run, then gated_channel_mix's */
}

static void v5_block_run(const uintptr_t *q, const block_dims *d, float *scratch) {
#define P(name) ((const float *)q[V5F_##name])
#define W(name) ((const void *)q[V5F_##name])
    const int64_t B = d->B, C = d->C, BC = B * C;
    float *xa = scratch, *xk = xa + BC, *xv = xk + BC, *xr = xv + BC, *xg = xr + BC;
    float *r = xg + BC, *k = r + BC, *v = k + BC, *g = v + BC, *zero = g + BC, *yg = zero + BC, *x1 = yg + BC;
    /* then gated_channel_mix's buffers */
    const float *x_in = P(x_in), *shift_in = P(shift_in);
    float *x_out = (float *)q[V5F_x_out], *shift_out = (float *)q[V5F_shift_out];

    for (int64_t b = 0; b < B; b++) { /* LN1 and the four token mixes */
        const int64_t o = b * C;
        const float *sx = shift_in + b * d->shift_in;
        layer_norm_row(x_in + o, xa + o, P(ln1_w), P(ln1_b), C, d->eps[0]);
        for (int64_t c = 0; c < C; c++) {
            const float x = xa[o + c], s = sx[c];
            xk[o + c] = x * P(mix_k)[c] + s * (1.0f - P(mix_k)[c]);
            xv[o + c] = x * P(mix_v)[c] + s * (1.0f - P(mix_v)[c]);
            xr[o + c] = x * P(mix_r)[c] + s * (1.0f - P(mix_r)[c]);
            xg[o + c] = x * P(mix_g)[c] + s * (1.0f - P(mix_g)[c]);
        }
    }
    products_t job = {.M = B};
    add_product(&job, d->wtype[0], 0, W(receptance), P(receptance_scale), xr, r, C, C);
    add_product(&job, d->wtype[1], 0, W(key), P(key_scale), xk, k, C, C);
    add_product(&job, d->wtype[2], 0, W(value), P(value_scale), xv, v, C, C);
    add_product(&job, d->wtype[3], 0, W(gate), P(gate_scale), xg, g, C, C);
    run_products(&job, d->threads, d->min_bytes);
    gate(g, g, BC, 1); /* silu */
    for (int64_t i = 0; i < BC; i++) zero[i] = 0.0f; /* RWKV-5's decay has no data-dependent part */
    v6_args tail = {r, k, v, g, zero, P(decay), P(faaaa), P(ln_x_w), P(ln_x_b), P(wkv_in), (float *)q[V5F_wkv_out], yg,
                    d->H, C / d->H, d->wkv_in, d->wkv_out, d->eps[2]};
    parallel(v6_tail_job, &tail, B * d->H, 1, B * C * (C / d->H) >= d->step_min_numel ? d->threads : 1);
    add_product(&job, d->wtype[4], 0, W(output), P(output_scale), yg, x1, C, C);
    run_products(&job, d->threads, d->min_bytes);

    const gated_cmix cm = {P(ln2_w), P(ln2_b), P(ffn_mix_k), P(ffn_mix_r), P(ffn_key_scale), P(ffn_receptance_scale),
                           P(ffn_value_scale), W(ffn_key), W(ffn_receptance), W(ffn_value), d->wtype[5], d->wtype[6],
                           d->wtype[7], 0};
    gated_channel_mix(d, &cm, x_in, xa, shift_in, shift_out, x1, x1 + BC, x_out);
#undef P
#undef W
}

_Static_assert(V5F_COUNT <= MAX_FIELDS, "raise MAX_FIELDS");

static PyObject *v5_blocks(PyObject *self, PyObject *args) {
    (void)self;
    return run_blocks(args, V5F_COUNT, 8, v5_block_run, v5_scratch);
}

/* wkv_step(kind, r, k, v, logw, u_or_a, b, S_in, S_out, y, BH, H, K, V, threads): kind 0 = gla, 1 = delta. */
static PyObject *wkv_step(PyObject *self, PyObject *args) {
    int kind, threads;
    unsigned long long pr, pk, pv, pw, pu, pb, psi, pso, py;
    long long BH, H, K, V;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKKLLLLi", &kind, &pr, &pk, &pv, &pw, &pu, &pb, &psi, &pso, &py, &BH, &H, &K,
                          &V, &threads)) {
        return NULL;
    }
    if (kind < 0 || kind > 1 || BH < 0 || H <= 0 || K < 0 || V < 0 || V > 1024) {
        PyErr_SetString(PyExc_ValueError, "wkv_step: bad kind or size (head sizes up to 1024)");
        return NULL;
    }
#define PTR(p) ((const float *)(uintptr_t)(p))
    wkv_args a = {PTR(pr), PTR(pk), PTR(pv), PTR(pw), kind == 0 ? PTR(pu) : NULL, kind == 1 ? PTR(pu) : NULL,
                  PTR(pb), PTR(psi), (float *)(uintptr_t)pso, (float *)(uintptr_t)py, H, K, V};
#undef PTR
    Py_BEGIN_ALLOW_THREADS
    parallel(kind == 0 ? gla_job : delta_job, &a, BH, 1, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* vector_math(on) -> the previous setting: whether the blocks' gates use exp512 (tests run both). */
static PyObject *vector_math(PyObject *self, PyObject *args) {
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    const int before = vec_math;
#ifdef AVIARY_X86
    vec_math = on && __builtin_cpu_supports("avx512f");
#else
    vec_math = 0;
#endif
    return PyBool_FromLong(before);
}

static PyMethodDef methods[] = {
    {"vector_math", vector_math, METH_VARARGS,
     "vector_math(on) -> bool: turn the 16-wide exponentials of the blocks' gates on (where the CPU has\n"
     "AVX-512) or off (libm's expf, the path of other CPUs); returns the previous setting. For tests."},
    {"linear", linear, METH_VARARGS,
     "linear(w_ptr, scale_ptr_or_0, x_ptr, y_ptr, in, out, M, threads, wtype, input_major=False, batch=1):\n"
     "y[M, out] = x W^T (* scale) for W [out, in], or x W for W [in, out] when input_major (float weights);\n"
     "wtype 0 = float32, 1 = bfloat16, 2 = int8. Raw pointers to contiguous CPU buffers; batch > 1 runs\n"
     "that many such products on consecutive x, W, scale and y blocks."},
    {"wkv_step", wkv_step, METH_VARARGS,
     "wkv_step(kind, r, k, v, logw, u_or_a, b, S_in, S_out, y, BH, H, K, V, threads): one-token WKV step,\n"
     "kind 0 = gla (RWKV-5/6: u [H, K], b unused), 1 = delta rule (RWKV-7: a and b [BH, K]). Raw pointers\n"
     "to contiguous float32 CPU buffers; S_out may equal S_in."},
    {"v7_tail", v7_tail, METH_VARARGS,
     "v7_tail(r, k, v, w_lora, a_lora, v_lora_or_0, v_first_or_0, g, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, S_in,\n"
     "S_out, out, B, H, N, eps, decay_scale, threads): RWKV-7's one-token time-mix between its products\n"
     "and its output projection. Raw pointers to contiguous float32 CPU buffers; S_out may equal S_in."},
    {"v4_blocks", v4_blocks, METH_VARARGS,
     "v4_blocks(layers, threads, min_bytes, step_min_numel): one-token RWKV-4 blocks, one after another; each\n"
     "layer is (pointers in the order of V4_BLOCK_FIELDS, (B, C, C, F, 0, 0, 0, 0), (7 product wtypes, an\n"
     "unused LoRA wtype), (4 row strides; the state row is [3, C]), (ln1_eps, ln2_eps, unused, unused), layer0)."},
    {"v5_blocks", v5_blocks, METH_VARARGS,
     "v5_blocks(layers, threads, min_bytes, step_min_numel): one-token RWKV-5 blocks, one after another; each\n"
     "layer is (pointers in the order of V5_BLOCK_FIELDS, (B, C, H, F, 0, 0, 0, 0), (8 product wtypes, an\n"
     "unused LoRA wtype), (4 row strides), (ln1_eps, ln2_eps, ln_x_eps, unused), layer0)."},
    {"v6_blocks", v6_blocks, METH_VARARGS,
     "v6_blocks(layers, threads, min_bytes, step_min_numel): one-token RWKV-6 blocks, one after another; each\n"
     "layer is (pointers in the order of V6_BLOCK_FIELDS, (B, C, H, F, rank_mix, rank_decay, 0, 0), (8 product\n"
     "wtypes, LoRA wtype), (4 row strides), (ln1_eps, ln2_eps, ln_x_eps, unused), layer0)."},
    {"v7_blocks", v7_blocks, METH_VARARGS,
     "v7_blocks(layers, threads, min_bytes, step_min_numel): one-token RWKV-7 blocks, one after another; each\n"
     "layer is (pointers in the order of V7_BLOCK_FIELDS, (B, C, H, F, rank_w, rank_a, rank_v, rank_g), (6\n"
     "product wtypes, LoRA wtype), (4 row strides), (ln1_eps, ln2_eps, ln_x_eps, decay_scale), layer0)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Aviary's CPU decode kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    pick_kernels();
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) {
        return NULL;
    }
    static const struct {
        const char *name, **fields;
        int count;
    } lists[] = {{"V4_BLOCK_FIELDS", v4_block_fields, V4F_COUNT},
                 {"V5_BLOCK_FIELDS", v5_block_fields, V5F_COUNT},
                 {"V6_BLOCK_FIELDS", v6_block_fields, V6F_COUNT},
                 {"V7_BLOCK_FIELDS", v7_block_fields, V7F_COUNT}};
    if (PyModule_AddStringConstant(mod, "ISA", isa) < 0 || PyModule_AddIntConstant(mod, "BF16_DOT", bf16_dot) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    for (size_t l = 0; l < sizeof lists / sizeof lists[0]; l++) { /* each version's field names, in C order */
        PyObject *t = PyTuple_New(lists[l].count);
        for (int i = 0; t != NULL && i < lists[l].count; i++) {
            PyObject *s = PyUnicode_FromString(lists[l].fields[i]);
            if (s == NULL) {
                Py_CLEAR(t);
                break;
            }
            PyTuple_SET_ITEM(t, i, s);
        }
        if (t == NULL || PyModule_AddObject(mod, lists[l].name, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(mod);
            return NULL;
        }
    }
    return mod;
}
