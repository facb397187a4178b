/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Key bytes and the per-backend key cache. */

/* Key bytes for a str or int service (shm_base.py ShmBase._key), cached as Python caches
 * them; NULL (no exception) declines: tuples, a namespace not seen yet, anything to reject. */
static PyObject *encode_key(Fast *self, PyObject *ns, PyObject *service, PyObject *pair,
                            int remember) {
    PyTypeObject *t = Py_TYPE(service);
    if (t == &PyUnicode_Type) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(service);
        if (len == 0 || PyUnicode_FindChar(service, 0, 0, len, 1) != -1) return NULL;
    } else if (t != &PyLong_Type) {
        return NULL;
    }
    PyObject *ns_info = PyDict_GetItemWithError(self->namespaces, ns); /* (prefix, crc, len) */
    if (!ns_info || !PyTuple_Check(ns_info) || PyTuple_GET_SIZE(ns_info) != 3 ||
        !PyBytes_Check(PyTuple_GET_ITEM(ns_info, 0)))
        return NULL;
    Buf packed = {.p = packed.local, .len = 0, .cap = sizeof packed.local};
    if (pack_plain(&packed, service, 0)) {
        if (packed.p != packed.local) PyMem_Free(packed.p);
        PyErr_Clear();
        return NULL; /* out of range, not encodable: Python raises InvalidKey */
    }
    PyObject *prefix = PyTuple_GET_ITEM(ns_info, 0);
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix), slen = (Py_ssize_t)packed.len;
    PyObject *raw = NULL, *info = NULL;
    if (plen + slen > SHMREG_MAX_KEY_BYTES) goto done;
    raw = PyBytes_FromStringAndSize(NULL, plen + slen);
    if (!raw) goto done;
    memcpy(PyBytes_AS_STRING(raw), PyBytes_AS_STRING(prefix), (size_t)plen);
    memcpy(PyBytes_AS_STRING(raw) + plen, packed.p, (size_t)slen);
    uint32_t hash = crc32_seeded(0, (const uint8_t *)PyBytes_AS_STRING(raw), (size_t)(plen + slen));
    info = PyTuple_New(5);
    PyObject *hash_obj = info ? PyLong_FromUnsignedLong(hash) : NULL;
    if (!hash_obj) {
        Py_CLEAR(info);
        goto done;
    }
    PyTuple_SET_ITEM(info, 0, raw);
    PyTuple_SET_ITEM(info, 1, hash_obj);
    PyTuple_SET_ITEM(info, 2, Py_NewRef(PyTuple_GET_ITEM(ns_info, 1)));
    PyTuple_SET_ITEM(info, 3, Py_NewRef(PyTuple_GET_ITEM(ns_info, 2)));
    PyTuple_SET_ITEM(info, 4, Py_NewRef((PyObject *)t));
    raw = NULL;
    /* Cached for reads, as the Python path caches; a registration of a name not read yet
     * does not fill the cache (a batch of fresh names would only pay for it). */
    if (remember && PyDict_GET_SIZE(self->keys) < SHMREG_KEY_CACHE_LIMIT &&
        PyDict_SetItem(self->keys, pair, info) < 0) {
        Py_CLEAR(info);
    }
done:
    if (packed.p != packed.local) PyMem_Free(packed.p);
    Py_XDECREF(raw);
    if (!info) PyErr_Clear();
    return info;
}

/* The key cache entry for (namespace, service) as a new reference, or NULL (no exception)
 * to decline. */
static PyObject *cached_key(Fast *self, PyObject *ns, PyObject *service, int remember) {
    if (!PyUnicode_CheckExact(ns)) return NULL;
    PyObject *pair = PyTuple_Pack(2, ns, service);
    if (!pair) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *info = PyDict_GetItemWithError(self->keys, pair); /* borrowed */
    if (!info) {
        if (PyErr_Occurred()) { /* unhashable and the like: Python raises InvalidKey */
            PyErr_Clear();
            Py_DECREF(pair);
            return NULL;
        }
        info = encode_key(self, ns, service, pair, remember);
        Py_DECREF(pair);
        return info;
    }
    Py_DECREF(pair);
    if (!PyTuple_Check(info) || PyTuple_GET_SIZE(info) < 5 ||
        PyTuple_GET_ITEM(info, 4) != (PyObject *)Py_TYPE(service) ||
        !PyBytes_Check(PyTuple_GET_ITEM(info, 0)))
        return NULL; /* True must not answer for 1: the Python path re-encodes */
    Py_INCREF(info);
    return info;
}
