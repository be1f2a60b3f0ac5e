/* Products and gates written with GCC/Clang vector types (no intrinsics): the includer defines SFX (a
 * name suffix), TARGET (a function attribute, or nothing) and VL (floats per vector: 8 for 256-bit
 * registers, 4 for 128-bit ones) and gets
 *   rows_f32_SFX, rows_bf16_SFX, rows_i8_SFX        W [out, in]
 *   rows_t_f32_SFX, rows_t_bf16_SFX                 W [in, out] (the LoRA matrices)
 *   v7_gates_SFX, decays_SFX, gate_SFX              per-channel gates with an 8-wide exponential
 * isa_avx2.c compiles them for AVX2 + FMA (ymm registers), isa_generic.c for the compiler's baseline
 * (SSE2 on x86-64, where each vector is two registers; NEON on aarch64). The compiler contracts the
 * `acc += a * b` below into fused multiply-adds where the target has them (GCC's default
 * -ffp-contract=fast; Clang's "on" within one expression), so results differ from a plain C loop only by
 * summation order and rounding. */
#include <stdlib.h>

#include "kernels.h"

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SFX)
#define INLINE static inline __attribute__((always_inline)) TARGET

typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));
typedef int8_t vb __attribute__((vector_size(VL)));

INLINE vf ld_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HAVE_SHUFFLEVECTOR 1 /* GCC 11 and older have only __builtin_shuffle, for same-length vectors */
#endif
typedef uint16_t vh2 __attribute__((vector_size(4 * VL)));
INLINE vf ld_bf16(const uint16_t *p) { /* bfloat16 is the top half of a float32 */
    vh h;
    memcpy(&h, p, sizeof h);
#if defined(HAVE_SHUFFLEVECTOR) /* interleaved with zeros: one zip / punpck */
    const vh zero = {0};
#if VL == 8
    return (vf)(vh2)__builtin_shufflevector(zero, h, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
#else
    return (vf)(vh2)__builtin_shufflevector(zero, h, 0, 4, 1, 5, 2, 6, 3, 7);
#endif
#else
    return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
INLINE vf ld_i8(const int8_t *p) {
    vb b;
    memcpy(&b, p, sizeof b);
    return __builtin_convertvector(__builtin_convertvector(b, vi), vf); /* via int32: one instruction each */
}
INLINE void st_f32(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE float hsum(vf v) {
#if VL == 8 && defined(HAVE_SHUFFLEVECTOR)
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
#elif VL == 8
    v = v + __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3});
#endif
    return (v[0] + v[2]) + (v[1] + v[3]);
}
static inline float sc_f32(float v) { return v; }
static inline float sc_i8(int8_t v) { return (float)v; }

/* ---- W [out, in] --------------------------------------------------------------------------------------
 * Widening bfloat16 and int8 weights element by element is slow with vector types (GCC scalarises a
 * conversion from a vector of 8 bytes), so whole 32-bit lanes are widened with shifts instead: a lane
 * holding bf16 weights (w0, w1) gives w0 as `lane << 16` and w1 as `lane & 0xffff0000`; a lane of int8
 * weights (w0..w3) gives each by shifting it to the top and back. The weights of a block of B = K * VL
 * inputs then come out as K vectors in a permuted order (every K-th weight, K times), and x is permuted
 * the same way once per call (`permute_x`), so the products pair the same (weight, input) as before.
 *
 * One row of x: each output's dot product with four independent accumulators, the weights streamed
 * once in order. Several rows (a batch): register tiles of TW weight rows x TX rows of x (`tile`, below)
 * over chunks of `in` sized so that the chunk of x for all rows stays in L1 while every tile of the TW
 * weight rows uses it; bfloat16 and int8 weights of a tile are widened once per chunk into a float32
 * buffer (not once per tile of x rows). The last outputs take a narrower tile; inputs past the last whole
 * block are summed one at a time. */
#define X_CHUNK_BYTES 16384 /* x's share of L1 */
#define CHUNK_MAX 512       /* floats of `in` per chunk at most (the widened tile: TW x 512 floats) */

INLINE void widen_f32(const float *p, vf *o) { o[0] = ld_f32(p); }
INLINE void widen_bf16(const uint16_t *p, vf *o) {
    vu v;
    memcpy(&v, p, sizeof v);
    o[0] = (vf)(v << 16);
    o[1] = (vf)(v & 0xffff0000u);
}
INLINE vf lane_i8(vu v, int shift) { return __builtin_convertvector((vi)(v << shift) >> 24, vf); }
INLINE void widen_i8(const int8_t *p, vf *o) {
    vu v;
    memcpy(&v, p, sizeof v);
    o[0] = lane_i8(v, 24);
    o[1] = lane_i8(v, 16);
    o[2] = lane_i8(v, 8);
    o[3] = lane_i8(v, 0);
}

#ifdef AVX2_I8_INSTRUCTIONS /* isa_avx2.c: 8 bytes sign-extended by one instruction (vpmovsxbd), in order */
#include <immintrin.h>
INLINE void widen_i8_in_order(const int8_t *p, vf *o) {
    for (int k = 0; k < 4; k++)
        o[k] = (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)(p + 8 * k))));
}
#endif

