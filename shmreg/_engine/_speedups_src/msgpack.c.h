/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * The msgpack encoder for plainly storable metadata and services. */

/* A msgpack encoder for what codec.py's _fast_ok calls plainly storable (dict with str keys,
 * list, str, bytes, int in [-2**63, 2**64), float but NaN, bool, None; depth <= 32), writing
 * exactly the bytes msgpack-python's Packer(use_bin_type=True) writes: the smallest form
 * of every int and length, float64, str8 allowed, dicts in insertion order. Anything else
 * (a subclass, a tuple, a lone surrogate, NaN) declines, and Python's codec checks and
 * raises. A test compares both encoders on generated metadata. */
typedef struct {
    uint8_t *p;
    size_t len, cap;
    uint8_t local[512];
} Buf;

#define BUF_INIT(name) {.p = (name).local, .len = 0, .cap = sizeof (name).local}

static void buf_free(Buf *b) {
    if (b->p != b->local) PyMem_Free(b->p);
    b->p = b->local;
    b->len = 0;
    b->cap = sizeof b->local;
}

static int buf_room(Buf *b, size_t n) {
    if (b->len + n <= b->cap) return 0;
    size_t cap = b->cap * 2;
    while (cap < b->len + n) cap *= 2;
    uint8_t *p = b->p == b->local ? PyMem_Malloc(cap) : PyMem_Realloc(b->p, cap);
    if (!p) return -1;
    if (b->p == b->local) memcpy(p, b->local, b->len);
    b->p = p;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const void *src, size_t n) {
    if (buf_room(b, n) < 0) return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

static int put_head(Buf *b, uint8_t code, uint64_t v, int nbytes) {
    uint8_t h[9];
    h[0] = code;
    for (int i = 0; i < nbytes; i++) h[1 + i] = (uint8_t)(v >> (8 * (nbytes - 1 - i)));
    return put(b, h, (size_t)nbytes + 1);
}

/* str/bin/array/map length headers: fix form when small, then 8 (str/bin only), 16, 32 bit. */
static int put_len(Buf *b, uint64_t n, int fix_base, uint64_t fix_limit, int c8, int c16, int c32) {
    if (fix_base >= 0 && n < fix_limit) return put_head(b, (uint8_t)(fix_base | (int)n), 0, 0);
    if (c8 >= 0 && n < 256) return put_head(b, (uint8_t)c8, n, 1);
    if (n < 65536) return put_head(b, (uint8_t)c16, n, 2);
    if (n <= 0xFFFFFFFFull) return put_head(b, (uint8_t)c32, n, 4);
    return 1; /* too long for msgpack: decline */
}

static int put_str(Buf *b, PyObject *v) {
    Py_ssize_t n;
    const char *utf8 = PyUnicode_AsUTF8AndSize(v, &n);
    if (!utf8) {
        PyErr_Clear(); /* a lone surrogate: Python names it */
        return 1;
    }
    int r = put_len(b, (uint64_t)n, 0xa0, 32, 0xd9, 0xda, 0xdb);
    return r ? r : put(b, utf8, (size_t)n);
}

/* 0 packed, 1 decline, -1 out of memory. */
static int pack_plain(Buf *b, PyObject *v, int depth) {
    if (depth > SHMREG_MAX_METADATA_DEPTH) return 1;
    PyTypeObject *t = Py_TYPE(v);
    if (v == Py_None) return put_head(b, 0xc0, 0, 0);
    if (t == &PyBool_Type) return put_head(b, v == Py_True ? 0xc3 : 0xc2, 0, 0);
    if (t == &PyUnicode_Type) return put_str(b, v);
    if (t == &PyLong_Type) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow < 0) return 1;
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return 1; /* past 2**64 - 1 */
            }
            return put_head(b, 0xcf, u, 8);
        }
        if (x < -32) {
            if (x >= -128) return put_head(b, 0xd0, (uint64_t)x, 1);
            if (x >= -32768) return put_head(b, 0xd1, (uint64_t)x, 2);
            if (x >= -2147483648LL) return put_head(b, 0xd2, (uint64_t)x, 4);
            return put_head(b, 0xd3, (uint64_t)x, 8);
        }
        if (x < 128) return put_head(b, (uint8_t)(x & 0xFF), 0, 0); /* fixint, either sign */
        if (x < 256) return put_head(b, 0xcc, (uint64_t)x, 1);
        if (x < 65536) return put_head(b, 0xcd, (uint64_t)x, 2);
        if (x <= 0xFFFFFFFFLL) return put_head(b, 0xce, (uint64_t)x, 4);
        return put_head(b, 0xcf, (uint64_t)x, 8);
    }
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(v);
        if (isnan(d)) return 1;
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return put_head(b, 0xcb, bits, 8);
    }
    if (t == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(v);
        int r = put_len(b, (uint64_t)n, -1, 0, 0xc4, 0xc5, 0xc6);
        return r ? r : put(b, PyBytes_AS_STRING(v), (size_t)n);
    }
    if (t == &PyList_Type) {
        Py_ssize_t n = PyList_GET_SIZE(v);
        int r = put_len(b, (uint64_t)n, 0x90, 16, -1, 0xdc, 0xdd);
        for (Py_ssize_t i = 0; !r && i < n; i++) {
            /* The list cannot change under us: no Python code runs while packing. */
            r = pack_plain(b, PyList_GET_ITEM(v, i), depth + 1);
        }
        return r;
    }
    if (t == &PyDict_Type) {
        int r = put_len(b, (uint64_t)PyDict_GET_SIZE(v), 0x80, 16, -1, 0xde, 0xdf);
        Py_ssize_t pos = 0;
        PyObject *k, *item;
        while (!r && PyDict_Next(v, &pos, &k, &item)) {
            if (Py_TYPE(k) != &PyUnicode_Type) return 1;
            r = put_str(b, k);
            if (!r) r = pack_plain(b, item, depth + 1);
        }
        return r;
    }
    return 1;
}
