/* The World tokenizer's hot loops in C: greedy longest match over UTF-8 bytes, and id -> bytes.
 *
 * The trie is stored as a double array: a transition from state s on byte c goes to t = base[s] + c
 * and exists iff check[t] == s. Walking a token is one add, one load and one compare per byte, in one
 * 8-byte slot that also says whether t ends a token; the token's id is looked up once, at the end. The
 * walk table of the World vocabulary (121k states) is under 1 MB and stays in cache.
 *
 * Encoding is the reference algorithm (rwkv pip package, rwkv_tokenizer.py TRIE_TOKENIZER): from the
 * current position walk the trie as far as the bytes allow, remember the last state that ends a token,
 * emit that token and restart after it. Encoding runs without the GIL; Python ints for every id are
 * created once, so building the result list is a reference-count increment per token.
 *
 * Python wrapper and documentation: world.py. Reference implementation in Python: world.py PythonTrie.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t base;   /* children of this state live at base + byte */
    int32_t check;  /* the parent state; -1 for a free slot */
    int32_t id;     /* token id ending here, -1 if none */
} DANode;

/* What encoding reads: the double array of the builder, base and "ends a token" packed in one word. */
typedef struct {
    int32_t base_end;  /* base << 1 | (this state ends a token) */
    int32_t check;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    int32_t *slot_token;     /* token id ending at each slot, -1 if none */
    Py_ssize_t da_size;      /* slots allocated; every base + 255 is inside */
    Py_ssize_t n_states;     /* records in use */
    Py_ssize_t n_ids;        /* ids 0 .. n_ids-1; some may be missing */
    int64_t *tok_off;        /* byte offset of each id's bytes in blob */
    int32_t *tok_len;        /* byte length of each id, -1 if the id is not in the vocabulary */
    char *blob;
    PyObject **ints;         /* a Python int for every token's id (NULL for gaps): lists without allocating */
    Py_ssize_t max_id;       /* largest id present */
    int max_token_len;
} TrieObject;

/* ---------------------------------------------------------------------------------------------- */
/* Building the double array                                                                       */

typedef struct {
    const unsigned char *p;
    int32_t len;
    int32_t id;
} Key;

typedef struct {
    DANode *da;
    Py_ssize_t size;
    Py_ssize_t used_max;      /* highest slot in use + 1 */
    Py_ssize_t first_free;    /* every slot below this is used */
    const Key *keys;
    int32_t *work;            /* per depth: child bytes and range starts, 2 * 257 ints */
} Builder;

static int key_cmp(const void *a, const void *b)
{
    const Key *x = a, *y = b;
    int32_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->p, y->p, (size_t)n);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : (x->id > y->id);  /* equal bytes: ascending id, the last one wins */
}

static int builder_grow(Builder *b, Py_ssize_t need)
{
    if (need <= b->size) return 0;
    Py_ssize_t size = b->size;
    while (size < need) size *= 2;
    DANode *da = PyMem_Realloc(b->da, (size_t)size * sizeof(DANode));
    if (!da) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = b->size; i < size; i++) { da[i].base = 0; da[i].check = -1; da[i].id = -1; }
    b->da = da;
    b->size = size;
    return 0;
}

