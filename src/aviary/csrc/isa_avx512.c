/* AVX-512: the products with intrinsics (float32, bfloat16 widened, int8 widened; bfloat16 with the
 * AVX512_BF16 dot-product instruction where the CPU has it), the gates with a 16-wide exponential, and
 * wkv_impl.h's steps compiled for 512-bit registers. The fastest path, where the CPU has it (Intel
 * Skylake-X and later servers, AMD Zen 4 and later). */
#include "kernels.h"
#ifdef AVIARY_X86
#include <immintrin.h>
#include <stdlib.h>

#define bf16_to_f32 aviary_bf16_to_f32
static inline float f32_scalar(float v) { return v; }
static inline float i8_scalar(int8_t v) { return (float)v; }

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
 * much compute as memory traffic, and the two have to overlap. A core keeps both its full FMA rate and
 * its streaming rate only while it reads one or two runs of consecutive addresses and its other loads hit
 * L1; 4x4 tiles over whole rows read four runs and re-read 16 rows of x (48 KB at in = 768) from L2 for
 * every tile (docs/benchmarks.md, Inference item 8, for the microbenchmarks). So:
 *   - outputs go in blocks of BLOCK_OUT rows; within a block, `in` is taken in chunks sized so that the
 *     chunk of x (all M rows) is X_CHUNK_BYTES and stays in L1 while each 4-row tile of the block uses it;
 *   - a tile (4 weight rows x 4 rows of x, 16 accumulators) sums one chunk; hsum16 folds its 16 sums into
 *     the block's partial sums (acc, on the stack);
 *   - while a block computes, the next block's weights (consecutive addresses) are prefetched into L2 in
 *     order, spread evenly over the block's steps.
 * Rows of x past the last multiple of 4 take tiles of 1-3 rows; a tail of `in` past the last multiple of
 * 16 is added per output in plain C. Block sizes were picked by paired timings (docs/benchmarks.md,
 * Inference item 8). */
#define BLOCK_OUT 8 /* weight rows per block */
#define BLOCK_M 32 /* rows of x per pass (the stack holds BLOCK_M x BLOCK_OUT sums) */
#define X_CHUNK_BYTES 16384 /* x's share of L1 */

#define PF_HINT _MM_HINT_T1 /* into L2: into L1 as well was slower at batch 16 (docs/benchmarks.md, Inference item 8) */
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

/* ---- gates and WKV steps ---------------------------------------------------------------------------- */
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

#define SFX avx512
#define TARGET __attribute__((target("avx512f")))
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SFX)
#include "wkv_impl.h"

static int setup(void);

isa_table aviary_isa_avx512 = {
    "avx512",
    {f32_rows_avx512, bf16_rows_avx512, i8_rows_avx512},
    {f32_t_rows_avx512, bf16_t_rows_avx512, NULL},
    0,
    F(gla_job), F(delta_job), F(v6_tail_job), F(v7_tail_job),
    gate_avx512,
    setup,
};

/* The CPU has AVX-512F; with AVX512_BF16 (and BW), bfloat16 products take the dot-product instruction. */
static int setup(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return 0;
    hsum16_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) {
        aviary_isa_avx512.rows[W_BF16] = bf16dp_rows;
        aviary_isa_avx512.bf16_dot = 1;
    }
    return 1;
}
#endif
