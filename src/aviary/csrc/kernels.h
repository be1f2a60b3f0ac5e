/* Aviary's CPU decode kernels: the numeric core, free of Python (module.c is the only file that
 * includes Python.h), so it also builds alone (scripts/check_c_core.sh builds it with tests/csrc/selftest.c,
 * natively and cross-compiled for aarch64 under qemu).
 *
 * Files, by concern:
 *   kernels.h        this header: weight types, the per-ISA table, the WKV jobs' arguments
 *   isa.c            the ISA tables this build has, which of them the CPU runs, the active one
 *   isa_avx512.c     products with AVX-512 intrinsics (and the bf16 dot-product instruction)
 *   isa_avx2.c       isa_vec.h's kernels compiled for AVX2 + FMA
 *   isa_generic.c    isa_vec.h's kernels for the compiler's baseline (SSE2 on x86-64, NEON on aarch64)
 *   isa_vec.h        products and gates written with GCC/Clang vector types, no intrinsics
 *   wkv_impl.h       the one-token WKV steps (plain loops the compiler vectorises), included per ISA
 *   threads.c        the worker pool that splits a job over threads
 *   blocks.c         whole one-token blocks of RWKV-4/5/6/7 (the decode step's C path)
 *   module.c         the Python module `aviary._kernels`
 *
 * A product: y[m, o] = scale[o] * sum_i W[o, i] * x[m, i]  (W [out, in] float32, bfloat16 or int8 with
 * row scales; x [M, in] and y [M, out] float32), or, for the LoRA matrices stored [in, out],
 * y[m, o] = sum_i x[m, i] W[i, o]. Everything computes in float32. */
#ifndef AVIARY_KERNELS_H
#define AVIARY_KERNELS_H

#include <stdint.h>
#include <string.h>

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };
extern const int64_t aviary_wsize[3]; /* bytes per weight */

/* Outputs [o0, o1) of a product for all M rows of x (a thread's share of it). scale: int8 row scales or NULL. */
typedef void (*rows_fn)(const void *w, const float *scale, const float *x, float *y, int64_t o0, int64_t o1,
                        int64_t in, int64_t out, int64_t M);
/* A parallel job's share [lo, hi) of its items; ctx: the job's arguments. */
typedef void (*job_fn)(const void *ctx, int64_t lo, int64_t hi);

/* Everything that differs between instruction sets. */
typedef struct {
    const char *name;          /* "avx512", "avx2", "generic" */
    rows_fn rows[3];           /* W [out, in], by weight type */
    rows_fn rows_t[3];         /* W [in, out]: float32 and bfloat16 (NULL for int8) */
    int bf16_dot;              /* rows[W_BF16] rounds x to bfloat16 first (a bf16 dot-product instruction) */
    job_fn gla, delta;         /* one-token WKV steps (wkv_args) */
    job_fn v6_tail, v7_tail;   /* the blocks' WKV steps with their gates and GroupNorm (v6_args, v7_args) */
    /* out = sigmoid(x), or x sigmoid(x) (silu) when times_x; out may be x */
    void (*gate)(const float *x, float *out, int64_t n, int times_x);
    int (*setup)(void);        /* 0 if this CPU lacks the instructions; else fills what depends on the CPU */
} isa_table;

/* The tables this build has, best first, NULL-terminated; the active one (never NULL once
 * aviary_isa_init has run). */
extern isa_table *const aviary_isas[];
extern const isa_table *aviary_isa;
void aviary_isa_init(void);                           /* the best one the CPU runs */
const isa_table *aviary_isa_find(const char *name);   /* NULL: not built, or the CPU cannot run it */

extern isa_table aviary_isa_generic;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AVIARY_X86 1
extern isa_table aviary_isa_avx2, aviary_isa_avx512;
#endif

