/* A self-test of Aviary's numeric C core (src/aviary/csrc without module.c): every instruction-set table
 * this CPU runs (on aarch64 only "generic") against plain double-precision loops computed here, plus a
 * few hand-computed values. No Python, no dependencies beyond libc and libm, so it also runs on a
 * cross-compiled target (scripts/check_c_core.sh builds it for aarch64 and runs it under qemu).
 *
 *   cc -O3 -pthread -Isrc/aviary/csrc tests/csrc/selftest.c src/aviary/csrc/{isa,isa_generic,isa_avx2,\
 *      isa_avx512,threads,blocks}.c -lm -o selftest && ./selftest
 *
 * Checks: rows[] (W [out, in]; float32, bfloat16, int8 with row scales) over shapes with tails and
 * several batch sizes M, once with misaligned pointers; rows_t[] (W [in, out]; float32, bfloat16); the
 * gla and delta WKV steps (also in place); the v6/v7 block tails; the gates (sigmoid, silu); products and
 * a WKV step split over 2 threads by aviary_parallel; hand-computed values for each. Outputs are compared
 * with a tolerance relative to the largest |reference| of the check (RTOL 1e-5: float32 sums against
 * double ones; bfloat16 products with bf16_dot round x to bfloat16 first, and so does their reference);
 * gates per element against exp in double (GATE_RTOL 1e-6 relative). Both can be overridden with -D. Buffers
 * are surrounded by guard values that must stay untouched. Prints the ISAs it runs, one line per failure,
 * and ends with `selftest: N passed, M failed`; exits 1 on any failure. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifndef RTOL
#define RTOL 1e-5 /* products and WKV steps: of the check's largest |reference| */
#endif
#ifndef GATE_RTOL
#define GATE_RTOL 1e-6 /* gates: of each element's |reference| (the kernels' exponential is a polynomial) */
#endif
#define GUARD 16       /* guard floats either side of every output buffer */
#define SENTINEL 1234567.0f

static int n_pass, n_fail;
static const char *isa_name = "-";

/* ---- deterministic inputs: a 64-bit LCG (Knuth's MMIX constants), top 53 bits as a double in [0, 1) ---- */
static uint64_t lcg = 1;
static void seed(uint64_t s) { lcg = s * 2862933555777941757ull + 3037000493ull; }
static double urand(void) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg >> 11) * (1.0 / 9007199254740992.0);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)urand(); }
static void fill(float *p, int64_t n, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) p[i] = frand(lo, hi);
}

/* float32 -> bfloat16, round to nearest even (finite values), as the bf16 dot-product path rounds x */
static uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float bf16_round(float f) { return aviary_bf16_to_f32(bf16_rne(f)); }

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "selftest: out of memory\n");
        exit(2);
    }
    return p;
}

/* ---- output buffers with guards ---------------------------------------------------------------------- */
typedef struct {
    float *base, *p; /* p = base + GUARD (+ offset) */
    int64_t n;
} obuf;

static obuf obuf_new(int64_t n, int offset) {
    obuf b;
    b.n = n;
    b.base = xmalloc((size_t)(n + 2 * GUARD + offset) * sizeof(float));
    for (int64_t i = 0; i < n + 2 * GUARD + offset; i++) b.base[i] = SENTINEL;
    b.p = b.base + GUARD + offset;
    return b;
}
static int guards_ok(const obuf *b) {
    for (int i = 1; i <= GUARD; i++)
        if (b->p[-i] != SENTINEL || b->p[b->n - 1 + i] != SENTINEL) return 0;
    return 1;
}

/* One check: got against ref over n values, |got - ref| <= rtol * max |ref| (NaN fails). */
static int check(const char *what, const float *got, const double *ref, int64_t n, double rtol) {
    double maxref = 0.0, maxerr = 0.0;
    int64_t worst = -1;
    for (int64_t i = 0; i < n; i++)
        if (fabs(ref[i]) > maxref) maxref = fabs(ref[i]);
    const double tol = rtol * maxref;
    for (int64_t i = 0; i < n; i++) {
        const double err = fabs((double)got[i] - ref[i]);
        if (isnan(err)) { /* NaN: the worst there is */
            maxerr = err;
            worst = i;
            break;
        }
        if (worst < 0 || err > maxerr) {
            maxerr = err;
            worst = i;
        }
    }
    if (n == 0 || maxerr <= tol) {
        n_pass++;
        return 1;
    }
    n_fail++;
    printf("FAIL [%s] %s: at %lld got %.9g want %.9g (|err| %.3g > tol %.3g = %.0e * max|ref| %.6g)\n", isa_name,
           what, (long long)worst, (double)got[worst], ref[worst], maxerr, tol, rtol, maxref);
    return 0;
}

