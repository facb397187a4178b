/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Key bytes: namespace prefix + msgpack(service), encoded on the stack for every call. */

/* Key bytes of (namespace, service) into ``b`` and their crc32 (the slot's key hash), as
 * ShmBase._key makes them, for a str or int service in a namespace the Python side has
 * seen (its prefix cached in ``namespaces``). Encoding a short key here costs less than a
 * cache lookup would (no tuple to build and hash, no dict probe missing the CPU cache), so
 * this path keeps no key cache. 1 encoded; 0 decline (a tuple service, a new namespace,
 * anything Python must reject: it raises the right InvalidKey); -1 out of memory. No
 * Python code runs here. */
static int encode_key(Fast *self, PyObject *ns, PyObject *service, Buf *b, uint32_t *hash,
                      uint32_t *ns_hash) {
    if (!PyUnicode_CheckExact(ns)) return 0;
    PyTypeObject *t = Py_TYPE(service);
    if (t == &PyUnicode_Type) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(service);
        if (len == 0 || PyUnicode_FindChar(service, 0, 0, len, 1) != -1) return 0;
    } else if (t != &PyLong_Type) {
        return 0;
    }
    PyObject *ns_info = PyDict_GetItemWithError(self->namespaces, ns); /* (prefix, crc, len) */
    if (!ns_info) {
        PyErr_Clear();
        return 0;
    }
    if (!PyTuple_Check(ns_info) || PyTuple_GET_SIZE(ns_info) != 3 ||
        !PyBytes_Check(PyTuple_GET_ITEM(ns_info, 0)))
        return 0;
    unsigned long crc = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(ns_info, 1));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    PyObject *prefix = PyTuple_GET_ITEM(ns_info, 0);
    int r = put(b, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix));
    if (r) return -1;
    r = pack_plain(b, service, 0);
    if (r) return r < 0 ? -1 : 0; /* out of range, not encodable: Python raises InvalidKey */
    if (b->len > SHMREG_MAX_KEY_BYTES) return 0;
    *hash = crc32_seeded(0, b->p, b->len);
    *ns_hash = (uint32_t)crc;
    return 1;
}