/* xp[m, i + k VL + j] = x[m, i + j K + k] for every whole block [i, i + K VL) of a row; the rest as it is. */
static void F(permute_x)(const float *x, float *xp, int64_t M, int64_t in, int K) {
    const int64_t B = (int64_t)K * VL, inB = in / B * B;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * in;
        float *pm = xp + m * in;
        for (int64_t i = 0; i < inB; i += B)
            for (int k = 0; k < K; k++)
                for (int j = 0; j < VL; j++) pm[i + k * VL + j] = xm[i + j * K + k];
        for (int64_t i = inB; i < in; i++) pm[i] = xm[i];
    }
}

/* A buffer of this thread's for x permuted (each worker thread has its own; kept between calls). */
static float *F(x_buffer)(size_t floats) {
    static __thread float *buf;
    static __thread size_t cap;
    if (floats > cap) {
        free(buf);
        buf = malloc(floats * sizeof(float));
        cap = buf ? floats : 0;
    }
    return buf;
}

/* The register tile of the batch products: TW weight rows x TX rows of x, TW * TX accumulators, TW weight
 * vectors and one x vector live at once. 3 x 4 fills AVX2's and SSE2's 16 registers (12 + 3 + 1) and
 * makes 7 loads per 12 multiply-adds (a 4 x 2 tile: 6 per 8); NEON's 32 registers take 4 x 4. */
#ifndef TW
#define TW 3
#define TX 4
#endif

/* acc[r * TW + j] += (lane-wise) sum over [0, n) of w_j * x_r, for j < J <= TW weight rows (stride ws) and
 * r < R <= TX rows of x (stride xs); n a multiple of VL. The lanes are summed once per output, at the end
 * (summing them per chunk was a visible share of a batch product: docs/benchmarks.md, Design measurements
 * item 7). R and J are constants where this is inlined. */