/* Keys [lo, hi) share their first `depth` bytes, the path to state s. Place s's children, recurse. */
static int build_state(Builder *b, int32_t s, Py_ssize_t lo, Py_ssize_t hi, int depth)
{
    const Key *keys = b->keys;
    Py_ssize_t i = lo;
    while (i < hi && keys[i].len == depth) {   /* the token spelled by the path itself */
        b->da[s].id = keys[i].id;
        i++;
    }
    if (i == hi) return 0;

    int32_t *bytes = b->work + (Py_ssize_t)depth * 514, *start = bytes + 257;
    int n = 0;
    for (; i < hi; i++) {
        int c = keys[i].p[depth];
        if (n == 0 || bytes[n - 1] != c) { bytes[n] = c; start[n] = (int32_t)i; n++; }
    }
    start[n] = (int32_t)hi;

    /* first fit: the lowest base >= 1 whose slots base + c are all free */
    Py_ssize_t pos = b->first_free, base;
    for (;; pos++) {
        base = pos - bytes[0];
        if (base < 1) continue;
        if (builder_grow(b, base + 256 + 1) < 0) return -1;
        if (b->da[pos].check != -1) continue;
        int ok = 1;
        for (int j = 1; j < n && ok; j++) ok = b->da[base + bytes[j]].check == -1;
        if (ok) break;
    }
    b->da[s].base = (int32_t)base;
    for (int j = 0; j < n; j++) b->da[base + bytes[j]].check = s;
    if (base + bytes[n - 1] + 1 > b->used_max) b->used_max = base + bytes[n - 1] + 1;
    while (b->first_free < b->size && b->da[b->first_free].check != -1) b->first_free++;

    for (int j = 0; j < n; j++)  /* deeper calls use their own rows of work, so bytes/start survive */
        if (build_state(b, (int32_t)(base + bytes[j]), start[j], start[j + 1], depth + 1) < 0) return -1;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */

static void Trie_dealloc(TrieObject *self)
{
    if (self->ints) {
        for (Py_ssize_t i = 0; i < self->n_ids; i++) Py_XDECREF(self->ints[i]);
        PyMem_Free(self->ints);
    }
    PyMem_Free(self->slots);
    PyMem_Free(self->slot_token);
    PyMem_Free(self->tok_off);
    PyMem_Free(self->tok_len);
    PyMem_Free(self->blob);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int trie_fill(TrieObject *self, PyObject *tokens);

/* Trie(tokens): tokens[i] is the bytes of id i, or None where id i is not a token. Empty bytes
 * decode to nothing and are never produced by encode (the end-of-document id 0). */
static int Trie_init(TrieObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", NULL};
    PyObject *list;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!", kwlist, &PyList_Type, &list)) return -1;
    if (self->slots || self->tok_off) { PyErr_SetString(PyExc_RuntimeError, "Trie is already initialised"); return -1; }
    PyObject *tokens = PyList_AsTuple(list);  /* a snapshot nothing can change while we read it */
    if (!tokens) return -1;
    int rc = trie_fill(self, tokens);
    Py_DECREF(tokens);
    return rc;
}

/* Copy the tokens into one buffer, check them, build the double array and the walk table. */
static int trie_fill(TrieObject *self, PyObject *tokens)
{
    Py_ssize_t n_ids = PyTuple_GET_SIZE(tokens), total = 0, n_keys = 0;
    if (n_ids > INT32_MAX) { PyErr_SetString(PyExc_ValueError, "too many token ids"); return -1; }
    for (Py_ssize_t i = 0; i < n_ids; i++) {
        PyObject *t = PyTuple_GET_ITEM(tokens, i);
        if (t == Py_None) continue;
        if (!PyBytes_Check(t)) {
            PyErr_Format(PyExc_TypeError, "token %zd must be bytes or None, not %.100s", i, Py_TYPE(t)->tp_name);
            return -1;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(t);
        if (len > 4096) {
            PyErr_Format(PyExc_ValueError, "token %zd is %zd bytes long (at most 4096)", i, len);
            return -1;
        }
        total += len;
        n_keys += len > 0;
    }

    self->n_ids = n_ids;
    self->tok_off = PyMem_Malloc((size_t)(n_ids ? n_ids : 1) * sizeof(int64_t));
    self->tok_len = PyMem_Malloc((size_t)(n_ids ? n_ids : 1) * sizeof(int32_t));
    self->blob = PyMem_Malloc((size_t)(total ? total : 1));
    self->ints = PyMem_Calloc((size_t)(n_ids ? n_ids : 1), sizeof(PyObject *));
    Key *keys = PyMem_Malloc((size_t)(n_keys ? n_keys : 1) * sizeof(Key));
    if (!self->tok_off || !self->tok_len || !self->blob || !self->ints || !keys) {
        PyMem_Free(keys);
        PyErr_NoMemory();
        return -1;
    }
    int have_byte[256] = {0};
    Py_ssize_t off = 0, k = 0;
    self->max_id = -1;
    self->max_token_len = 0;
    for (Py_ssize_t i = 0; i < n_ids; i++) {
        PyObject *t = PyTuple_GET_ITEM(tokens, i);
        if (t == Py_None) { self->tok_len[i] = -1; self->tok_off[i] = 0; continue; }  /* a gap: no int */
        self->ints[i] = PyLong_FromSsize_t(i);
        if (!self->ints[i]) { PyMem_Free(keys); return -1; }
        Py_ssize_t len = PyBytes_GET_SIZE(t);
        memcpy(self->blob + off, PyBytes_AS_STRING(t), (size_t)len);
        self->tok_off[i] = off;
        self->tok_len[i] = (int32_t)len;
        self->max_id = i;
        if (len > self->max_token_len) self->max_token_len = (int)len;
        if (len == 1) have_byte[(unsigned char)self->blob[off]] = 1;
        if (len > 0) {
            keys[k].p = (const unsigned char *)self->blob + off;
            keys[k].len = (int32_t)len;
            keys[k].id = (int32_t)i;
            k++;
        }
        off += len;
    }
    for (int c = 0; c < 256; c++) {
        if (!have_byte[c]) {
            PyMem_Free(keys);
            PyErr_Format(PyExc_ValueError, "the vocabulary has no token for the single byte 0x%02x "
                         "(greedy matching needs all 256)", c);
            return -1;
        }
    }
    qsort(keys, (size_t)n_keys, sizeof(Key), key_cmp);

    Builder b = {0};
    b.size = 1024;
    b.da = PyMem_Malloc((size_t)b.size * sizeof(DANode));
    b.work = PyMem_Malloc((size_t)(self->max_token_len + 1) * 514 * sizeof(int32_t));
    b.keys = keys;
    if (!b.da || !b.work) { PyMem_Free(b.da); PyMem_Free(b.work); PyMem_Free(keys); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < b.size; i++) { b.da[i].base = 0; b.da[i].check = -1; b.da[i].id = -1; }
    b.da[0].check = -2;  /* the root: never a child */
    b.used_max = 1;
    b.first_free = 1;
    int rc = build_state(&b, 0, 0, n_keys, 0);
    PyMem_Free(b.work);
    PyMem_Free(keys);
    if (rc == 0 && b.size >= (1 << 29)) {
        PyErr_SetString(PyExc_ValueError, "the vocabulary is too large for the trie");
        rc = -1;
    }
    /* every base is below used_max, so base + 255 stays inside used_max + 256 slots */
    Py_ssize_t size = b.used_max + 256 < b.size ? b.used_max + 256 : b.size;
    if (rc == 0) {
        self->slots = PyMem_Malloc((size_t)size * sizeof(Slot));
        self->slot_token = PyMem_Malloc((size_t)size * sizeof(int32_t));
        if (!self->slots || !self->slot_token) { PyErr_NoMemory(); rc = -1; }
    }
    if (rc == 0) {
        for (Py_ssize_t i = 0; i < size; i++) {
            self->slots[i].base_end = b.da[i].base * 2 + (b.da[i].id >= 0);
            self->slots[i].check = b.da[i].check;
            self->slot_token[i] = b.da[i].id;
        }
        self->da_size = size;
        self->n_states = b.used_max;
    }
    PyMem_Free(b.da);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- */
/* Encoding                                                                                        */

typedef struct {
    int32_t *ids;
    Py_ssize_t n, cap;
} IdBuf;

/* Encode p[0:n] into out (grown as needed). Runs without the GIL. Returns 0, or -1 when out of memory. */
static int encode_span(const TrieObject *trie, const unsigned char *p, Py_ssize_t n, IdBuf *out)
{
    const Slot *slots = trie->slots;
    Py_ssize_t pos = 0;
    if (out->cap == 0) {
        out->cap = n / 3 + 16;
        out->ids = PyMem_RawMalloc((size_t)out->cap * sizeof(int32_t));
        if (!out->ids) return -1;
    }
    while (pos < n) {
        if (out->n == out->cap) {
            Py_ssize_t cap = out->cap + out->cap / 2 + 16;
            int32_t *ids = PyMem_RawRealloc(out->ids, (size_t)cap * sizeof(int32_t));
            if (!ids) return -1;
            out->ids = ids;
            out->cap = cap;
        }
        /* one token: walk as deep as the bytes allow, keep the last state that ends a token */
        int32_t s = 0, base_end = slots[0].base_end, best = 0;
        Py_ssize_t i = pos, end = pos;
        do {
            int32_t t = (base_end >> 1) + p[i];
            if (slots[t].check != s) break;
            s = t;
            base_end = slots[t].base_end;
            i++;
            if (base_end & 1) { best = t; end = i; }
        } while (i < n);
        /* end > pos: every single byte is a token (checked when built) */
        out->ids[out->n++] = trie->slot_token[best];
        pos = end;
    }
    return 0;
}

/* The UTF-8 bytes of a str, or the buffer of a bytes-like object. `p` is read without the GIL, so the
 * Source owns what it points into: a reference to the str (an ASCII str's own storage), a UTF-8 copy, or
 * a buffer view (which also keeps a bytearray from being resized). Nothing another thread does to the
 * caller's list can free it meanwhile. */
typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
    PyObject *owned;   /* the ASCII str itself, or a temporary UTF-8 copy of a non-ASCII str */
    Py_buffer view;
    int has_view;
} Source;

static int source_open(PyObject *obj, Source *src)
{
    memset(src, 0, sizeof(*src));
    if (PyUnicode_Check(obj)) {
        if (PyUnicode_IS_ASCII(obj)) {  /* the str's own storage is its UTF-8: no copy */
            const char *s = PyUnicode_AsUTF8AndSize(obj, &src->n);
            if (!s) return -1;
            Py_INCREF(obj);
            src->owned = obj;
            src->p = (const unsigned char *)s;
            return 0;
        }
        /* a temporary copy rather than PyUnicode_AsUTF8, which would keep it attached to the str */
        src->owned = PyUnicode_AsUTF8String(obj);
        if (!src->owned) return -1;
        src->p = (const unsigned char *)PyBytes_AS_STRING(src->owned);
        src->n = PyBytes_GET_SIZE(src->owned);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &src->view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "expected str or a bytes-like object, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    src->has_view = 1;
    src->p = src->view.buf;
    src->n = src->view.len;
    return 0;
}

static void source_close(Source *src)
{
    Py_CLEAR(src->owned);
    if (src->has_view) PyBuffer_Release(&src->view);
    src->has_view = 0;
}

static PyObject *ids_to_list(TrieObject *self, const IdBuf *buf)
{
    PyObject *list = PyList_New(buf->n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < buf->n; i++) {
        PyObject *v = self->ints[buf->ids[i]];
        Py_INCREF(v);
        PyList_SET_ITEM(list, i, v);
    }
    return list;
}

static int check_ready(TrieObject *self)
{
    if (self->slots) return 0;
    PyErr_SetString(PyExc_RuntimeError, "Trie was not initialised");
    return -1;
}

static PyObject *Trie_encode(TrieObject *self, PyObject *obj)
{
    if (check_ready(self) < 0) return NULL;
    Source src;
    IdBuf buf = {0};
    if (source_open(obj, &src) < 0) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = encode_span(self, src.p, src.n, &buf);
    Py_END_ALLOW_THREADS
    source_close(&src);
    PyObject *list = rc < 0 ? PyErr_NoMemory() : ids_to_list(self, &buf);
    PyMem_RawFree(buf.ids);
    return list;
}

/* encode_many(texts) -> list of lists: one GIL release for the whole group (encode_batch's unit of work). */
static PyObject *Trie_encode_many(TrieObject *self, PyObject *texts)
{
    if (check_ready(self) < 0) return NULL;
    /* a snapshot: a list could change (another thread, a finalizer run by an allocation) while we read it */
    PyObject *seq = PySequence_Tuple(texts);
    if (!seq) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq), opened = 0;
    PyObject *result = NULL;
    Source *src = PyMem_Calloc((size_t)(n ? n : 1), sizeof(Source));
    IdBuf *bufs = PyMem_Calloc((size_t)(n ? n : 1), sizeof(IdBuf));
    if (!src || !bufs) { PyErr_NoMemory(); goto done; }
    for (; opened < n; opened++)
        if (source_open(PyTuple_GET_ITEM(seq, opened), &src[opened]) < 0) goto done;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) rc = encode_span(self, src[i].p, src[i].n, &bufs[i]);
    Py_END_ALLOW_THREADS
    if (rc < 0) { PyErr_NoMemory(); goto done; }
    result = PyList_New(n);
    if (!result) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *list = ids_to_list(self, &bufs[i]);
        if (!list) { Py_CLEAR(result); goto done; }
        PyList_SET_ITEM(result, i, list);
        PyMem_RawFree(bufs[i].ids);
        bufs[i].ids = NULL;
    }
done:
    for (Py_ssize_t i = 0; i < opened; i++) source_close(&src[i]);
    if (bufs) for (Py_ssize_t i = 0; i < n; i++) PyMem_RawFree(bufs[i].ids);
    PyMem_Free(src);
    PyMem_Free(bufs);
    Py_DECREF(seq);
    return result;
}

/* ---------------------------------------------------------------------------------------------- */
/* Decoding                                                                                        */

static void bad_id(const TrieObject *self, PyObject *value, Py_ssize_t i)
{
    PyErr_Format(PyExc_ValueError, "token id %R at position %zd is not in the vocabulary (ids 0..%zd)",
                 value, i, self->max_id);
}

static int in_vocab(const TrieObject *self, long long id, int overflow)
{
    return !overflow && id >= 0 && id < self->n_ids && self->tok_len[id] >= 0;
}

/* The id of an item that is not an int, through __index__ (numpy ints), which can run any Python code; -1
 * with an exception set. bool is refused: True is not token 1. */
static long long index_id(TrieObject *self, PyObject *item, Py_ssize_t i)
{
    if (PyBool_Check(item)) {
        PyErr_Format(PyExc_TypeError, "token ids must be integers, not bool (item %zd)", i);
        return -1;
    }
    PyObject *index = PyNumber_Index(item);
    if (!index) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "token ids must be integers; item %zd is %.100s", i,
                         Py_TYPE(item)->tp_name);
        }
        return -1;
    }
    int overflow = 0;
    long long id = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (!(id == -1 && PyErr_Occurred()) && !in_vocab(self, id, overflow)) {
        bad_id(self, index, i);
        id = -1;
    }
    Py_DECREF(index);
    return id;
}

