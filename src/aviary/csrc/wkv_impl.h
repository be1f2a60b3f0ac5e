/* The one-token WKV steps as plain loops over the head's value channels (contiguous), which the
 * compiler vectorises for the includer's TARGET. The includer defines SFX and TARGET (as for isa_vec.h)
 * and, before including this, the per-channel gates F(v7_gates) and F(decays) (isa_vec.h's, or
 * isa_avx512.c's). Defines F(gla_job), F(delta_job), F(v6_tail_job), F(v7_tail_job); their arguments
 * and formulas are in kernels.h. References: aviary.ops.gla.gla_step, aviary.ops.delta.delta_rule_step,
 * and aviary/model/v5.py ... v7.py (tests/cpu/kernels/test_steps.py compares). */
#include <math.h>

/* One (batch, head) item of the gla step, with its decays wd = exp(logw) given: y [V] and S' [K, V]. */
static inline __attribute__((always_inline)) void F(gla_item)(const float *r, const float *k, const float *v,
                                                             const float *wd, const float *u, const float *S,
                                                             float *So, float *y, int64_t K, int64_t V) {
    float bonus = 0.0f;
    for (int64_t i = 0; i < K; i++) bonus += r[i] * u[i] * k[i];
    for (int64_t j = 0; j < V; j++) y[j] = bonus * v[j];
    for (int64_t i = 0; i < K; i++) {
        const float ri = r[i], wi = wd[i], ki = k[i];
        const float *row = S + i * V;
        float *out = So + i * V;
        for (int64_t j = 0; j < V; j++) {
            const float sj = row[j];
            y[j] += ri * sj;
            out[j] = wi * sj + ki * v[j];
        }
    }
}

TARGET static void F(gla_job)(const void *ctx, int64_t lo, int64_t hi) {
    const wkv_args *p = ctx;
    const int64_t K = p->K, V = p->V;
    float wd[AVIARY_MAX_HEAD];
    for (int64_t bh = lo; bh < hi; bh++) {
        const float *lw = p->logw + bh * K;
        for (int64_t i = 0; i < K; i++) wd[i] = expf(lw[i]);
        F(gla_item)(p->r + bh * K, p->k + bh * K, p->v + bh * V, wd, p->u + (bh % p->H) * K, p->S_in + bh * K * V,
                    p->S_out + bh * K * V, p->y + bh * V, K, V);
    }
}

TARGET static void F(delta_job)(const void *ctx, int64_t lo, int64_t hi) {
    const wkv_args *p = ctx;
    const int64_t K = p->K, V = p->V;
    float aS[AVIARY_MAX_HEAD];
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
                const float sj = wi * row[j] + bi * aS[j] + ki * v[j];
                out[j] = sj;
                y[j] += ri * sj;
            }
        }
    }
}

/* mean and 1 / std of y[0, N) (a head's GroupNorm) */
static inline void F(head_norm)(const float *y, int64_t N, float eps, float *mean, float *rstd) {
    float m = 0.0f, var = 0.0f;
    for (int64_t j = 0; j < N; j++) m += y[j];
    m /= (float)N;
    for (int64_t j = 0; j < N; j++) var += (y[j] - m) * (y[j] - m);
    *mean = m;
    *rstd = 1.0f / sqrtf(var / (float)N + eps);
}

TARGET static void F(v6_tail_job)(const void *ctx, int64_t lo, int64_t hi) {
    const v6_args *p = ctx;
    const int64_t H = p->H, N = p->N, C = H * N;
    float y[AVIARY_MAX_HEAD], wd[AVIARY_MAX_HEAD];
    for (int64_t bh = lo; bh < hi; bh++) {
        const int64_t b = bh / H, h = bh % H, row = b * C + h * N, ch = h * N;
        const float *r = p->r + row, *k = p->k + row, *v = p->v + row, *g = p->g + row, *u = p->u + ch;
        F(decays)(p->decay + ch, p->w_lora + row, wd, N);
        const float *S = p->S_in + b * p->S_in_stride + h * N * N;
        float *So = p->S_out + b * p->S_out_stride + h * N * N, *out = p->out + row;
        F(gla_item)(r, k, v, wd, u, S, So, y, N, N);
        float mean, rstd;
        F(head_norm)(y, N, p->eps, &mean, &rstd);
        for (int64_t j = 0; j < N; j++) out[j] = ((y[j] - mean) * rstd * p->ln_w[ch + j] + p->ln_b[ch + j]) * g[j];
    }
}

TARGET static void F(v7_tail_job)(const void *ctx, int64_t lo, int64_t hi) {
    const v7_args *p = ctx;
    const int64_t H = p->H, N = p->N, C = H * N;
    float vv[AVIARY_MAX_HEAD], dec[AVIARY_MAX_HEAD], kk[AVIARY_MAX_HEAD], kn[AVIARY_MAX_HEAD];
    float bb[AVIARY_MAX_HEAD], aS[AVIARY_MAX_HEAD], y[AVIARY_MAX_HEAD];
    for (int64_t bh = lo; bh < hi; bh++) {
        const int64_t b = bh / H, h = bh % H, row = b * C + h * N, ch = h * N;
        const float *r = p->r + row, *k = p->k + row, *v = p->v + row, *g = p->g + row;
        const float *S = p->S_in + b * p->S_in_stride + h * N * N;
        float *So = p->S_out + b * p->S_out_stride + h * N * N, *out = p->out + row;
        float norm = 0.0f, bonus = 0.0f;
        F(v7_gates)(p->w0 + ch, p->w_lora + row, p->a0 + ch, p->a_lora + row, p->v0 + ch,
                    p->v_lora ? p->v_lora + row : NULL, p->decay_scale, dec, bb, vv, N);
        for (int64_t i = 0; i < N; i++) {
            const int64_t c = ch + i;
            vv[i] = p->v_lora ? v[i] + (p->v_first[row + i] - v[i]) * vv[i] : v[i];
            const float a = bb[i];
            kk[i] = k[i] * p->k_k[c];
            norm += kk[i] * kk[i];
            kn[i] = k[i] * (1.0f + (a - 1.0f) * p->k_a[c]);
            bonus += r[i] * kn[i] * p->r_k[c]; /* bb[i] = a, times kk below once kk is normalised */
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
                const float sj = di * srow[j] + bi * aS[j] + ki * vv[j];
                orow[j] = sj;
                y[j] += ri * sj;
            }
        }
        float mean, rstd;
        F(head_norm)(y, N, p->eps, &mean, &rstd);
        for (int64_t j = 0; j < N; j++) {
            const int64_t c = ch + j;
            out[j] = ((y[j] - mean) * rstd * p->ln_w[c] + p->ln_b[c] + bonus * vv[j]) * g[j];
        }
    }
}