static void check_guards(const char *what, const obuf *b) {
    if (guards_ok(b)) {
        n_pass++;
    } else {
        n_fail++;
        printf("FAIL [%s] %s: wrote outside its output\n", isa_name, what);
    }
}

/* An exact expectation (hand-computed values), |got - want| <= tol. */
static void expect(const char *what, float got, double want, double tol) {
    if (fabs((double)got - want) <= tol) {
        n_pass++;
    } else {
        n_fail++;
        printf("FAIL [%s] known value %s: got %.9g want %.9g\n", isa_name, what, (double)got, want);
    }
}

/* ---- products ------------------------------------------------------------------------------------------ */
static const char *const wname[3] = {"f32", "bf16", "i8"};

typedef struct {
    void *wmem;
    const void *w; /* possibly misaligned into wmem */
    float *scale;  /* int8 only */
    float *xmem;
    const float *x;
    double *ref; /* [M, out] */
} product_case;

/* W (random, of type wt, [out, in] or [in, out] when transposed: same element count), x [M, in], and the
 * double reference y[m, o] = scale[o] sum_i W(o, i) xr[m, i], xr = x rounded to bf16 when round_x. */
static product_case make_product(int wt, int transposed, int64_t out, int64_t in, int64_t M, int misalign,
                                 int round_x) {
    product_case c;
    const int64_t n = out * in;
    c.wmem = xmalloc((size_t)(n + 1) * (size_t)aviary_wsize[wt]);
    float *wf = xmalloc((size_t)(n ? n : 1) * sizeof(float)); /* W's values as floats, in storage order */
    char *wb = (char *)c.wmem + (misalign ? aviary_wsize[wt] : 0);
    for (int64_t i = 0; i < n; i++) {
        if (wt == W_F32) {
            wf[i] = frand(-1.0f, 1.0f);
            memcpy(wb + 4 * i, &wf[i], 4);
        } else if (wt == W_BF16) {
            const uint16_t h = bf16_rne(frand(-1.0f, 1.0f));
            wf[i] = aviary_bf16_to_f32(h);
            memcpy(wb + 2 * i, &h, 2);
        } else {
            const int8_t q = (int8_t)(int)floor(urand() * 256.0 - 128.0);
            wf[i] = (float)q;
            wb[i] = (char)q;
        }
    }
    c.w = wb;
    c.scale = NULL;
    if (wt == W_I8) {
        c.scale = xmalloc((size_t)out * sizeof(float));
        fill(c.scale, out, 1e-3f, 2e-2f);
    }
    c.xmem = xmalloc((size_t)(M * in + 1) * sizeof(float));
    float *x = c.xmem + (misalign ? 1 : 0);
    fill(x, M * in, -1.0f, 1.0f);
    c.x = x;
    c.ref = xmalloc((size_t)(M * out + 1) * sizeof(double));
    for (int64_t m = 0; m < M; m++)
        for (int64_t o = 0; o < out; o++) {
            double s = 0.0;
            for (int64_t i = 0; i < in; i++) {
                const double w = wf[transposed ? i * out + o : o * in + i];
                const float xv = x[m * in + i];
                s += w * (double)(round_x ? bf16_round(xv) : xv);
            }
            c.ref[m * out + o] = c.scale ? s * (double)c.scale[o] : s;
        }
    free(wf);
    return c;
}

static void free_product(product_case *c) {
    free(c->wmem);
    free(c->scale);
    free(c->xmem);
    free(c->ref);
}

static const int64_t shapes[][2] = {{1, 1}, {5, 7}, {33, 100}, {64, 16}, {130, 768}, {44, 1000}, {16, 33}, {4, 64}};
static const int64_t batch[] = {1, 2, 3, 5, 16, 35};
#define N_SHAPES (int)(sizeof shapes / sizeof shapes[0])
#define N_BATCH (int)(sizeof batch / sizeof batch[0])

static void test_rows(const isa_table *t, int wt, int transposed, int64_t out, int64_t in, int64_t M, int misalign) {
    const rows_fn fn = transposed ? t->rows_t[wt] : t->rows[wt];
    char what[160];
    snprintf(what, sizeof what, "%s[%s] out=%lld in=%lld M=%lld%s", transposed ? "rows_t" : "rows", wname[wt],
             (long long)out, (long long)in, (long long)M, misalign ? " misaligned" : "");
    if (fn == NULL) {
        n_fail++;
        printf("FAIL [%s] %s: NULL in the table\n", isa_name, what);
        return;
    }
    product_case c = make_product(wt, transposed, out, in, M, misalign, wt == W_BF16 && !transposed && t->bf16_dot);
    obuf y = obuf_new(M * out, misalign);
    fn(c.w, c.scale, c.x, y.p, 0, out, in, out, M);
    check(what, y.p, c.ref, M * out, RTOL);
    check_guards(what, &y);
    free(y.base);
    free_product(&c);
}