/* Check every id, store it in *ids (grown as needed), and return the total byte length; -1 with ValueError
 * naming the first bad id, or TypeError for an item that is not an integer.
 *
 * `seq` is a list or a tuple, read through its borrowed item array. Reading an int runs no Python code, but
 * another item's __index__ can change the list (shrink it, free its items) and so invalidate that array: each
 * item is converted to a C integer before the next is read, under a reference of our own, and the array and
 * size are read afresh after every such call. A changing list is read as a Python `for` loop would read it. */
static Py_ssize_t decode_ids(TrieObject *self, PyObject *seq, int32_t **ids, Py_ssize_t *n_ids)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), cap = n, total = 0, i = 0;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    *ids = PyMem_Malloc((size_t)(cap ? cap : 1) * sizeof(int32_t));
    if (!*ids) { PyErr_NoMemory(); return -1; }
    for (; i < n; i++) {
        PyObject *item = items[i];
        int overflow = 0;
        long long id;
        if (PyLong_CheckExact(item)) {  /* the common case */
            id = PyLong_AsLongLongAndOverflow(item, &overflow);
            if (!in_vocab(self, id, overflow)) { bad_id(self, item, i); return -1; }
        } else {
            Py_INCREF(item);
            id = index_id(self, item, i);
            Py_DECREF(item);
            if (id < 0) return -1;
            n = PySequence_Fast_GET_SIZE(seq);  /* Python code ran: the list may have changed */
            items = PySequence_Fast_ITEMS(seq);
            if (n > cap) {
                cap = n + n / 2;
                int32_t *grown = PyMem_Realloc(*ids, (size_t)cap * sizeof(int32_t));
                if (!grown) { PyErr_NoMemory(); return -1; }
                *ids = grown;
            }
        }
        (*ids)[i] = (int32_t)id;
        total += self->tok_len[id];
    }
    *n_ids = i;
    return total;
}

