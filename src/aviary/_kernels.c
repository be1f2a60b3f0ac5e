/* Matrix products for decode: a few rows of x against a large weight matrix, at memory speed.
 *
 *     y[m, o] = scale[o] * sum_i W[o, i] * x[m, i]      W [out, in] float32, bfloat16 or int8 (row scales),
 *                                                       x [M, in] and y [M, out] float32, scale optional
 *
 * A decode step is a chain of such products with M = 1 (or the batch size). torch's kernels for them
 * leave bandwidth unused on the test machine: `aten._weight_int8pack_mm` widens every int8 weight to
 * bf16 and is compute-bound at one row (4-9 GB/s), and oneDNN's bf16 product reads at ~17 GB/s with a
 * fixed cost of ~100 us per call. Here each weight is widened to float32 in SIMD registers, x stays
 * float32, and every weight is read once for all M rows (4x4 register tiles for M > 1).
 *
 * ISA: AVX-512 versions of all three and an AVX2 version of int8; the module picks at import (`ISA`:
 * "avx512", "avx2" or "none"). Where there is no SIMD version, `linear` refuses and Python uses torch
 * (a plain C loop would be slower than torch's kernels). Output rows are split across OpenMP
 * threads; the caller passes the count.
 * torch's wheel ships libgomp.so.1 too and the loader reuses it by soname, so there is one OpenMP
 * runtime and one thread pool in the process.
 *
 * Called from `aviary.kernels` with raw data pointers of contiguous CPU tensors whose dtypes and
 * shapes the Python side has checked: this module trusts its arguments. The references beside it are
 * F.linear and `aviary.quant.int8_linear_reference`; tests/test_kernels.py compares.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };

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

/* 16 weights widened to float32. */
#define LOAD_F32(p) _mm512_loadu_ps(p)
#define LOAD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LOAD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))

/* M == 1: four independent accumulators over 64 weights per iteration (hides the FMA latency).
 * M > 1: tiles of 4 weight rows x 4 rows of x, 16 accumulators; each weight vector is widened once per
 * 4 rows of x. Leftover rows (out % 4, M % 4) take a one-accumulator loop. */
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
            int64_t in16 = in / 16 * 16;                                                                     \
            for (; o + 4 <= o1; o += 4) {                                                                    \
                const WTYPE *w[4] = {W + o * in, W + (o + 1) * in, W + (o + 2) * in, W + (o + 3) * in};      \
                int64_t m = 0;                                                                               \
                for (; m + 4 <= M; m += 4) {                                                                 \
                    const float *xs[4] = {x + m * in, x + (m + 1) * in, x + (m + 2) * in, x + (m + 3) * in}; \
                    __m512 c[4][4];                                                                          \
                    for (int r = 0; r < 4; r++)                                                              \
                        for (int j = 0; j < 4; j++) c[r][j] = _mm512_setzero_ps();                           \
                    for (int64_t i = 0; i < in16; i += 16) {                                                 \
                        __m512 b0 = WLOAD(w[0] + i), b1 = WLOAD(w[1] + i), b2 = WLOAD(w[2] + i),             \
                               b3 = WLOAD(w[3] + i);                                                         \
                        for (int r = 0; r < 4; r++) {                                                        \
                            __m512 a = _mm512_loadu_ps(xs[r] + i);                                           \
                            c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);                                       \
                            c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);                                       \
                            c[r][2] = _mm512_fmadd_ps(a, b2, c[r][2]);                                       \
                            c[r][3] = _mm512_fmadd_ps(a, b3, c[r][3]);                                       \
                        }                                                                                    \
                    }                                                                                        \
                    for (int r = 0; r < 4; r++) {                                                            \
                        for (int j = 0; j < 4; j++) {                                                        \
                            float s = _mm512_reduce_add_ps(c[r][j]);                                         \
                            for (int64_t i = in16; i < in; i++) s += WSCALAR(w[j][i]) * xs[r][i];            \
                            y[(m + r) * out + o + j] = scale ? s * scale[o + j] : s;                         \
                        }                                                                                    \
                    }                                                                                        \
                }                                                                                            \
                for (; m < M; m++) {                                                                         \
                    for (int j = 0; j < 4; j++) {                                                            \
                        float s = NAME##_dot1(w[j], x + m * in, in);                                         \
                        y[m * out + o + j] = scale ? s * scale[o + j] : s;                                   \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
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

static rows_fn kernels[3] = {NULL, NULL, NULL}; /* NULL: no SIMD kernel here; Python uses torch's */
static const char *isa = "none";

static void pick_kernels(void) {
#ifdef AVIARY_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        kernels[W_F32] = f32_rows_avx512;
        kernels[W_BF16] = bf16_rows_avx512;
        kernels[W_I8] = i8_rows_avx512;
        isa = "avx512";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        kernels[W_I8] = i8_rows_avx2;
        isa = "avx2";
    }
#endif
}

static PyObject *linear(PyObject *self, PyObject *args) {
    unsigned long long pw, ps, px, py;
    long long in, out, M;
    int threads, wtype;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKKLLLii", &pw, &ps, &px, &py, &in, &out, &M, &threads, &wtype)) {
        return NULL;
    }
    if (wtype < 0 || wtype > 2 || in < 0 || out < 0 || M < 0) {
        PyErr_SetString(PyExc_ValueError, "linear: bad weight type or size");
        return NULL;
    }
    rows_fn fn = kernels[wtype];
    if (fn == NULL) {
        PyErr_Format(PyExc_RuntimeError, "linear: no kernel for weight type %d on this CPU (ISA %s)", wtype, isa);
        return NULL;
    }
    const void *w = (const void *)(uintptr_t)pw;
    const float *scale = (const float *)(uintptr_t)ps; /* 0: no scale */
    const float *x = (const float *)(uintptr_t)px;
    float *y = (float *)(uintptr_t)py;
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
    if (threads > 1 && out >= 64) {
#pragma omp parallel num_threads(threads)
        {
            int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
            int64_t chunk = ((out + n - 1) / n + 15) / 16 * 16; /* whole 16-row blocks per thread */
            int64_t o0 = t * chunk, o1 = o0 + chunk < out ? o0 + chunk : out;
            if (o0 < o1) {
                fn(w, scale, x, y, o0, o1, in, out, M);
            }
        }
    } else {
        fn(w, scale, x, y, 0, out, in, out, M);
    }
#else
    (void)threads;
    fn(w, scale, x, y, 0, out, in, out, M);
#endif
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", linear, METH_VARARGS,
     "linear(w_ptr, scale_ptr_or_0, x_ptr, y_ptr, in, out, M, threads, wtype): y[M, out] = x W^T (* scale);\n"
     "wtype 0 = float32, 1 = bfloat16, 2 = int8. Raw pointers to contiguous CPU buffers."},
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
    if (PyModule_AddStringConstant(mod, "ISA", isa) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