static inline float aviary_bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ---- the one-token WKV steps (wkv_impl.h) ----------------------------------------------------------
 *   gla:   y[v] = sum_k r[k] S[k, v] + (sum_k r[k] u[k] k[k]) v[v]          (u: the per-head bonus)
 *          S'[k, v] = exp(logw[k]) S[k, v] + k[k] v[v]
 *   delta: aS[v] = sum_k a[k] S[k, v]
 *          S'[k, v] = exp(logw[k]) S[k, v] + b[k] aS[v] + k[k] v[v];   y[v] = sum_k r[k] S'[k, v]
 * per (batch, head) item; S [K, V] per item, contiguous; S_out may be S_in. V <= AVIARY_MAX_HEAD. */
#define AVIARY_MAX_HEAD 1024
typedef struct {
    const float *r, *k, *v, *logw, *u, *a, *b, *S_in;
    float *S_out, *y;
    int64_t H, K, V;
} wkv_args;

/* RWKV-5/6 in a block: per (batch row, head), the gla step with decay exp(-exp(decay + w_lora)), then the
 * head's GroupNorm times the gate: out = GroupNorm(y) * g. State rows strided over the batch. */
typedef struct {
    const float *r, *k, *v, *g, *w_lora, *decay, *u, *ln_w, *ln_b, *S_in;
    float *S_out, *out;
    int64_t H, N, S_in_stride, S_out_stride;
    float eps;
} v6_args;

/* RWKV-7's time-mix between its products and its output projection, per (batch row, head); C = H*N:
 *   v     = v + (v_first - v) * sigmoid(v0 + v_lora)           (layers >= 1; v_lora = NULL on layer 0)
 *   a     = sigmoid(a0 + a_lora);   decay = exp(-decay_scale * sigmoid(w0 + w_lora))
 *   kk    = normalize_head(k * k_k);   k' = k * (1 + (a - 1) * k_a)
 *   S'    = diag(decay) S + (kk * a) (-kk^T S) + k' v^T          (the delta step with a_op = -kk, b_op = kk a)
 *   y     = GroupNorm_head(S'^T r; ln_w, ln_b, eps) + (sum_head r * k' * r_k) v
 *   out   = y * g                                               (the output projection's input) */
typedef struct {
    const float *r, *k, *v, *w_lora, *a_lora, *v_lora, *v_first, *g;
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *ln_w, *ln_b, *S_in;
    float *S_out, *out;
    int64_t H, N, S_in_stride, S_out_stride; /* floats from one batch row's state to the next */
    float eps, decay_scale;
} v7_args;

/* One product as a parallel job: aviary_linear_job(ctx, o0, o1) computes outputs [o0, o1) (isa.c). */
typedef struct {
    rows_fn fn;
    const void *w;
    const float *scale, *x;
    float *y;
    int64_t in, out, M;
} linear_args;
void aviary_linear_job(const void *ctx, int64_t o0, int64_t o1);

/* ---- threads (threads.c) ---------------------------------------------------------------------------- */
/* Run job(ctx, 0, n) on up to `threads` threads, in chunks that are multiples of `align`. */
void aviary_parallel(job_fn job, const void *ctx, int64_t n, int64_t align, int threads);

/* ---- products run as one job (blocks.c) ------------------------------------------------------------- */
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

/* ---- whole blocks (blocks.c) ------------------------------------------------------------------------ */
typedef struct {
    int64_t B, C, H, F, rank[4];                  /* rows, channels, heads, channel-mix width, LoRA ranks */
    int wtype[8], lora_wtype;                     /* each product's weight type, the LoRAs' */
    int64_t shift_in, shift_out, wkv_in, wkv_out; /* row strides in floats */
    float eps[4];                                 /* ln1, ln2, ln_x eps, and one constant of the version */
    int threads, layer0;
    int64_t min_bytes, step_min_numel;            /* thresholds for using the threads (kernels.py) */
} block_dims;

typedef void (*block_fn)(const uintptr_t *q, const block_dims *d, float *scratch);

/* One version's block: its pointer fields (names, in order), its products, the scratch floats it needs
 * per row of x, and the function that runs one block. */
typedef struct {
    int version;
    const char *const *fields;
    int n_fields, n_mats;
    int64_t (*scratch_per_row)(const block_dims *);
    block_fn run;
} block_kind;

extern const block_kind aviary_v4_block, aviary_v5_block, aviary_v6_block, aviary_v7_block;

#endif