static void decode_into(TrieObject *self, const int32_t *ids, Py_ssize_t n, char *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t len = self->tok_len[ids[i]];
        memcpy(out, self->blob + self->tok_off[ids[i]], (size_t)len);
        out += len;
    }
}

/* as_str: 0 -> bytes, 1 -> str with invalid UTF-8 replaced by U+FFFD */
static PyObject *decode_impl(TrieObject *self, PyObject *obj, int as_str)
{
    if (check_ready(self) < 0) return NULL;
    if (PyUnicode_Check(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj) || PyMemoryView_Check(obj)) {
        /* b"\x05\x06" is not the ids [5, 6] */
        PyErr_Format(PyExc_TypeError, "token ids must be a sequence of integers, not %.100s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(obj, "token ids must be a sequence of integers");
    if (!seq) return NULL;
    PyObject *result = NULL;
    int32_t *ids = NULL;
    Py_ssize_t n = 0, total = decode_ids(self, seq, &ids, &n);
    if (total >= 0) {
        if (as_str) {
            char *buf = PyMem_Malloc((size_t)(total ? total : 1));
            if (!buf) {
                PyErr_NoMemory();
            } else {
                decode_into(self, ids, n, buf);
                result = PyUnicode_DecodeUTF8(buf, total, "replace");
                PyMem_Free(buf);
            }
        } else {
            result = PyBytes_FromStringAndSize(NULL, total);
            if (result) decode_into(self, ids, n, PyBytes_AS_STRING(result));
        }
    }
    PyMem_Free(ids);
    Py_DECREF(seq);
    return result;
}

static PyObject *Trie_decode_bytes(TrieObject *self, PyObject *obj) { return decode_impl(self, obj, 0); }
static PyObject *Trie_decode(TrieObject *self, PyObject *obj) { return decode_impl(self, obj, 1); }

static PyObject *Trie_get_n_states(TrieObject *self, void *closure) { return PyLong_FromSsize_t(self->n_states); }
static PyObject *Trie_get_max_token_len(TrieObject *self, void *closure)
{
    return PyLong_FromLong(self->max_token_len);
}

static PyObject *Trie_sizeof(TrieObject *self, PyObject *unused)
{
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < self->n_ids; i++) total += self->tok_len[i] > 0 ? self->tok_len[i] : 0;
    Py_ssize_t per_id = (Py_ssize_t)(sizeof(int64_t) + sizeof(int32_t) + sizeof(PyObject *));
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(TrieObject) + self->da_size * (Py_ssize_t)(sizeof(Slot) + 4) +
                              self->n_ids * per_id + total);
}

