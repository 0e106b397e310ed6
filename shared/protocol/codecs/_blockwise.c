/* The int8 and int4 codecs' per-element work (shared/protocol/codecs/blockwise.py), each in one pass.
 *
 * numpy's and torch's single operations make the blockwise codecs some ten passes over a tensor (the channel
 * division, the blocks' maxima, the scaling, the rounding, the cast; decode's cast and two multiplications). Here
 * each codec's per-element work is one loop that runs a few thousand elements at a time through a buffer in the
 * core's cache. The arithmetic is the Python code's, operation for operation, in IEEE single precision (no
 * contraction into fused multiply-adds: built with -ffp-contract=off), so both give the same bits; the tests
 * compare them. Neither function holds the GIL while it loops.
 *
 * quantise(x, channel_scales, width, block, qmax, q, amax) -> bool
 *     x: float32 (n,); channel_scales: float32 (width,) or None; q: writable int8 (n,); amax: writable float32
 *     (ceil(n / block),). y = x / channel_scales[i % width] (or x); amax[b] = max |y| over block b; inv =
 *     (1 / amax) * qmax (torch's ``qmax / amax``), clamped to float32's max, 0 where amax is 0; q = y * inv rounded
 *     to the nearest integer, ties to even (the float32 sum with 1.5 * 2**23, whose low byte is the integer).
 *     False, with q and amax unspecified, if some y is NaN or infinite.
 * dequantise(q, scales, channel_scales, width, block, out) -> None
 *     q: int8 (n,); scales: float32 (ceil(n / block),); out: writable float32 (n,).
 *     out = float(q) * scales[i / block], then times channel_scales[i % width] where given.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 4096 /* elements a buffer holds (16 kB of float32): it stays in the core's L1 or L2 cache */
#define ROUND 12582912.0f /* 1.5 * 2**23: y + ROUND lies in [2**23, 2**24), where float32's step is 1 */
#define ABS_BITS 0x7fffffffu
#define INF_BITS 0x7f800000u

static inline uint32_t bits_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* dst[0:len] = src[0:len] / cs[(first + j) % width], row segment by row segment */
static void divide_channels(float *dst, const float *src, Py_ssize_t len, const float *cs, Py_ssize_t width,
                            Py_ssize_t first) {
    Py_ssize_t c = first % width, j = 0;
    while (j < len) {
        Py_ssize_t seg = width - c < len - j ? width - c : len - j;
        const float *s = src + j, *k = cs + c;
        float *d = dst + j;
        for (Py_ssize_t i = 0; i < seg; i++)
            d[i] = s[i] / k[i];
        j += seg;
        c = 0;
    }
}

/* The largest |v| of v[0:len] as its bits (the sign bit cleared): non-negative floats order as their bits do,
 * and infinities and NaNs lie above INF_BITS - 1. An integer maximum, which compilers vectorise. */
static inline uint32_t max_abs_bits(const float *v, Py_ssize_t len) {
    uint32_t m = 0;
    for (Py_ssize_t i = 0; i < len; i++) {
        uint32_t a = bits_of(v[i]) & ABS_BITS;
        m = a > m ? a : m;
    }
    return m;
}

static inline void round_block(int8_t *q, const float *y, Py_ssize_t len, float inv) {
    for (Py_ssize_t i = 0; i < len; i++) {
        float t = y[i] * inv;
        t = t + ROUND;
        q[i] = (int8_t)(uint8_t)bits_of(t); /* the low byte: round(y * inv) in two's complement */
    }
}

/* The loops are built for the CPU's widest vectors where GCC can dispatch on it at load time (x86-64 Linux, by
 * glibc's ifuncs): the baseline (SSE2) vectorises them 4 floats at a time, AVX2 8, AVX-512 16. Elsewhere, one
 * build for the compiler's default target. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define WIDEST __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WIDEST
#endif

/* elements a loop takes at a time: whole blocks, about CHUNK of them */
static inline Py_ssize_t chunk_of(Py_ssize_t block) { return block >= CHUNK ? block : CHUNK / block * block; }

/* 1 if finite, 0 if not */
WIDEST static int quantise_loop(const float *x, Py_ssize_t n, const float *cs, Py_ssize_t width, Py_ssize_t block,
                         float qmax, int8_t *q, float *amax, float *buf, Py_ssize_t chunk) {
    for (Py_ssize_t s = 0; s < n; s += chunk) {
        Py_ssize_t len = n - s < chunk ? n - s : chunk;
        const float *y = x + s;
        if (cs) {
            divide_channels(buf, x + s, len, cs, width, s);
            y = buf;
        }
        for (Py_ssize_t j = 0; j < len; j += block) {
            Py_ssize_t k = len - j < block ? len - j : block;
            uint32_t m = max_abs_bits(y + j, k);
            if (m >= INF_BITS)
                return 0;
            float a = float_of(m);
            amax[(s + j) / block] = a;
            float inv = 0.0f;
            if (a > 0.0f) {
                float r = 1.0f / a; /* torch's reciprocal, then the product: two roundings */
                inv = r * qmax;
                if (inv > FLT_MAX)
                    inv = FLT_MAX;
            }
            round_block(q + s + j, y + j, k, inv);
        }
    }
    return 1;
}

