/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Preparing a record: key, metadata bytes, query tags, checksum. */

/* ------------------------------------------------------------------ preparing a record */

/* The cached tag of a str, or -1 when the codec has not computed it yet. */
static int64_t cached_tag(Fast *self, PyObject *s) {
    if (Py_TYPE(s) != &PyUnicode_Type) return -1;
    PyObject *tag = PyDict_GetItemWithError(self->str_tags, s);
    if (!tag) {
        PyErr_Clear();
        return -1;
    }
    uint64_t v = PyLong_AsUnsignedLongLong(tag);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return (int64_t)(v & LO32);
}

static int call_u64(PyObject *fn, PyObject *arg, uint64_t *out) {
    PyObject *r = PyObject_CallOneArg(fn, arg);
    if (!r) return -1;
    *out = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *str_type, *str_capabilities;

/* codec.type_tag and codec.capability_mask, answered from the tag cache when every value
 * is a str it has seen (types and capability names repeat endlessly); else the codec's. */
static int query_tags(Fast *self, PyObject *meta, uint64_t *type_tag, uint64_t *caps) {
    PyObject *t = PyDict_GetItemWithError(meta, str_type);
    if (!t && PyErr_Occurred()) return -1;
    if (!t) {
        *type_tag = SHMREG_TYPE_ABSENT;
    } else {
        int64_t tag = cached_tag(self, t);
        if (tag < 0) {
            if (call_u64(self->type_tag, meta, type_tag) < 0) return -1;
        } else {
            *type_tag = (tag == SHMREG_TYPE_ABSENT || tag == SHMREG_TYPE_ANY) ? SHMREG_TYPE_ANY
                                                                          : (uint64_t)tag;
        }
    }
    PyObject *c = PyDict_GetItemWithError(meta, str_capabilities);
    if (!c && PyErr_Occurred()) return -1;
    if (!c) {
        *caps = 0;
        return 0;
    }
    if (PyList_CheckExact(c)) {
        uint64_t mask = 0;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(c); i++) {
            int64_t tag = cached_tag(self, PyList_GET_ITEM(c, i));
            if (tag < 0) return call_u64(self->capability_mask, meta, caps);
            mask |= 1ull << (tag & 63);
        }
        *caps = mask;
        return 0;
    }
    return call_u64(self->capability_mask, meta, caps);
}

typedef struct {
    PyObject *record; /* owned: key bytes + packed metadata + padding to RECORD_ALIGN */
    Py_ssize_t key_len; /* the key is the record's first key_len bytes */
    uint32_t hash;
    uint64_t head[5];
    uint64_t caps;
} Prepared;

/* backends/_shm.py _prepare: the record and slot words of a registration (``w2`` still
 * without the record offset), for an owner given as (pid, start ticks, host). 1 prepared,
 * 0 decline, -1 error. The metadata is only read here: its tags may call into the codec
 * (Python), which happens before the lock, as in _prepare. */
static int prepare(Fast *self, PyObject *ns, PyObject *service, PyObject *owner, PyObject *metadata,
                   Prepared *out) {
    out->record = NULL;
    if (!PyTuple_Check(owner) || PyTuple_GET_SIZE(owner) != 3) return 0; /* as ``pid, start, _`` */
    if (metadata != Py_None && !PyDict_CheckExact(metadata)) return 0;
    uint64_t pid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(owner, 0));
    uint64_t start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(owner, 1));
    if (PyErr_Occurred() || pid == 0 || pid > LO32) {
        PyErr_Clear();
        return 0;
    }
    PyObject *meta = metadata;
    if (meta == Py_None) {
        meta = PyDict_New();
        if (!meta) return -1;
    } else {
        Py_INCREF(meta);
    }
    int result = 0;
    Buf rec = BUF_INIT(rec);
    uint32_t key_hash, ns_hash;
    int r = encode_key(self, ns, service, &rec, &key_hash, &ns_hash);
    Py_ssize_t key_len = (Py_ssize_t)rec.len;
    if (r == 1) r = pack_plain(&rec, meta, 0) ? 0 : 1; /* the metadata right after the key */
    if (r != 1) {
        if (r < 0 || PyErr_Occurred()) {
            PyErr_Clear();
        }
        goto done; /* declined: Python's codec names what cannot be stored */
    }
    Py_ssize_t meta_len = (Py_ssize_t)rec.len - key_len;
    if ((uint64_t)meta_len > self->max_meta) goto done; /* MetadataTooLarge, from Python */
    uint64_t type_tag, caps;
    if (query_tags(self, meta, &type_tag, &caps) < 0) {
        PyErr_Clear();
        goto done;
    }
    Py_ssize_t len = (Py_ssize_t)rec.len;
    Py_ssize_t padded = (len + SHMREG_RECORD_ALIGN - 1) & ~(Py_ssize_t)(SHMREG_RECORD_ALIGN - 1);
    PyObject *record = PyBytes_FromStringAndSize(NULL, padded);
    if (!record) {
        result = -1;
        goto done;
    }
    char *bytes = PyBytes_AS_STRING(record);
    memcpy(bytes, rec.p, (size_t)len);
    memset(bytes + len, 0, (size_t)(padded - len));
    uint32_t crc = crc32_seeded(record_seed(pid, start), (const uint8_t *)bytes, (size_t)len);
    out->record = record;
    out->key_len = key_len;
    out->hash = key_hash;
    out->head[0] = (uint64_t)key_hash | ((uint64_t)ns_hash << 32);
    out->head[1] = ((uint64_t)key_len << 32) | ((uint64_t)SHMREG_USED << 48);
    out->head[2] = (uint64_t)meta_len | (type_tag << 32);
    out->head[3] = pid | ((uint64_t)crc << 32);
    out->head[4] = start;
    out->caps = caps;
    result = 1;
done:
    buf_free(&rec);
    Py_DECREF(meta);
    return result;
}