/* A product split the way the Python module splits it: [o0, o1) in multiples of 16 outputs, on 2 threads
 * (aviary_parallel), or serially in uneven pieces (threads = 0). */
static void test_split(const isa_table *t, int wt, int transposed, int64_t out, int64_t in, int64_t M, int threads) {
    const rows_fn fn = transposed ? t->rows_t[wt] : t->rows[wt];
    if (fn == NULL) return;
    char what[160];
    snprintf(what, sizeof what, "%s[%s] out=%lld in=%lld M=%lld %s", transposed ? "rows_t" : "rows", wname[wt],
             (long long)out, (long long)in, (long long)M,
             threads ? "on 2 threads (aviary_parallel)" : "in pieces of 16k outputs");
    product_case c = make_product(wt, transposed, out, in, M, 0, wt == W_BF16 && !transposed && t->bf16_dot);
    obuf y = obuf_new(M * out, 0);
    linear_args a = {fn, c.w, c.scale, c.x, y.p, in, out, M};
    if (threads) {
        aviary_parallel(aviary_linear_job, &a, out, 16, threads);
    } else { /* pieces [0, 16), [16, 48), [48, ...) in reverse order */
        const int64_t cut[] = {0, 16 < out ? 16 : out, 48 < out ? 48 : out, out};
        for (int i = 2; i >= 0; i--)
            if (cut[i] < cut[i + 1]) aviary_linear_job(&a, cut[i], cut[i + 1]);
    }
    check(what, y.p, c.ref, M * out, RTOL);
    check_guards(what, &y);
    free(y.base);
    free_product(&c);
}

/* ---- WKV steps ----------------------------------------------------------------------------------------- */
typedef struct {
    int64_t B, H, K, V;
} wkv_shape;

static const wkv_shape wkv_shapes[] = {{1, 1, 1, 1}, {2, 3, 16, 16}, {1, 2, 64, 64}, {3, 2, 5, 13}, {1, 1, 3, 1024}};