/* o[0:len] *= cs[(first + j) % width], row segment by row segment */
static void multiply_channels(float *o, Py_ssize_t len, const float *cs, Py_ssize_t width, Py_ssize_t first) {
    Py_ssize_t c = first % width, j = 0;
    while (j < len) {
        Py_ssize_t seg = width - c < len - j ? width - c : len - j;
        const float *k = cs + c;
        float *d = o + j;
        for (Py_ssize_t i = 0; i < seg; i++)
            d[i] = d[i] * k[i];
        j += seg;
        c = 0;
    }
}

WIDEST static void dequantise_loop(const int8_t *q, Py_ssize_t n, const float *scales, const float *cs, Py_ssize_t width,
                            Py_ssize_t block, float *out, Py_ssize_t chunk) {
    for (Py_ssize_t s = 0; s < n; s += chunk) {
        Py_ssize_t len = n - s < chunk ? n - s : chunk;
        for (Py_ssize_t j = s; j < s + len; j += block) {
            Py_ssize_t k = s + len - j < block ? s + len - j : block;
            float sc = scales[j / block];
            const int8_t *qb = q + j;
            float *o = out + j;
            for (Py_ssize_t i = 0; i < k; i++)
                o[i] = (float)qb[i] * sc;
        }
        if (cs) /* while the chunk is in the cache */
            multiply_channels(out + s, len, cs, width, s);
    }
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, Py_ssize_t count,
                      const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", what, view->len, itemsize * count);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int check_shape(Py_ssize_t width, Py_ssize_t block, int has_cs) {
    if (block < 1) {
        PyErr_SetString(PyExc_ValueError, "block must be >= 1");
        return -1;
    }
    if (has_cs && width < 1) {
        PyErr_SetString(PyExc_ValueError, "width must be >= 1 with channel scales");
        return -1;
    }
    return 0;
}

static PyObject *quantise(PyObject *self, PyObject *args) {
    PyObject *xo, *cso, *qo, *ao;
    Py_ssize_t width, block;
    int qmax;
    if (!PyArg_ParseTuple(args, "OOnniOO", &xo, &cso, &width, &block, &qmax, &qo, &ao))
        return NULL;
    int has_cs = cso != Py_None;
    if (check_shape(width, block, has_cs) < 0)
        return NULL;
    Py_buffer x, cs = {0}, q, a;
    if (PyObject_GetBuffer(xo, &x, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t n = x.len / 4;
    PyObject *result = NULL;
    if (x.len % 4) {
        PyErr_SetString(PyExc_ValueError, "x: not a whole number of float32");
        goto release_x;
    }
    if (has_cs && get_buffer(cso, &cs, 0, 4, width, "channel_scales") < 0)
        goto release_x;
    if (get_buffer(qo, &q, 1, 1, n, "q") < 0)
        goto release_cs;
    if (get_buffer(ao, &a, 1, 4, (n + block - 1) / block, "amax") < 0)
        goto release_q;
    {
        Py_ssize_t chunk = chunk_of(block);
        float *buf = has_cs ? malloc(sizeof(float) * (size_t)(n < chunk ? (n ? n : 1) : chunk)) : NULL;
        if (has_cs && !buf) {
            PyErr_NoMemory();
            goto release_a;
        }
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = quantise_loop(x.buf, n, has_cs ? cs.buf : NULL, width, block, (float)qmax, q.buf, a.buf, buf, chunk);
        Py_END_ALLOW_THREADS
        free(buf);
        result = PyBool_FromLong(ok);
    }
release_a:
    PyBuffer_Release(&a);
release_q:
    PyBuffer_Release(&q);
release_cs:
    if (has_cs)
        PyBuffer_Release(&cs);
release_x:
    PyBuffer_Release(&x);
    return result;
}

static PyObject *dequantise(PyObject *self, PyObject *args) {
    PyObject *qo, *so, *cso, *oo;
    Py_ssize_t width, block;
    if (!PyArg_ParseTuple(args, "OOOnnO", &qo, &so, &cso, &width, &block, &oo))
        return NULL;
    int has_cs = cso != Py_None;
    if (check_shape(width, block, has_cs) < 0)
        return NULL;
    Py_buffer q, s, cs = {0}, out;
    if (PyObject_GetBuffer(qo, &q, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    Py_ssize_t n = q.len;
    PyObject *result = NULL;
    if (get_buffer(so, &s, 0, 4, (n + block - 1) / block, "scales") < 0)
        goto release_q;
    if (has_cs && get_buffer(cso, &cs, 0, 4, width, "channel_scales") < 0)
        goto release_s;
    if (get_buffer(oo, &out, 1, 4, n, "out") < 0)
        goto release_cs;
    Py_BEGIN_ALLOW_THREADS
    dequantise_loop(q.buf, n, s.buf, has_cs ? cs.buf : NULL, width, block, out.buf, chunk_of(block));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    result = Py_NewRef(Py_None);
release_cs:
    if (has_cs)
        PyBuffer_Release(&cs);
release_s:
    PyBuffer_Release(&s);
release_q:
    PyBuffer_Release(&q);
    return result;
}

static PyMethodDef methods[] = {
    {"quantise", quantise, METH_VARARGS, "The blockwise codecs' encode, in one pass (see the module's comment)."},
    {"dequantise", dequantise, METH_VARARGS, "The blockwise codecs' decode, in one pass (see the module's comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockwise", NULL, -1, methods};

PyMODINIT_FUNC PyInit__blockwise(void) { return PyModule_Create(&module); }
