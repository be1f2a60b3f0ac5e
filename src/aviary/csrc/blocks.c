/* Whole one-token blocks of RWKV-4, 5, 6 and 7: Block.forward (aviary/model/rwkv.py) with each
 * version's mixers for one token. Between the products there is nothing but a few loops over C numbers,
 * so the ~30-100 torch ops and ~7-17 products of a layer become 4-8 parallel jobs of products (run by
 * the active ISA's kernels) and some plain loops. module.c runs all the model's blocks in one call. */
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

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
 * tests/cpu/kernels/test_blocks.py compares. */
#define FIELD_NAME(name) #name,
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
    a->p[a->n++] = (product_t){(input_major ? aviary_isa->rows_t : aviary_isa->rows)[wtype], w, scale, x, y, in, out, wtype};
}

/* Run the products, on `threads` threads when they read at least min_bytes of weights (times rows). */
static void run_products(products_t *a, int threads, int64_t min_bytes) {
    int64_t bytes = 0;
    a->start[0] = 0;
    for (int i = 0; i < a->n; i++) {
        a->start[i + 1] = a->start[i] + (a->p[i].out + 15) / 16;
        bytes += a->p[i].in * a->p[i].out * aviary_wsize[a->p[i].wtype];
    }
    aviary_parallel(products_job, a, a->start[a->n], 1, bytes * a->M >= min_bytes ? threads : 1);
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
    aviary_parallel(aviary_isa->v7_tail, &tail, B * d->H, 1, B * C * (C / d->H) >= d->step_min_numel ? d->threads : 1);

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
    aviary_isa->gate(rf, rf, BC, 0);
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
        const char *w2 = (const char *)W(maa_w2) + f * D * C * aviary_wsize[d->lora_wtype];
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
    aviary_isa->gate(g, g, BC, 1); /* silu */
    add_product(&job, d->lora_wtype, 1, W(decay_w2), NULL, hd, wl, Dd, C);
    run_products(&job, d->threads, d->min_bytes);

    v6_args tail = {r, k, v, g, wl, P(decay), P(faaaa), P(ln_x_w), P(ln_x_b), P(wkv_in), (float *)q[V6F_wkv_out], yg,
                    d->H, C / d->H, d->wkv_in, d->wkv_out, d->eps[2]};
    aviary_parallel(aviary_isa->v6_tail, &tail, B * d->H, 1, B * C * (C / d->H) >= d->step_min_numel ? d->threads : 1);
    add_product(&job, d->wtype[4], 0, W(output), P(output_scale), yg, x1, C, C);
    run_products(&job, d->threads, d->min_bytes);

    const gated_cmix cm = {P(ln2_w), P(ln2_b), P(ffn_maa_k), P(ffn_maa_r), P(ffn_key_scale), P(ffn_receptance_scale),
                           P(ffn_value_scale), W(ffn_key), W(ffn_receptance), W(ffn_value), d->wtype[5], d->wtype[6],
                           d->wtype[7], 1};
    gated_channel_mix(d, &cm, x_in, xa, shift_in, shift_out, x1, cmix, x_out);
#undef P
#undef W
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
    aviary_isa->gate(g, g, BC, 1); /* silu */
    for (int64_t i = 0; i < BC; i++) zero[i] = 0.0f; /* RWKV-5's decay has no data-dependent part */
    v6_args tail = {r, k, v, g, zero, P(decay), P(faaaa), P(ln_x_w), P(ln_x_b), P(wkv_in), (float *)q[V5F_wkv_out], yg,
                    d->H, C / d->H, d->wkv_in, d->wkv_out, d->eps[2]};
    aviary_parallel(aviary_isa->v6_tail, &tail, B * d->H, 1, B * C * (C / d->H) >= d->step_min_numel ? d->threads : 1);
    add_product(&job, d->wtype[4], 0, W(output), P(output_scale), yg, x1, C, C);
    run_products(&job, d->threads, d->min_bytes);

    const gated_cmix cm = {P(ln2_w), P(ln2_b), P(ffn_mix_k), P(ffn_mix_r), P(ffn_key_scale), P(ffn_receptance_scale),
                           P(ffn_value_scale), W(ffn_key), W(ffn_receptance), W(ffn_value), d->wtype[5], d->wtype[6],
                           d->wtype[7], 0};
    gated_channel_mix(d, &cm, x_in, xa, shift_in, shift_out, x1, x1 + BC, x_out);
#undef P
#undef W
}


const block_kind aviary_v4_block = {4, v4_block_fields, V4F_COUNT, 7, v4_scratch, v4_block_run};
const block_kind aviary_v5_block = {5, v5_block_fields, V5F_COUNT, 8, v5_scratch, v5_block_run};
const block_kind aviary_v6_block = {6, v6_block_fields, V6F_COUNT, 8, v6_scratch, v6_block_run};
const block_kind aviary_v7_block = {7, v7_block_fields, V7F_COUNT, 6, v7_scratch, v7_block_run};