/* kind 0: gla, 1: delta. inplace: S_out = S_in. */
static void test_wkv(const isa_table *t, int kind, wkv_shape s, int threads, int inplace) {
    const int64_t BH = s.B * s.H, K = s.K, V = s.V;
    char what[160];
    snprintf(what, sizeof what, "%s B=%lld H=%lld K=%lld V=%lld%s%s", kind ? "delta" : "gla", (long long)s.B,
             (long long)s.H, (long long)K, (long long)V, inplace ? " in place" : "",
             threads > 1 ? " on 2 threads (aviary_parallel)" : "");
    float *r = xmalloc((size_t)(BH * K) * sizeof(float)), *k = xmalloc((size_t)(BH * K) * sizeof(float));
    float *lw = xmalloc((size_t)(BH * K) * sizeof(float)), *a = xmalloc((size_t)(BH * K) * sizeof(float));
    float *b = xmalloc((size_t)(BH * K) * sizeof(float)), *u = xmalloc((size_t)(s.H * K) * sizeof(float));
    float *v = xmalloc((size_t)(BH * V) * sizeof(float)), *S = xmalloc((size_t)(BH * K * V) * sizeof(float));
    fill(r, BH * K, -1.0f, 1.0f);
    fill(k, BH * K, -1.0f, 1.0f);
    fill(lw, BH * K, -3.0f, 0.0f);
    fill(a, BH * K, -0.5f, 0.5f);
    fill(b, BH * K, -0.5f, 0.5f);
    fill(u, s.H * K, -1.0f, 1.0f);
    fill(v, BH * V, -1.0f, 1.0f);
    fill(S, BH * K * V, -1.0f, 1.0f);
    double *yref = xmalloc((size_t)(BH * V) * sizeof(double)), *Sref = xmalloc((size_t)(BH * K * V) * sizeof(double));
    double *aS = xmalloc((size_t)V * sizeof(double));
    for (int64_t bh = 0; bh < BH; bh++) {
        const float *rr = r + bh * K, *kk = k + bh * K, *ww = lw + bh * K, *aa = a + bh * K, *bb = b + bh * K;
        const float *uu = u + (bh % s.H) * K, *vv = v + bh * V, *SS = S + bh * K * V;
        double *y = yref + bh * V, *So = Sref + bh * K * V;
        if (kind == 0) {
            double bonus = 0.0;
            for (int64_t i = 0; i < K; i++) bonus += (double)rr[i] * uu[i] * kk[i];
            for (int64_t j = 0; j < V; j++) {
                double acc = bonus * vv[j];
                for (int64_t i = 0; i < K; i++) acc += (double)rr[i] * SS[i * V + j];
                y[j] = acc;
            }
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < V; j++)
                    So[i * V + j] = exp((double)ww[i]) * SS[i * V + j] + (double)kk[i] * vv[j];
        } else {
            for (int64_t j = 0; j < V; j++) {
                aS[j] = 0.0;
                for (int64_t i = 0; i < K; i++) aS[j] += (double)aa[i] * SS[i * V + j];
            }
            for (int64_t j = 0; j < V; j++) y[j] = 0.0;
            for (int64_t i = 0; i < K; i++)
                for (int64_t j = 0; j < V; j++) {
                    const double sj = exp((double)ww[i]) * SS[i * V + j] + (double)bb[i] * aS[j] + (double)kk[i] * vv[j];
                    So[i * V + j] = sj;
                    y[j] += (double)rr[i] * sj;
                }
        }
    }
    obuf y = obuf_new(BH * V, 0), So = obuf_new(BH * K * V, 0);
    if (inplace) memcpy(So.p, S, (size_t)(BH * K * V) * sizeof(float));
    wkv_args args = {.r = r, .k = k, .v = v, .logw = lw, .u = u, .a = a, .b = b, .S_in = inplace ? So.p : S,
                     .S_out = So.p, .y = y.p, .H = s.H, .K = K, .V = V};
    const job_fn job = kind ? t->delta : t->gla;
    if (threads > 1) {
        aviary_parallel(job, &args, BH, 1, threads);
    } else {
        job(&args, 0, BH);
    }
    char w2[200];
    snprintf(w2, sizeof w2, "%s: y", what);
    check(w2, y.p, yref, BH * V, RTOL);
    snprintf(w2, sizeof w2, "%s: S_out", what);
    check(w2, So.p, Sref, BH * K * V, RTOL);
    check_guards(what, &y);
    check_guards(what, &So);
    free(y.base);
    free(So.base);
    free(r), free(k), free(lw), free(a), free(b), free(u), free(v), free(S), free(yref), free(Sref), free(aS);
}

/* ---- the blocks' WKV tails (v6_tail, v7_tail) ---------------------------------------------------------- */
static double sigmoid_d(double x) { return 1.0 / (1.0 + exp(-x)); }

/* GroupNorm of one head's y [N] in place: (y - mean) / sqrt(var + eps) */
static void head_norm_d(double *y, int64_t N, double eps) {
    double m = 0.0, var = 0.0;
    for (int64_t j = 0; j < N; j++) m += y[j];
    m /= (double)N;
    for (int64_t j = 0; j < N; j++) var += (y[j] - m) * (y[j] - m);
    const double rstd = 1.0 / sqrt(var / (double)N + eps);
    for (int64_t j = 0; j < N; j++) y[j] = (y[j] - m) * rstd;
}

typedef struct {
    int64_t B, H, N;
} tail_shape;

static const tail_shape tail_shapes[] = {{1, 1, 4}, {2, 2, 16}, {1, 3, 64}, {2, 1, 7}};

static float *rnd(int64_t n, float lo, float hi) {
    float *p = xmalloc((size_t)(n ? n : 1) * sizeof(float));
    fill(p, n, lo, hi);
    return p;
}