static PyMethodDef Trie_methods[] = {
    {"encode", (PyCFunction)Trie_encode, METH_O,
     "encode(text: str | bytes-like) -> list[int]: greedy longest match over the UTF-8 bytes (GIL released)."},
    {"encode_many", (PyCFunction)Trie_encode_many, METH_O,
     "encode_many(texts) -> list[list[int]]: encode a group with one GIL release."},
    {"decode_bytes", (PyCFunction)Trie_decode_bytes, METH_O,
     "decode_bytes(ids) -> bytes; ValueError naming the first id that is not in the vocabulary."},
    {"decode", (PyCFunction)Trie_decode, METH_O,
     "decode(ids) -> str, invalid UTF-8 replaced by U+FFFD; ValueError for ids not in the vocabulary."},
    {"__sizeof__", (PyCFunction)Trie_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Trie_getset[] = {
    {"n_states", (getter)Trie_get_n_states, NULL, "slots used by the double array", NULL},
    {"max_token_len", (getter)Trie_get_max_token_len, NULL, "the longest token, in bytes", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TrieType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aviary.tokenizer._trie.Trie",
    .tp_doc = "Trie(tokens: list[bytes | None]): a byte trie (double array) over the tokens, index = id.",
    .tp_basicsize = sizeof(TrieObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Trie_init,
    .tp_dealloc = (destructor)Trie_dealloc,
    .tp_methods = Trie_methods,
    .tp_getset = Trie_getset,
};

static struct PyModuleDef trie_module = {
    PyModuleDef_HEAD_INIT, "_trie", "The World tokenizer's compiled core (see aviary/tokenizer/world.py).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__trie(void)
{
    if (PyType_Ready(&TrieType) < 0) return NULL;
    PyObject *m = PyModule_Create(&trie_module);
    if (!m) return NULL;
    Py_INCREF(&TrieType);
    if (PyModule_AddObject(m, "Trie", (PyObject *)&TrieType) < 0) {
        Py_DECREF(&TrieType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
