/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * The msgpack decoder scans use: records copied out of shared memory into Python objects. */

/* Decodes what msgpack-python's unpackb(raw=False, strict_map_key=True) returns for the
 * same bytes: ints (fixint, 8-64 bit, signed and not), nil, bools, float32/64, str (strict
 * UTF-8), bin as bytes, arrays as lists (tuples when use_list is 0, as services are read),
 * maps as dicts whose keys are str or bytes, and nothing left over. Anything else -- an ext
 * type, the unused 0xc1, a map key of another type, invalid UTF-8, bytes cut short, nesting
 * past SHMREG_MAX_METADATA_DEPTH -- fails, and the scan hands the whole call to the Python
 * path, which decodes record by record, skips and counts what it cannot read.
 *
 * A scan decodes thousands of records that repeat the same short strings (field names,
 * types, capabilities): a small cache hands out one str object per distinct short string
 * for the length of a scan, instead of decoding and allocating it again for every record.
 * Strings are immutable, so sharing them is invisible to callers (CPython interns dict keys
 * the same way). A test compares this decoder with msgpack-python on generated values. */

#define STR_CACHE_SLOTS 512
#define STR_CACHE_MAX 24 /* longer strings are rarely repeated: decoded each time */
#define UNPACK_MAX_DEPTH (SHMREG_MAX_METADATA_DEPTH + 1)

typedef struct {
    PyObject *obj;
    uint32_t len;
    uint8_t bytes[STR_CACHE_MAX];
} CachedStr;

typedef struct {
    const uint8_t *p, *end;
    int use_list;        /* arrays as lists (metadata) or tuples (services) */
    CachedStr *strs;     /* STR_CACHE_SLOTS entries, or NULL for no caching */
    PyObject *last_int;  /* the int decoded last, reused when the next one is equal */
    int64_t last_int_value;
} Cursor;

static void cursor_clear(Cursor *c) {
    if (c->strs)
        for (int i = 0; i < STR_CACHE_SLOTS; i++) Py_CLEAR(c->strs[i].obj);
    Py_CLEAR(c->last_int);
}

/* Big-endian unsigned integer of ``n`` bytes at the cursor, advancing it; 0 if cut short. */
static inline int take_be(Cursor *c, int n, uint64_t *out) {
    if (c->end - c->p < n) return 0;
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | c->p[i];
    c->p += n;
    *out = v;
    return 1;
}

static PyObject *new_int(Cursor *c, int64_t v) {
    if (v >= -5 && v <= 256) return PyLong_FromLongLong(v); /* CPython's shared small ints */
    if (c->last_int && c->last_int_value == v) return Py_NewRef(c->last_int);
    PyObject *obj = PyLong_FromLongLong(v);
    if (obj) {
        Py_XSETREF(c->last_int, Py_NewRef(obj));
        c->last_int_value = v;
    }
    return obj;
}

static PyObject *new_str(Cursor *c, uint64_t n) {
    if ((uint64_t)(c->end - c->p) < n) return NULL;
    const uint8_t *s = c->p;
    c->p += n;
    if (!c->strs || n > STR_CACHE_MAX)
        return PyUnicode_DecodeUTF8((const char *)s, (Py_ssize_t)n, NULL);
    uint32_t h = 2166136261u; /* FNV-1a: a few bytes, so cheaper than a crc here */
    for (uint64_t i = 0; i < n; i++) h = (h ^ s[i]) * 16777619u;
    CachedStr *e = &c->strs[h % STR_CACHE_SLOTS];
    if (e->obj && e->len == n && memcmp(e->bytes, s, n) == 0) return Py_NewRef(e->obj);
    PyObject *obj = PyUnicode_DecodeUTF8((const char *)s, (Py_ssize_t)n, NULL);
    if (obj) {
        Py_XSETREF(e->obj, Py_NewRef(obj));
        e->len = (uint32_t)n;
        memcpy(e->bytes, s, n);
    }
    return obj;
}

static PyObject *unpack_value(Cursor *c, int depth);

static PyObject *unpack_array(Cursor *c, uint64_t n, int depth) {
    if ((uint64_t)(c->end - c->p) < n) return NULL; /* each item takes a byte at least */
    PyObject *seq = c->use_list ? PyList_New((Py_ssize_t)n) : PyTuple_New((Py_ssize_t)n);
    if (!seq) return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *item = unpack_value(c, depth + 1);
        if (!item) {
            Py_DECREF(seq);
            return NULL;
        }
        if (c->use_list)
            PyList_SET_ITEM(seq, (Py_ssize_t)i, item);
        else
            PyTuple_SET_ITEM(seq, (Py_ssize_t)i, item);
    }
    return seq;
}