static void test_v6_tail(const isa_table *t, tail_shape s) {
    const int64_t B = s.B, H = s.H, N = s.N, C = H * N, sin = H * N * N + 3, sout = H * N * N + 5;
    char what[160];
    snprintf(what, sizeof what, "v6_tail B=%lld H=%lld N=%lld", (long long)B, (long long)H, (long long)N);
    float *r = rnd(B * C, -1, 1), *k = rnd(B * C, -1, 1), *v = rnd(B * C, -1, 1), *g = rnd(B * C, -1, 1);
    float *wl = rnd(B * C, -1, 1), *decay = rnd(C, -2, 1), *u = rnd(C, -1, 1), *lnw = rnd(C, 0.5f, 1.5f);
    float *lnb = rnd(C, -0.5f, 0.5f), *S = rnd(B * sin, -1, 1);
    const float eps = 64e-5f;
    double *oref = xmalloc((size_t)(B * C) * sizeof(double)), *Sref = xmalloc((size_t)(B * sout) * sizeof(double));
    double *y = xmalloc((size_t)N * sizeof(double));
    for (int64_t i = 0; i < B * sout; i++) Sref[i] = SENTINEL; /* the stride's gaps stay untouched */
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t row = b * C + h * N, ch = h * N;
            const float *SS = S + b * sin + h * N * N;
            double *So = Sref + b * sout + h * N * N, bonus = 0.0;
            for (int64_t i = 0; i < N; i++) bonus += (double)r[row + i] * u[ch + i] * k[row + i];
            for (int64_t j = 0; j < N; j++) y[j] = bonus * v[row + j];
            for (int64_t i = 0; i < N; i++) {
                const double wi = exp(-exp((double)decay[ch + i] + wl[row + i]));
                for (int64_t j = 0; j < N; j++) {
                    y[j] += (double)r[row + i] * SS[i * N + j];
                    So[i * N + j] = wi * SS[i * N + j] + (double)k[row + i] * v[row + j];
                }
            }
            head_norm_d(y, N, eps);
            for (int64_t j = 0; j < N; j++) oref[row + j] = (y[j] * lnw[ch + j] + lnb[ch + j]) * g[row + j];
        }
    obuf out = obuf_new(B * C, 0), So = obuf_new(B * sout, 0);
    v6_args args = {.r = r, .k = k, .v = v, .g = g, .w_lora = wl, .decay = decay, .u = u, .ln_w = lnw, .ln_b = lnb,
                    .S_in = S, .S_out = So.p, .out = out.p, .H = H, .N = N, .S_in_stride = sin,
                    .S_out_stride = sout, .eps = eps};
    t->v6_tail(&args, 0, B * H);
    char w2[200];
    snprintf(w2, sizeof w2, "%s: out", what);
    check(w2, out.p, oref, B * C, RTOL);
    snprintf(w2, sizeof w2, "%s: S_out", what);
    check(w2, So.p, Sref, B * sout, RTOL);
    check_guards(what, &out);
    check_guards(what, &So);
    free(out.base), free(So.base), free(oref), free(Sref), free(y);
    free(r), free(k), free(v), free(g), free(wl), free(decay), free(u), free(lnw), free(lnb), free(S);
}