INLINE void tile(const float *w, int64_t ws, const float *x, int64_t xs, int64_t n, vf *acc, const int R,
                 const int J) {
    vf c[TX][TW];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) c[r][j] = (vf){0};
    for (int64_t i = 0; i < n; i += VL) {
        vf b[TW];
        for (int j = 0; j < J; j++) b[j] = ld_f32(w + j * ws + i);
        for (int r = 0; r < R; r++) {
            const vf a = ld_f32(x + r * xs + i);
            for (int j = 0; j < J; j++) c[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < J; j++) acc[r * TW + j] += c[r][j];
}

/* tile() for R rows of x and J (a variable) weight rows */
INLINE void tile_rows(const float *w, int64_t ws, const float *x, int64_t xs, int64_t n, vf *acc, const int R,
                      int J) {
    if (J == TW) {
        tile(w, ws, x, xs, n, acc, R, TW);
    } else if (TW > 3 && J == 3) {
        tile(w, ws, x, xs, n, acc, R, 3);
    } else if (J == 2) {
        tile(w, ws, x, xs, n, acc, R, 2);
    } else {
        tile(w, ws, x, xs, n, acc, R, 1);
    }
}

/* NAME: the rows_fn for weights of type WT, widened K vectors per block of K * VL by WIDEN, in the
 * permuted order when PERMUTED (x is then permuted to match), else in the weights' own order. */
#define DEFINE_ROWS(NAME, WT, K, WIDEN, SCALAR, PERMUTED)                                                               \
    /* w . x over [0, inB) (xp: x permuted) plus the rest [inB, in) one at a time (x as it is) */             \
    TARGET static float F(NAME##_dot1)(const WT *w, const float *xp, const float *x, int64_t in) {             \
        const int64_t B = (int64_t)(K) * VL, inB = in / B * B;                                                \
        vf a[4] = {{0}, {0}, {0}, {0}}, wv[4];                                                                \
        int64_t i = 0;                                                                                        \
        for (; i + 4 * VL <= inB; i += 4 * VL) {                                                              \
            for (int b = 0; b < 4 / (K); b++) WIDEN(w + i + b * B, wv + b * (K));                             \
            for (int k = 0; k < 4; k++) a[k] += wv[k] * ld_f32(xp + i + k * VL);                              \
        }                                                                                                     \
        for (; i < inB; i += B) {                                                                             \
            WIDEN(w + i, wv);                                                                                 \
            for (int k = 0; k < (K); k++) a[k] += wv[k] * ld_f32(xp + i + k * VL);                            \
        }                                                                                                     \
        float s = hsum((a[0] + a[1]) + (a[2] + a[3]));                                                        \
        for (; i < in; i++) s += SCALAR(w[i]) * x[i];                                                         \
        return s;                                                                                             \
    }                                                                                                         \
                                                                                                              \
    TARGET static void F(NAME##_blocked)(const WT *W, const float *scale, const float *xp, const float *x,      \
                                         float *y, int64_t o0, int64_t o1, int64_t in, int64_t out, int64_t M) { \
        const int64_t B = (int64_t)(K) * VL, inB = in / B * B;                                                \
        float wbuf[(K) > 1 ? TW * CHUNK_MAX : 1];                                                             \
        for (int64_t mb = 0; mb < M; mb += 32) {                                                              \
            const int64_t Mb = M - mb < 32 ? M - mb : 32;                                                     \
            const float *xb = xp + mb * in;                                                                   \
            int64_t chunk = X_CHUNK_BYTES / (4 * Mb) / 32 * 32; /* whole blocks */                            \
            if (chunk < 64) chunk = 64;                                                                       \
            if (chunk > CHUNK_MAX) chunk = CHUNK_MAX;                                                         \
            for (int64_t o = o0; o < o1; o += TW) {                                                           \
                const int J = o1 - o < TW ? (int)(o1 - o) : TW; /* weight rows in this tile */                 \
                vf acc[32 * TW];                                                                              \
                memset(acc, 0, sizeof acc);                                                                   \
                const WT *w = W + o * in;                                                                     \
                for (int64_t k0 = 0; k0 < inB; k0 += chunk) {                                                 \
                    const int64_t n = k0 + chunk < inB ? chunk : inB - k0;                                    \
                    if (o + 2 * TW <= o1) /* the next tile's chunk into L2 while this one computes */          \
                        for (int j = 0; j < TW; j++)                                                          \
                            for (int64_t b = 0; b < n * (int64_t)sizeof(WT); b += 64)                         \
                                __builtin_prefetch((const char *)(w + (TW + j) * in + k0) + b, 0, 2);          \
                    const float *wt;                                                                          \
                    int64_t ws;                                                                               \
                    if ((K) > 1) { /* the tile's chunk widened to float32 once, for every row of x */        \
                        for (int j = 0; j < J; j++)                                                           \
                            for (int64_t i = 0; i < n; i += B) {                                              \
                                vf wv[4];                                                                     \
                                WIDEN(w + j * in + k0 + i, wv);                                               \
                                for (int k = 0; k < (K); k++) st_f32(wbuf + j * CHUNK_MAX + i + k * VL, wv[k]); \
                            }                                                                                 \
                        wt = wbuf;                                                                            \
                        ws = CHUNK_MAX;                                                                       \
                    } else {                                                                                  \
                        wt = (const float *)(const void *)(w + k0);                                           \
                        ws = in;                                                                              \
                    }                                                                                         \
                    int64_t m = 0;                                                                            \
                    for (; m + TX <= Mb; m += TX) tile_rows(wt, ws, xb + m * in + k0, in, n, acc + m * TW, TX, J); \
                    switch (Mb - m) { /* 0 to 3 rows left (TX is at most 4) */                                 \
                    case 3: tile_rows(wt, ws, xb + m * in + k0, in, n, acc + m * TW, 3, J); break;            \
                    case 2: tile_rows(wt, ws, xb + m * in + k0, in, n, acc + m * TW, 2, J); break;            \
                    case 1: tile_rows(wt, ws, xb + m * in + k0, in, n, acc + m * TW, 1, J); break;            \
                    default: break;                                                                           \
                    }                                                                                         \
                }                                                                                             \
                for (int64_t m = 0; m < Mb; m++) {                                                            \
                    const float *xm = x + (mb + m) * in;                                                      \
                    float *ym = y + (mb + m) * out;                                                           \
                    for (int j = 0; j < J; j++) {                                                             \
                        float s = hsum(acc[m * TW + j]);                                                      \
                        const WT *wj = w + j * in;                                                            \
                        for (int64_t i = inB; i < in; i++) s += SCALAR(wj[i]) * xm[i];                        \
                        ym[o + j] = scale ? s * scale[o + j] : s;                                             \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    TARGET static void F(NAME)(const void *wp, const float *scale, const float *x, float *y, int64_t o0,        \
                               int64_t o1, int64_t in, int64_t out, int64_t M) {                              \
        const WT *W = (const WT *)wp;                                                                         \
        const float *xp = x;                                                                                  \
        if (PERMUTED) {                                                                                       \
            float *buf = F(x_buffer)((size_t)(M * in));                                                       \
            if (buf == NULL) { /* no memory for the permuted copy: one weight at a time */                   \
                for (int64_t o = o0; o < o1; o++)                                                             \
                    for (int64_t m = 0; m < M; m++) {                                                         \
                        float s = 0.0f;                                                                       \
                        for (int64_t i = 0; i < in; i++) s += SCALAR(W[o * in + i]) * x[m * in + i];         \
                        y[m * out + o] = scale ? s * scale[o] : s;                                            \
                    }                                                                                         \
                return;                                                                                       \
            }                                                                                                 \
            F(permute_x)(x, buf, M, in, (K));                                                                 \
            xp = buf;                                                                                         \
        }                                                                                                     \
        if (M > 1) {                                                                                          \
            F(NAME##_blocked)(W, scale, xp, x, y, o0, o1, in, out, M);                                        \
            return;                                                                                           \
        }                                                                                                     \
        for (int64_t o = o0; o < o1; o++)                                                                     \
            for (int64_t m = 0; m < M; m++) {                                                                 \
                const float s = F(NAME##_dot1)(W + o * in, xp + m * in, x + m * in, in);                      \
                y[m * out + o] = scale ? s * scale[o] : s;                                                    \
            }                                                                                                 \
    }

DEFINE_ROWS(rows_f32, float, 1, widen_f32, sc_f32, 0)
DEFINE_ROWS(rows_bf16, uint16_t, 2, widen_bf16, aviary_bf16_to_f32, 1)
#ifdef AVX2_I8_INSTRUCTIONS
DEFINE_ROWS(rows_i8, int8_t, 4, widen_i8_in_order, sc_i8, 0)
#else
DEFINE_ROWS(rows_i8, int8_t, 4, widen_i8, sc_i8, 1)
#endif

/* ---- W [in, out] ----------------------------------------------------------------------------------------
 * Tiles of 32 outputs (4 vectors) x 2 rows of x: each step of i widens 4 weight vectors once and
 * broadcasts one x value per row. Outputs past the last multiple of 8 take a scalar loop. */
#define DEFINE_ROWS_T(NAME, WT, LD, SCALAR)                                                                   \
    TARGET static void F(NAME)(const void *wp, const float *scale, const float *x, float *y, int64_t o0,        \
                               int64_t o1, int64_t in, int64_t out, int64_t M) {                              \
        const WT *W = (const WT *)wp;                                                                         \
        (void)scale;                                                                                          \
        const int64_t o8 = o0 + (o1 - o0) / VL * VL;                                                          \
        for (int64_t m = 0; m < M; m += 2) {                                                                  \
            const int R = M - m < 2 ? 1 : 2;                                                                  \
            const float *x0 = x + m * in, *x1 = x0 + (R == 2 ? in : 0);                                       \
            int64_t o = o0;                                                                                   \
            for (; o + 4 * VL <= o8; o += 4 * VL) {                                                           \
                vf c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0};            \
                for (int64_t i = 0; i < in; i++) {                                                            \
                    const WT *wi = W + i * out + o;                                                           \
                    const vf b0 = LD(wi), b1 = LD(wi + VL), b2 = LD(wi + 2 * VL), b3 = LD(wi + 3 * VL);       \
                    const float a = x0[i], e = x1[i];                                                         \
                    c0 += a * b0;                                                                             \
                    c1 += a * b1;                                                                             \
                    c2 += a * b2;                                                                             \
                    c3 += a * b3;                                                                             \
                    d0 += e * b0;                                                                             \
                    d1 += e * b1;                                                                             \
                    d2 += e * b2;                                                                             \
                    d3 += e * b3;                                                                             \
                }                                                                                             \
                float *y0 = y + m * out + o;                                                                  \
                st_f32(y0, c0);                                                                               \
                st_f32(y0 + VL, c1);                                                                          \
                st_f32(y0 + 2 * VL, c2);                                                                      \
                st_f32(y0 + 3 * VL, c3);                                                                      \
                if (R == 2) {                                                                                 \
                    st_f32(y0 + out, d0);                                                                     \
                    st_f32(y0 + out + VL, d1);                                                                \
                    st_f32(y0 + out + 2 * VL, d2);                                                            \
                    st_f32(y0 + out + 3 * VL, d3);                                                            \
                }                                                                                             \
            }                                                                                                 \
            for (; o < o8; o += VL) {                                                                         \
                vf c = {0}, d = {0};                                                                          \
                for (int64_t i = 0; i < in; i++) {                                                            \
                    const vf b = LD(W + i * out + o);                                                         \
                    c += x0[i] * b;                                                                           \
                    d += x1[i] * b;                                                                           \
                }                                                                                             \
                st_f32(y + m * out + o, c);                                                                   \
                if (R == 2) st_f32(y + (m + 1) * out + o, d);                                                 \
            }                                                                                                 \
            for (; o < o1; o++)                                                                               \
                for (int r = 0; r < R; r++) {                                                                 \
                    float s = 0.0f;                                                                           \
                    for (int64_t i = 0; i < in; i++) s += x[(m + r) * in + i] * SCALAR(W[i * out + o]);        \
                    y[(m + r) * out + o] = s;                                                                 \
                }                                                                                             \
        }                                                                                                     \
    }

DEFINE_ROWS_T(rows_t_f32, float, ld_f32, sc_f32)
DEFINE_ROWS_T(rows_t_bf16, uint16_t, ld_bf16, aviary_bf16_to_f32)

/* ---- gates ----------------------------------------------------------------------------------------------
 * e^x for VL floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by its Taylor polynomial to
 * r^7 (remainder < 6e-9 relative), times 2^n built in the exponent bits. x is clamped to [-87, 88], so
 * results below e^-87 (1.6e-38) come out as e^-87 and above e^88 as e^88: harmless in the gates below,
 * where such values are added to 1 or multiplied into a state. NaN stays NaN. */
INLINE vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); } /* mask ? a : b */

INLINE vf vexp(vf x) {
    const vf zero = {0}, lo = zero - 87.0f, hi = zero + 88.0f;
    x = vsel(x < lo, lo, x);
    x = vsel(x > hi, hi, x);
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf q = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return q * (vf)e;
}

INLINE vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

/* Loads n < VL floats into a vector padded with zeros; stores its first n. */
INLINE vf ld_part(const float *p, int64_t n) {
    vf v = {0};
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}
INLINE void st_part(float *p, vf v, int64_t n) { memcpy(p, &v, (size_t)n * sizeof(float)); }

/* RWKV-7's gates of one head: a = sigmoid(a0 + a_lora), dec = exp(-decay_scale sigmoid(w0 + w_lora)),
 * and (when vl is not NULL) vs = sigmoid(v0 + v_lora). */
TARGET static void F(v7_gates)(const float *w0, const float *wl, const float *a0, const float *al, const float *v0,
                               const float *vl, float decay_scale, float *dec, float *a, float *vs, int64_t n) {
    for (int64_t i = 0; i < n; i += VL) {
        const int64_t k = n - i < VL ? n - i : VL;
        if (k == VL) {
            st_f32(a + i, vsigmoid(ld_f32(a0 + i) + ld_f32(al + i)));
            st_f32(dec + i, vexp(-decay_scale * vsigmoid(ld_f32(w0 + i) + ld_f32(wl + i))));
            if (vl) st_f32(vs + i, vsigmoid(ld_f32(v0 + i) + ld_f32(vl + i)));
        } else {
            st_part(a + i, vsigmoid(ld_part(a0 + i, k) + ld_part(al + i, k)), k);
            st_part(dec + i, vexp(-decay_scale * vsigmoid(ld_part(w0 + i, k) + ld_part(wl + i, k))), k);
            if (vl) st_part(vs + i, vsigmoid(ld_part(v0 + i, k) + ld_part(vl + i, k)), k);
        }
    }
}

/* RWKV-5/6's decays of one head: out = exp(-exp(a + b)). */
TARGET static void F(decays)(const float *a, const float *b, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) st_f32(out + i, vexp(-vexp(ld_f32(a + i) + ld_f32(b + i))));
    if (i < n) st_part(out + i, vexp(-vexp(ld_part(a + i, n - i) + ld_part(b + i, n - i))), n - i);
}

TARGET static void F(gate)(const float *x, float *out, int64_t n, int times_x) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) {
        const vf v = ld_f32(x + i), s = vsigmoid(v);
        st_f32(out + i, times_x ? v * s : s);
    }
    if (i < n) {
        const vf v = ld_part(x + i, n - i), s = vsigmoid(v);
        st_part(out + i, times_x ? v * s : s, n - i);
    }
}
