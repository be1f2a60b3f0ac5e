/* The Python module `aviary._kernels`: argument parsing and the GIL around the numeric core (the other
 * files of csrc/, which never include Python.h). Called from `aviary.cpu` with raw data pointers of
 * contiguous CPU tensors whose dtypes and shapes the Python side has checked: this module trusts them. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "kernels.h"

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
    rows_fn fn = (input_major ? aviary_isa->rows_t : aviary_isa->rows)[wtype];
    if (fn == NULL) {
        PyErr_Format(PyExc_RuntimeError, "linear: no %s kernel for weight type %d on this CPU (ISA %s)",
                     input_major ? "input-major" : "output-major", wtype, aviary_isa->name);
        return NULL;
    }
    const char *w = (const char *)(uintptr_t)pw;
    const float *scale = (const float *)(uintptr_t)ps; /* 0: no scale */
    const float *x = (const float *)(uintptr_t)px;
    float *y = (float *)(uintptr_t)py;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t b = 0; b < batch; b++) { /* batch: [batch, M, in] x [batch, W] -> [batch, M, out] */
        const char *wb = w + b * in * out * aviary_wsize[wtype];
        const float *xb = x + b * M * in, *sb = scale ? scale + b * out : NULL;
        float *yb = y + b * M * out;
        linear_args a = {fn, wb, sb, xb, yb, in, out, M};
        aviary_parallel(aviary_linear_job, &a, out, 16, out >= 64 ? threads : 1); /* whole 16-row blocks per thread */
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- one-token WKV steps ----------------------------------------------------------------------------
 * The state update of a decode step with the state read once and written once (the torch forms in
 * aviary/ops read and write it several times); formulas in kernels.h, code in wkv_impl.h. */
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
    if (kind < 0 || kind > 1 || BH < 0 || H <= 0 || K < 0 || V < 0 || K > AVIARY_MAX_HEAD || V > AVIARY_MAX_HEAD) {
        PyErr_SetString(PyExc_ValueError, "wkv_step: bad kind or size (head sizes up to 1024)");
        return NULL;
    }
#define PTR(p) ((const float *)(uintptr_t)(p))
    wkv_args a = {PTR(pr), PTR(pk), PTR(pv), PTR(pw), kind == 0 ? PTR(pu) : NULL, kind == 1 ? PTR(pu) : NULL,
                  PTR(pb), PTR(psi), (float *)(uintptr_t)pso, (float *)(uintptr_t)py, H, K, V};
#undef PTR
    Py_BEGIN_ALLOW_THREADS
    aviary_parallel(kind == 0 ? aviary_isa->gla : aviary_isa->delta, &a, BH, 1, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
    aviary_parallel(aviary_isa->v7_tail, &a, B * H, 1, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}


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
        if (t < 0 || t > (lora ? 1 : 2) || (lora ? aviary_isa->rows_t : aviary_isa->rows)[t] == NULL) {
            PyErr_Format(PyExc_RuntimeError, "blocks: no %s kernel for weight type %ld on this CPU (ISA %s)",
                         lora ? "LoRA" : "product", t, aviary_isa->name);
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


/* (layers, threads, min_bytes, step_min_numel): parse every layer, then run them one after another with
 * the GIL released, so no Python runs between them: between two calls the ~47 MB of weights a layer
 * streams (L12-D768 fp32) have pushed Python's own data out of the caches, and Python run there is several
 * times slower (docs/benchmarks.md, Inference item 7). The caller chains them (layer i's x_out is layer
 * i+1's x_in). scratch_per_row: the floats a block needs per row of x. */
static PyObject *run_blocks(PyObject *args, const block_kind *kind) {
    const int n_fields = kind->n_fields, n_mats = kind->n_mats;
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
        size_t need = (size_t)d->B * (size_t)kind->scratch_per_row(d);
        if (need > floats) floats = need;
    }
    float *scratch = malloc(floats * sizeof(float) + 64);
    if (scratch == NULL) {
        free(L);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) kind->run(L[i].q, &L[i].d, scratch);
    Py_END_ALLOW_THREADS
    free(scratch);
    free(L);
    Py_RETURN_NONE;
}



/* blocks(version, layers, threads, min_bytes, step_min_numel) */
static PyObject *blocks(PyObject *self, PyObject *args) {
    (void)self;
    static const block_kind *const kinds[] = {&aviary_v4_block, &aviary_v5_block, &aviary_v6_block, &aviary_v7_block};
    if (PyTuple_GET_SIZE(args) < 1) {
        PyErr_SetString(PyExc_TypeError, "blocks: (version, layers, threads, min_bytes, step_min_numel)");
        return NULL;
    }
    const long version = PyLong_AsLong(PyTuple_GET_ITEM(args, 0));
    if (PyErr_Occurred()) return NULL;
    if (version < 4 || version > 7) {
        PyErr_Format(PyExc_ValueError, "blocks: no C block for RWKV-%ld", version);
        return NULL;
    }
    PyObject *rest = PyTuple_GetSlice(args, 1, PyTuple_GET_SIZE(args));
    if (rest == NULL) return NULL;
    PyObject *done = run_blocks(rest, kinds[version - 4]);
    Py_DECREF(rest);
    return done;
}

/* isa() -> (name, bf16_dot): the instruction set in use. */
static PyObject *isa(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return Py_BuildValue("(si)", aviary_isa->name, aviary_isa->bf16_dot);
}

/* use_isa(name) -> the previous name. */
static PyObject *use_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const isa_table *t = aviary_isa_find(name);
    if (t == NULL) {
        PyErr_Format(PyExc_ValueError, "this CPU or build cannot run the '%s' kernels", name);
        return NULL;
    }
    PyObject *before = PyUnicode_FromString(aviary_isa->name);
    aviary_isa = t;
    return before;
}

static PyMethodDef methods[] = {
    {"isa", isa, METH_NOARGS, "isa() -> (name, bf16_dot): the instruction set the kernels use now, and whether its\n"
     "bfloat16 products round x to bfloat16 (a bf16 dot-product instruction)."},
    {"use_isa", use_isa, METH_VARARGS, "use_isa(name) -> previous name: run every kernel with that instruction set's\n"
     "code from now on (one of RUNNABLE); process-wide."},
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
    {"blocks", blocks, METH_VARARGS,
     "blocks(version, layers, threads, min_bytes, step_min_numel): one-token blocks of RWKV-`version`, one\n"
     "after another; each layer is (pointers in the order of BLOCK_FIELDS[version], (B, C, H, F, 4 LoRA ranks),\n"
     "(BLOCK_PRODUCTS[version] product wtypes, LoRA wtype), (shift_in, shift_out, wkv_in, wkv_out row strides),\n"
     "(ln1_eps, ln2_eps, ln_x_eps, the version's constant), layer0). RWKV-4: H = C and the state row is [3, C]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Aviary's CPU decode kernels.", -1,
                                    methods, NULL, NULL, NULL, NULL};

/* A tuple of str from n C strings. */
static PyObject *str_tuple(const char *const *names, int n) {
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t != NULL && i < n; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (s == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

PyMODINIT_FUNC PyInit__kernels(void) {
    aviary_isa_init();
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    const char *built[8], *runnable[8];
    int n_built = 0, n_runnable = 0;
    for (int i = 0; aviary_isas[i] != NULL; i++) {
        built[n_built++] = aviary_isas[i]->name;
        if (aviary_isas[i]->setup()) runnable[n_runnable++] = aviary_isas[i]->name;
    }
    static const block_kind *const kinds[] = {&aviary_v4_block, &aviary_v5_block, &aviary_v6_block, &aviary_v7_block};
    PyObject *fields = PyDict_New(), *mats = PyDict_New();
    for (int i = 0; fields != NULL && mats != NULL && i < 4; i++) {
        PyObject *t = str_tuple(kinds[i]->fields, kinds[i]->n_fields), *key = PyLong_FromLong(kinds[i]->version);
        PyObject *n = PyLong_FromLong(kinds[i]->n_mats);
        const int bad = t == NULL || key == NULL || n == NULL || PyDict_SetItem(fields, key, t) < 0 ||
                        PyDict_SetItem(mats, key, n) < 0;
        Py_XDECREF(t);
        Py_XDECREF(key);
        Py_XDECREF(n);
        if (bad) Py_CLEAR(fields);
    }
    if (fields == NULL || mats == NULL || PyModule_AddObject(mod, "BLOCK_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_XDECREF(mats);
        Py_DECREF(mod);
        return NULL;
    }
    if (PyModule_AddObject(mod, "BLOCK_PRODUCTS", mats) < 0) {
        Py_DECREF(mats);
        Py_DECREF(mod);
        return NULL;
    }
    PyObject *b = str_tuple(built, n_built), *r = str_tuple(runnable, n_runnable);
    if (b == NULL || r == NULL || PyModule_AddObject(mod, "BUILT", b) < 0) {
        Py_XDECREF(b);
        Py_XDECREF(r);
        Py_DECREF(mod);
        return NULL;
    }
    if (PyModule_AddObject(mod, "RUNNABLE", r) < 0) {
        Py_DECREF(r);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