static void test_v7_tail(const isa_table *t, tail_shape s, int layer0) {
    const int64_t B = s.B, H = s.H, N = s.N, C = H * N, sin = H * N * N + 2, sout = H * N * N + 1;
    char what[160];
    snprintf(what, sizeof what, "v7_tail B=%lld H=%lld N=%lld%s", (long long)B, (long long)H, (long long)N,
             layer0 ? " layer 0" : "");
    float *r = rnd(B * C, -1, 1), *k = rnd(B * C, -1, 1), *v = rnd(B * C, -1, 1), *g = rnd(B * C, -1, 1);
    float *wl = rnd(B * C, -1, 1), *al = rnd(B * C, -1, 1), *vl = rnd(B * C, -1, 1), *vf = rnd(B * C, -1, 1);
    float *w0 = rnd(C, -1, 1), *a0 = rnd(C, -1, 1), *v0 = rnd(C, -1, 1), *kk_ = rnd(C, 0.5f, 1.5f);
    float *ka = rnd(C, 0, 1), *rk = rnd(C, -1, 1), *lnw = rnd(C, 0.5f, 1.5f), *lnb = rnd(C, -0.5f, 0.5f);
    float *S = rnd(B * sin, -1, 1);
    const float eps = 64e-5f, ds = 0.606530660f; /* e^-0.5 */
    const float *vlp = layer0 ? NULL : vl;
    double *oref = xmalloc((size_t)(B * C) * sizeof(double)), *Sref = xmalloc((size_t)(B * sout) * sizeof(double));
    double *vv = xmalloc((size_t)N * 7 * sizeof(double));
    double *dec = vv + N, *kk = vv + 2 * N, *kn = vv + 3 * N, *bb = vv + 4 * N, *aS = vv + 5 * N, *y = vv + 6 * N;
    for (int64_t i = 0; i < B * sout; i++) Sref[i] = SENTINEL;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t row = b * C + h * N, ch = h * N;
            const float *SS = S + b * sin + h * N * N;
            double *So = Sref + b * sout + h * N * N, norm = 0.0, bonus = 0.0;
            for (int64_t i = 0; i < N; i++) {
                const int64_t c = ch + i;
                const double a = sigmoid_d((double)a0[c] + al[row + i]);
                dec[i] = exp(-(double)ds * sigmoid_d((double)w0[c] + wl[row + i]));
                vv[i] = vlp ? v[row + i] + ((double)vf[row + i] - v[row + i]) * sigmoid_d((double)v0[c] + vl[row + i])
                            : v[row + i];
                kk[i] = (double)k[row + i] * kk_[c];
                norm += kk[i] * kk[i];
                kn[i] = k[row + i] * (1.0 + (a - 1.0) * ka[c]);
                bonus += (double)r[row + i] * kn[i] * rk[c];
                bb[i] = a;
            }
            norm = sqrt(norm);
            const double inv = 1.0 / (norm > 1e-12 ? norm : 1e-12);
            for (int64_t i = 0; i < N; i++) {
                kk[i] *= inv;
                bb[i] *= kk[i];
            }
            for (int64_t j = 0; j < N; j++) {
                aS[j] = 0.0;
                for (int64_t i = 0; i < N; i++) aS[j] += -kk[i] * SS[i * N + j];
                y[j] = 0.0;
            }
            for (int64_t i = 0; i < N; i++)
                for (int64_t j = 0; j < N; j++) {
                    const double sj = dec[i] * SS[i * N + j] + bb[i] * aS[j] + kn[i] * vv[j];
                    So[i * N + j] = sj;
                    y[j] += (double)r[row + i] * sj;
                }
            head_norm_d(y, N, eps);
            for (int64_t j = 0; j < N; j++)
                oref[row + j] = (y[j] * lnw[ch + j] + lnb[ch + j] + bonus * vv[j]) * g[row + j];
        }
    obuf out = obuf_new(B * C, 0), So = obuf_new(B * sout, 0);
    v7_args args = {.r = r, .k = k, .v = v, .w_lora = wl, .a_lora = al, .v_lora = vlp, .v_first = vf, .g = g,
                    .w0 = w0, .a0 = a0, .v0 = v0, .k_k = kk_, .k_a = ka, .r_k = rk, .ln_w = lnw, .ln_b = lnb,
                    .S_in = S, .S_out = So.p, .out = out.p, .H = H, .N = N, .S_in_stride = sin,
                    .S_out_stride = sout, .eps = eps, .decay_scale = ds};
    t->v7_tail(&args, 0, B * H);
    char w2[200];
    snprintf(w2, sizeof w2, "%s: out", what);
    check(w2, out.p, oref, B * C, RTOL);
    snprintf(w2, sizeof w2, "%s: S_out", what);
    check(w2, So.p, Sref, B * sout, RTOL);
    check_guards(what, &out);
    check_guards(what, &So);
    free(out.base), free(So.base), free(oref), free(Sref), free(vv);
    free(r), free(k), free(v), free(g), free(wl), free(al), free(vl), free(vf), free(w0), free(a0), free(v0);
    free(kk_), free(ka), free(rk), free(lnw), free(lnb), free(S);
}

/* ---- gates --------------------------------------------------------------------------------------------- */
static void test_gate(const isa_table *t, int64_t n, int times_x, int inplace) {
    char what[160];
    snprintf(what, sizeof what, "gate %s n=%lld%s", times_x ? "silu" : "sigmoid", (long long)n,
             inplace ? " in place" : "");
    float *x = rnd(n, -20.0f, 20.0f);
    obuf out = obuf_new(n, 0);
    if (inplace) memcpy(out.p, x, (size_t)n * sizeof(float));
    t->gate(inplace ? out.p : x, out.p, n, times_x);
    int ok = 1;
    for (int64_t i = 0; i < n && ok; i++) {
        const double s = 1.0 / (1.0 + exp(-(double)x[i])), ref = times_x ? x[i] * s : s;
        const double err = fabs((double)out.p[i] - ref);
        if (!(err <= GATE_RTOL * fabs(ref))) {
            n_fail++;
            ok = 0;
            printf("FAIL [%s] %s: at %lld (x = %.9g) got %.9g want %.9g (rel err %.3g > %.0e)\n", isa_name, what,
                   (long long)i, (double)x[i], (double)out.p[i], ref, err / fabs(ref), GATE_RTOL);
        }
    }
    if (ok) n_pass++;
    check_guards(what, &out);
    free(x);
    free(out.base);
}