static PyObject *unpack_map(Cursor *c, uint64_t n, int depth) {
    if ((uint64_t)(c->end - c->p) / 2 < n) return NULL; /* a key and a value per item */
    PyObject *map = PyDict_New();
    if (!map) return NULL;
    for (uint64_t i = 0; i < n; i++) {
        PyObject *key = unpack_value(c, depth + 1);
        if (!key) goto fail;
        if (!PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key)) { /* strict_map_key */
            Py_DECREF(key);
            goto fail;
        }
        PyObject *value = unpack_value(c, depth + 1);
        int r = value ? PyDict_SetItem(map, key, value) : -1;
        Py_DECREF(key);
        Py_XDECREF(value);
        if (r < 0) goto fail;
    }
    return map;
fail:
    Py_DECREF(map);
    return NULL;
}

/* One value; NULL when the bytes are not what the registry stores (an exception may be set:
 * the caller clears it and declines). */
static PyObject *unpack_value(Cursor *c, int depth) {
    if (depth > UNPACK_MAX_DEPTH || c->p >= c->end) return NULL;
    uint8_t code = *c->p++;
    uint64_t n;
    if (code <= 0x7f) return PyLong_FromLong(code);
    if (code >= 0xe0) return PyLong_FromLong((int8_t)code);
    if ((code & 0xe0) == 0xa0) return new_str(c, code & 0x1f);
    if ((code & 0xf0) == 0x90) return unpack_array(c, code & 0x0f, depth);
    if ((code & 0xf0) == 0x80) return unpack_map(c, code & 0x0f, depth);
    switch (code) {
    case 0xc0: return Py_NewRef(Py_None);
    case 0xc2: return Py_NewRef(Py_False);
    case 0xc3: return Py_NewRef(Py_True);
    case 0xc4: case 0xc5: case 0xc6: /* bin 8/16/32 */
        if (!take_be(c, 1 << (code - 0xc4), &n) || (uint64_t)(c->end - c->p) < n) return NULL;
        c->p += n;
        return PyBytes_FromStringAndSize((const char *)c->p - n, (Py_ssize_t)n);
    case 0xca: { /* float32 */
        if (!take_be(c, 4, &n)) return NULL;
        uint32_t bits = (uint32_t)n;
        float f;
        memcpy(&f, &bits, 4);
        return PyFloat_FromDouble((double)f);
    }
    case 0xcb: { /* float64 */
        if (!take_be(c, 8, &n)) return NULL;
        double d;
        memcpy(&d, &n, 8);
        return PyFloat_FromDouble(d);
    }
    case 0xcc: case 0xcd: case 0xce: /* uint 8/16/32 */
        return take_be(c, 1 << (code - 0xcc), &n) ? new_int(c, (int64_t)n) : NULL;
    case 0xcf: /* uint 64 */
        if (!take_be(c, 8, &n)) return NULL;
        return n <= INT64_MAX ? new_int(c, (int64_t)n) : PyLong_FromUnsignedLongLong(n);
    case 0xd0: /* int 8 */
        return take_be(c, 1, &n) ? new_int(c, (int8_t)n) : NULL;
    case 0xd1:
        return take_be(c, 2, &n) ? new_int(c, (int16_t)n) : NULL;
    case 0xd2:
        return take_be(c, 4, &n) ? new_int(c, (int32_t)n) : NULL;
    case 0xd3:
        return take_be(c, 8, &n) ? new_int(c, (int64_t)n) : NULL;
    case 0xd9: case 0xda: case 0xdb: /* str 8/16/32 */
        return take_be(c, 1 << (code - 0xd9), &n) ? new_str(c, n) : NULL;
    case 0xdc: case 0xdd: /* array 16/32 */
        return take_be(c, 2 << (code - 0xdc), &n) ? unpack_array(c, n, depth) : NULL;
    case 0xde: case 0xdf: /* map 16/32 */
        return take_be(c, 2 << (code - 0xde), &n) ? unpack_map(c, n, depth) : NULL;
    default: /* 0xc1 (never used), ext and fixext: not what the registry stores */
        return NULL;
    }
}

/* The whole of [p, end) as one value, nothing left over (unpackb's ExtraData). */
static PyObject *unpack_exact(Cursor *c, const uint8_t *p, const uint8_t *end) {
    c->p = p;
    c->end = end;
    PyObject *v = unpack_value(c, 0);
    if (v && c->p != c->end) Py_CLEAR(v);
    return v;
}

/* unpack(data, use_list=True): the decoder on its own, for tests; ValueError where a scan
 * would hand the record to Python. */
static PyObject *py_unpack(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    Py_buffer view;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "unpack(data, use_list=True)");
        return NULL;
    }
    int use_list = nargs < 2 ? 1 : PyObject_IsTrue(args[1]);
    if (use_list < 0 || PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    CachedStr *strs = PyMem_Calloc(STR_CACHE_SLOTS, sizeof *strs);
    if (!strs) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    Cursor c = {.use_list = use_list, .strs = strs};
    const uint8_t *p = view.buf;
    PyObject *v = unpack_exact(&c, p, p + view.len);
    cursor_clear(&c);
    PyMem_Free(strs);
    PyBuffer_Release(&view);
    if (!v && !PyErr_ExceptionMatches(PyExc_MemoryError)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "not a value the registry stores");
    }
    return v;
}
