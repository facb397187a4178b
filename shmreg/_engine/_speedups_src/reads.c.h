/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Point reads: lookup, lookup_with_metadata, entry. */

/* pid alive? As identity.probe_alive: kill(pid, 0), EPERM counts as alive. */
static inline int alive(uint64_t pid) {
    if (pid == 0 || pid > INT_MAX) return 0;
    if (kill((pid_t)pid, 0) == 0) return 1;
    return errno == EPERM;
}

/* fn(backend, *args): the Python path for a call this one declines. */
static PyObject *python_path(Fast *self, PyObject *fn, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *stack[8];
    if (nargs > 7) {
        PyErr_SetString(PyExc_TypeError, "too many arguments");
        return NULL;
    }
    PyObject *backend = PyObject_CallNoArgs(self->backend_ref);
    if (!backend) return NULL;
    if (backend == Py_None) {
        Py_DECREF(backend);
        PyErr_SetString(PyExc_ReferenceError, "the registry backend is gone");
        return NULL;
    }
    stack[0] = backend;
    for (Py_ssize_t i = 0; i < nargs; i++) stack[i + 1] = args[i];
    PyObject *out = PyObject_Vectorcall(fn, stack, (size_t)nargs + 1, NULL);
    Py_DECREF(backend);
    return out;
}

enum { FOUND = 1, ABSENT = 0, DECLINE = -1 };

static inline int owner_alive(Fast *self, uint64_t pid, uint64_t start);


static int locate(Fast *self, PyObject *ns, PyObject *service, uint64_t words[8]) {
    Buf key = BUF_INIT(key);
    uint32_t hash, ns_hash;
    int r = encode_key(self, ns, service, &key, &hash, &ns_hash);
    if (r == 1) /* from here to the end of find(): no Python code (see _speedups.c) */
        r = ready(self) ? find(self, (const char *)key.p, (Py_ssize_t)key.len, hash, words)
                        : DECLINE;
    else
        r = DECLINE;
    buf_free(&key);
    PyErr_Clear(); /* out of memory while encoding: the Python path reports it */
    return r;
}

static PyObject *Fast_lookup(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    REQUIRE_INIT(self);
    if (nargs != 2) return python_path(self, self->fallback_lookup, args, nargs);
    uint64_t words[8];
    int r = locate(self, args[0], args[1], words);
    if (r == DECLINE) {
        self->n_declined++;
        return python_path(self, self->fallback_lookup, args, nargs);
    }
    self->n_reads++;
    if (r == ABSENT) Py_RETURN_NONE;
    uint64_t pid = words[SHMREG_S_OWNER] & LO32;
    if (!owner_alive(self, pid, words[SHMREG_S_START])) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(pid);
}

/* (pid, metadata) of the live entry, None, or NULL to decline (no exception set). */
static PyObject *entry(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) return NULL; /* decline: the caller's fallback reports the misuse */
    uint64_t w[8];
    int r = locate(self, args[0], args[1], w);
    if (r == ABSENT) Py_RETURN_NONE;
    if (r == FOUND) {
        uint64_t pid = w[SHMREG_S_OWNER] & LO32;
        if (!owner_alive(self, pid, w[SHMREG_S_START])) Py_RETURN_NONE;
        uint64_t key_len = SHMREG_REC_KEY_LEN(w[SHMREG_S_REC]);
        uint64_t meta_len = w[SHMREG_S_META] & LO32;
        uint64_t off = self->arena_off + SHMREG_REC_OFFSET(w[SHMREG_S_REC]);
        if (off + key_len + meta_len <= self->arena_off + self->arena_size) {
            const uint8_t *rec = self->data + off;
            uint32_t seed = record_seed(pid, w[SHMREG_S_START]);
            if (crc32_seeded(seed, rec, key_len + meta_len) == (uint32_t)(w[SHMREG_S_OWNER] >> 32)) {
                /* The record is checked and, once published, never rewritten: copy it out,
                 * then shared memory is no longer touched (the allocation may run Python). */
                PyObject *raw = PyBytes_FromStringAndSize((const char *)rec + key_len, (Py_ssize_t)meta_len);
                if (!raw) return NULL;
                PyObject *meta = PyObject_CallOneArg(self->unpackb, raw);
                Py_DECREF(raw);
                if (meta && PyDict_CheckExact(meta)) return Py_BuildValue("(KN)", pid, meta);
                Py_XDECREF(meta);
                PyErr_Clear(); /* undecodable: the Python path raises CorruptRegistry */
            }
        }
    }
    return NULL; /* decline */
}

static PyObject *Fast_lookup_with_metadata(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    REQUIRE_INIT(self);
    PyObject *out = entry(self, args, nargs);
    if (out || PyErr_Occurred()) {
        self->n_reads += out != NULL;
        return out;
    }
    self->n_declined++;
    return python_path(self, self->fallback_lookup_meta, args, nargs);
}