/* ---- known values (hand-computed) ---------------------------------------------------------------------- */
static void known_values(const isa_table *t) {
    float y[4];
    { /* float32 [2, 3] . x for 2 rows: [[1,2,3],[4,5,6]] . [1,-1,2] = [5, 11]; . [0.5,0.25,-1] = [-2, -2.75] */
        const float w[6] = {1, 2, 3, 4, 5, 6}, x[6] = {1, -1, 2, 0.5f, 0.25f, -1};
        t->rows[W_F32](w, NULL, x, y, 0, 2, 3, 2, 1);
        expect("f32 2x3 M=1 y[0]", y[0], 5.0, 0);
        expect("f32 2x3 M=1 y[1]", y[1], 11.0, 0);
        t->rows[W_F32](w, NULL, x, y, 0, 2, 3, 2, 2);
        expect("f32 2x3 M=2 y[0,0]", y[0], 5.0, 0);
        expect("f32 2x3 M=2 y[0,1]", y[1], 11.0, 0);
        expect("f32 2x3 M=2 y[1,0]", y[2], -2.0, 0);
        expect("f32 2x3 M=2 y[1,1]", y[3], -2.75, 0);
    }
    { /* int8 [2, 4] with row scales [0.5, 0.25]: [1,-2,3,127].[1,2,3,1] = 133 -> 66.5;
       * [-128,0,5,-1].[1,2,3,1] = -114 -> -28.5 */
        const int8_t w[8] = {1, -2, 3, 127, -128, 0, 5, -1};
        const float scale[2] = {0.5f, 0.25f}, x[4] = {1, 2, 3, 1};
        t->rows[W_I8](w, scale, x, y, 0, 2, 4, 2, 1);
        expect("i8 2x4 scaled y[0]", y[0], 66.5, 0);
        expect("i8 2x4 scaled y[1]", y[1], -28.5, 0);
    }
    { /* bfloat16 [1, 3] = [1.5, -2, 0.25] (0x3FC0, 0xC000, 0x3E80) . [2, 1, 4] = 3 - 2 + 1 = 2 */
        const uint16_t w[3] = {0x3FC0, 0xC000, 0x3E80};
        const float x[3] = {2, 1, 4};
        t->rows[W_BF16](w, NULL, x, y, 0, 1, 3, 1, 1);
        expect("bf16 1x3 (1.5, -2, 0.25) y[0]", y[0], 2.0, 0);
    }
    { /* LoRA [in 2, out 3] = [[1,2,3],[4,5,6]]: [1, -1] . W = [-3, -3, -3] */
        const float w[6] = {1, 2, 3, 4, 5, 6}, x[2] = {1, -1};
        t->rows_t[W_F32](w, NULL, x, y, 0, 3, 2, 3, 1);
        expect("rows_t f32 2x3 y[0]", y[0], -3.0, 0);
        expect("rows_t f32 2x3 y[2]", y[2], -3.0, 0);
        const uint16_t wb[6] = {0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0}; /* 1..6 in bf16 */
        t->rows_t[W_BF16](wb, NULL, x, y, 0, 3, 2, 3, 1);
        expect("rows_t bf16 2x3 y[1]", y[1], -3.0, 0);
    }
    { /* gla, K = V = 1: r 2, k 3, v 4, w = e^0 = 1, u 0.5, S 1: y = 2*1 + 2*0.5*3*4 = 14, S' = 1 + 12 = 13 */
        const float r = 2, k = 3, v = 4, lw = 0, u = 0.5f, S = 1;
        float So, yy;
        wkv_args a = {.r = &r, .k = &k, .v = &v, .logw = &lw, .u = &u, .S_in = &S, .S_out = &So, .y = &yy,
                      .H = 1, .K = 1, .V = 1};
        t->gla(&a, 0, 1);
        expect("gla 1x1 y", yy, 14.0, 0);
        expect("gla 1x1 S'", So, 13.0, 0);
    }
    { /* delta, K = V = 1: a 0.5, S 4 -> aS 2; S' = 1*4 + b 2 * 2 + k 1 * v 3 = 11; y = r 2 * 11 = 22 */
        const float r = 2, k = 1, v = 3, lw = 0, a_ = 0.5f, b = 2, S = 4;
        float So, yy;
        wkv_args a = {.r = &r, .k = &k, .v = &v, .logw = &lw, .a = &a_, .b = &b, .S_in = &S, .S_out = &So, .y = &yy,
                      .H = 1, .K = 1, .V = 1};
        t->delta(&a, 0, 1);
        expect("delta 1x1 y", yy, 22.0, 0);
        expect("delta 1x1 S'", So, 11.0, 0);
    }
    { /* sigmoid(0) = 0.5, silu(0) = 0, sigmoid(ln 3) = 0.75, silu(2) = 2 / (1 + e^-2) */
        const float x[3] = {0.0f, 1.09861229f, 2.0f};
        float o[3];
        t->gate(x, o, 3, 0);
        expect("sigmoid(0)", o[0], 0.5, 1e-7);
        expect("sigmoid(ln 3)", o[1], 0.75, 1e-6);
        t->gate(x, o, 3, 1);
        expect("silu(0)", o[0], 0.0, 0);
        expect("silu(2)", o[2], 1.7615941559557649, 2e-6);
    }
}

static void run_isa(const isa_table *t) {
    isa_name = t->name;
    seed(12345);
    known_values(t);
    for (int wt = 0; wt < 3; wt++)
        for (int s = 0; s < N_SHAPES; s++)
            for (int b = 0; b < N_BATCH; b++) test_rows(t, wt, 0, shapes[s][0], shapes[s][1], batch[b], 0);
    for (int wt = 0; wt < 3; wt++) /* misaligned W, x and y (by one element) */
        for (int s = 0; s < N_SHAPES; s++) test_rows(t, wt, 0, shapes[s][0], shapes[s][1], 3, 1);
    for (int wt = 0; wt < 2; wt++)
        for (int s = 0; s < N_SHAPES; s++) {
            for (int b = 0; b < N_BATCH; b++) test_rows(t, wt, 1, shapes[s][0], shapes[s][1], batch[b], 0);
            test_rows(t, wt, 1, shapes[s][0], shapes[s][1], 3, 1);
        }
    for (int wt = 0; wt < 3; wt++) {
        const int64_t M[] = {1, 5};
        for (int i = 0; i < 2; i++) {
            test_split(t, wt, 0, 130, 768, M[i], 2);
            test_split(t, wt, 0, 257, 300, M[i], 2);
            test_split(t, wt, 0, 130, 100, M[i], 0);
            if (wt < 2) {
                test_split(t, wt, 1, 130, 64, M[i], 2);
                test_split(t, wt, 1, 100, 33, M[i], 0);
            }
        }
    }
    for (int kind = 0; kind < 2; kind++)
        for (size_t s = 0; s < sizeof wkv_shapes / sizeof wkv_shapes[0]; s++) {
            test_wkv(t, kind, wkv_shapes[s], 1, 0);
            test_wkv(t, kind, wkv_shapes[s], 1, 1);
        }
    test_wkv(t, 0, (wkv_shape){4, 4, 32, 32}, 2, 0);
    test_wkv(t, 1, (wkv_shape){4, 4, 32, 32}, 2, 0);
    for (size_t s = 0; s < sizeof tail_shapes / sizeof tail_shapes[0]; s++) {
        test_v6_tail(t, tail_shapes[s]);
        test_v7_tail(t, tail_shapes[s], 1);
        test_v7_tail(t, tail_shapes[s], 0);
    }
    const int64_t gate_n[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1000};
    for (size_t i = 0; i < sizeof gate_n / sizeof gate_n[0]; i++)
        for (int times_x = 0; times_x < 2; times_x++) {
            test_gate(t, gate_n[i], times_x, 0);
            test_gate(t, gate_n[i], times_x, 1);
        }
}

int main(void) {
#if defined(__aarch64__)
    const char *arch = "aarch64";
#elif defined(__x86_64__)
    const char *arch = "x86_64";
#else
    const char *arch = "other";
#endif
    char ran[256] = "", skipped[256] = "";
    const isa_table *runnable[16];
    int n_run = 0;
    for (int i = 0; aviary_isas[i] != NULL && n_run < 16; i++) {
        isa_table *t = aviary_isas[i];
        char item[64];
        if (t->setup()) {
            runnable[n_run++] = t;
            snprintf(item, sizeof item, " %s%s", t->name, t->bf16_dot ? "(bf16_dot)" : "");
            strncat(ran, item, sizeof ran - strlen(ran) - 1);
        } else {
            snprintf(item, sizeof item, " %s", t->name);
            strncat(skipped, item, sizeof skipped - strlen(skipped) - 1);
        }
    }
    printf("selftest: %s; ISAs run:%s; not run (this CPU lacks them):%s\n", arch, n_run ? ran : " none",
           skipped[0] ? skipped : " none");
    fflush(stdout);
    { /* the active table is the first one the CPU runs; find() agrees */
        isa_name = "isa.c";
        aviary_isa_init();
        if (n_run > 0 && aviary_isa == runnable[0] && aviary_isa_find("generic") == &aviary_isa_generic &&
            aviary_isa_find("no such isa") == NULL) {
            n_pass++;
        } else {
            n_fail++;
            printf("FAIL [isa.c] aviary_isa_init chose %s, aviary_isa_find(\"generic\") %s\n",
                   aviary_isa ? aviary_isa->name : "NULL", aviary_isa_find("generic") ? "found" : "NULL");
        }
    }
    for (int i = 0; i < n_run; i++) {
        const int before = n_fail;
        run_isa(runnable[i]);
        fflush(stdout);
        if (n_fail > before) printf("selftest: %s had %d failures\n", runnable[i]->name, n_fail - before);
    }
    printf("selftest: %d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
