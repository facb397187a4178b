/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Scans: the live entries of one namespace, filtered by type tag and capabilities. */

/* What ShmScans._scan and _entries do with numpy and two msgpack calls, done in one pass:
 *
 * 1. Over shared memory, with no Python code running (see _speedups.c on memory safety):
 *    each slot's words are tested with plain loads first (state, namespace hash, type tag,
 *    capabilities); a candidate is then read under its seqlock, tested again on that copy,
 *    its owner judged (liveness words, else kill(); one verdict per owner run), its record
 *    bounds- and checksum-checked and its key compared with the namespace prefix (two
 *    namespaces may share a hash), and the record copied out with the owner's pid.
 * 2. Over the copies: services and metadata decoded (unpack.c.h) into the result.
 *
 * Anything the Python scan would have to skip, count and log -- a record out of bounds or
 * failing its checksum, a slot that stays odd, bytes that do not decode -- and a table that
 * has moved on (growth) make this return None: the caller runs the Python scan, which alone
 * repairs, counts and logs. So both paths return the same entries, except that this one
 * judges owners as compiled lookups do (a zombie or an exec'd owner is dead). */

enum { SCAN_ENTRIES = 0, SCAN_SERVICES = 1, SCAN_COUNT = 2 };

typedef struct {
    uint64_t pid;
    uint32_t key_len, meta_len;
} ScanRow; /* followed by key_len + meta_len record bytes, padded to 8 */

typedef struct {
    uint64_t pid, start;
    int verdict;
} OwnerMemo;

/* Does a slot (shared words, or a copy of them) hold an entry the scan wants? */
static inline int scan_match(const uint64_t *w, uint32_t ns_hash, int by_type, uint64_t type_tag,
                             uint64_t caps) {
    if (SHMREG_REC_STATE(load_relaxed(w + SHMREG_S_REC)) != SHMREG_USED ||
        (uint32_t)(load_relaxed(w + SHMREG_S_HASH) >> SHMREG_S_NS_HASH_SHIFT) != ns_hash)
        return 0;
    if (by_type) {
        uint64_t tag = SLOT_FIELD(load_relaxed(w + SHMREG_S_META), TYPE_TAG);
        if (tag != type_tag && tag != SHMREG_TYPE_ANY) return 0;
    }
    return !caps || (load_relaxed(w + SHMREG_S_CAPS) & caps) == caps;
}

/* A candidate whose slot passed its tests; its record is read a few candidates later. */
typedef struct {
    uint64_t pid, start, key_len, meta_len, crc;
    const uint8_t *rec;
} Pending;

/* Records lie wherever the arena had room when they were written, so each candidate's
 * record is a cache (and often a TLB) miss: the first read of it took most of a scan's
 * time. Candidates wait in a ring of this many while their records are prefetched, so the
 * misses overlap instead of following one another. */
#define SCAN_AHEAD 16

/* The record checks and the copy out of one candidate. 1 kept or skipped, 0 decline (damage),
 * -1 out of memory. */
static int scan_take(const Pending *c, const uint8_t *prefix, uint64_t prefix_len,
                     int want_records, Buf *out, Py_ssize_t *count) {
    /* A count reads only the namespace from the record, as the Python count does. */
    if (want_records &&
        crc32_seeded(record_seed(c->pid, c->start), c->rec, c->key_len + c->meta_len) != c->crc)
        return 0; /* damaged */
    if (c->key_len < prefix_len) {
        /* Too short for this namespace's key, unless its key length is damaged: the record
         * starting with the prefix all the same is that case, for the Python scan to judge
         * (it compares the record's bytes, whatever the key length says). */
        uint64_t n = c->key_len + c->meta_len < prefix_len ? c->key_len + c->meta_len : prefix_len;
        return memcmp(c->rec, prefix, n) == 0 ? 0 : 1;
    }
    if (memcmp(c->rec, prefix, prefix_len) != 0) return 1;
    ++*count;
    if (!want_records) return 1;
    ScanRow row = {c->pid, (uint32_t)c->key_len, (uint32_t)c->meta_len};
    static const uint8_t pad[8] = {0};
    size_t body = (size_t)(c->key_len + c->meta_len);
    if (put(out, &row, sizeof row) || put(out, c->rec, body) || put(out, pad, (8 - body % 8) % 8))
        return -1;
    return 1;
}

/* Pass 1. 1 done (rows in ``out``, their number in ``*count``), 0 decline, -1 no memory. */
static int scan_collect(Fast *self, const uint8_t *prefix, uint64_t prefix_len, int by_type,
                        uint64_t type_tag, uint64_t caps, int want_records, Buf *out,
                        Py_ssize_t *count) {
    uint32_t ns_hash = crc32_seeded(0, prefix, prefix_len - 1);
    uint64_t arena_end = self->arena_off + self->arena_size;
    OwnerMemo memo[8] = {{0}};
    unsigned memo_next = 0;
    Pending ring[SCAN_AHEAD];
    uint64_t queued = 0, taken = 0;
    *count = 0;
    for (uint64_t i = 0; i < self->nslots; i++) {
        const uint64_t *slot = slot_at(self, i);
        /* The tests on plain loads first, then again on the seqlock-validated copy. A slot
         * being written (odd, or its sequence moved while its words were tested) may hold
         * torn or zero-filled words: only a steady mismatch is skipped. */
        uint64_t s1 = load_acquire(slot);
        if (!(s1 & 1) && !scan_match(slot, ns_hash, by_type, type_tag, caps)) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (load_relaxed(slot) == s1) continue;
        }
        uint64_t w[SHMREG_SLOT_WORDS];
        if (!read_slot(slot, w)) return 0; /* stuck: Python's scan repairs it */
        if (!scan_match(w, ns_hash, by_type, type_tag, caps)) continue;
        uint64_t w2 = w[SHMREG_S_REC];
        uint64_t pid = w[SHMREG_S_OWNER] & LO32, start = w[SHMREG_S_START];
        int verdict = -1;
        for (unsigned m = 0; m < 8; m++)
            if (memo[m].pid == pid && memo[m].start == start && memo[m].verdict >= 0)
                verdict = memo[m].verdict;
        if (verdict < 0) {
            verdict = owner_alive(self, pid, start);
            memo[memo_next++ % 8] = (OwnerMemo){pid, start, verdict};
        }
        if (!verdict) continue;
        uint64_t key_len = SHMREG_REC_KEY_LEN(w2), meta_len = SLOT_FIELD(w[SHMREG_S_META], META_LEN);
        uint64_t off = self->arena_off + SHMREG_REC_OFFSET(w2);
        if (off > arena_end || key_len + meta_len > arena_end - off) return 0; /* damaged */
        /* Published records are never rewritten (and the arena stays mapped: no Python code
         * runs here), so reading this one a few candidates later reads the same bytes. */
        const uint8_t *rec = self->data + off;
        __builtin_prefetch(rec); /* and its last byte: records are 8-aligned, not 64 */
        if (key_len + meta_len > 1) __builtin_prefetch(rec + key_len + meta_len - 1);
        if (queued - taken == SCAN_AHEAD) {
            int r = scan_take(&ring[taken++ % SCAN_AHEAD], prefix, prefix_len, want_records, out,
                              count);
            if (r <= 0) return r;
        }
        ring[queued++ % SCAN_AHEAD] =
            (Pending){pid, start, key_len, meta_len, w[SHMREG_S_OWNER] >> 32, rec};
    }
    while (taken < queued) {
        int r = scan_take(&ring[taken++ % SCAN_AHEAD], prefix, prefix_len, want_records, out, count);
        if (r <= 0) return r;
    }
    return 1;
}

/* A new instance of ``type`` (a tuple subclass with no fields of its own, as a NamedTuple)
 * holding the three items, whose references it takes. */
static PyObject *new_entry(PyTypeObject *type, PyObject *a, PyObject *b, PyObject *c) {
    PyObject *e = type->tp_alloc(type, 3);
    if (!e) {
        Py_DECREF(a);
        Py_DECREF(b);
        Py_DECREF(c);
        return NULL;
    }
    PyTuple_SET_ITEM(e, 0, a);
    PyTuple_SET_ITEM(e, 1, b);
    PyTuple_SET_ITEM(e, 2, c);
    return e;
}

/* Does decoded metadata match every (field, wanted) pair of ``confirm``? codec.select's rule
 * for a wanted value that is not a list: the field equals it, or is a list holding it.
 * 1 yes, 0 no, -1 error (an ``==`` of the caller's value raised). */
static int confirmed(PyObject *md, PyObject *confirm) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(confirm); i++) {
        PyObject *pair = PyTuple_GET_ITEM(confirm, i);
        PyObject *v = PyDict_GetItemWithError(md, PyTuple_GET_ITEM(pair, 0));
        if (!v) return PyErr_Occurred() ? -1 : 0;
        PyObject *wanted = PyTuple_GET_ITEM(pair, 1);
        Py_INCREF(v); /* the comparison may run the caller's code */
        int eq = PyObject_RichCompareBool(v, wanted, Py_EQ);
        if (eq == 0 && PyList_CheckExact(v)) eq = PySequence_Contains(v, wanted);
        Py_DECREF(v);
        if (eq <= 0) return eq;
    }
    return 1;
}

/* Pass 2: the collected rows as Entry tuples (or services), those of entries whose metadata
 * is ``confirmed`` only. No shared memory is read here: the rows are private copies, so the
 * caller's code run by a comparison cannot pull memory out from under this. NULL when a
 * record does not decode (no exception set: decline) or on an error (exception set). */
static PyObject *scan_build(const Buf *rows, Py_ssize_t count, uint64_t prefix_len, int what,
                            PyTypeObject *entry_type, PyObject *confirm) {
    /* Appended to, never pre-sized: the caller's code may run (comparisons) and must never
     * meet a list with empty places in it. */
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    CachedStr *strs = PyMem_Calloc(STR_CACHE_SLOTS, sizeof *strs);
    if (!strs) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    Cursor meta = {.use_list = 1, .strs = strs}, key = {.use_list = 0};
    const uint8_t *p = rows->p;
    for (Py_ssize_t i = 0; i < count; i++) {
        ScanRow row;
        memcpy(&row, p, sizeof row);
        const uint8_t *rec = p + sizeof row;
        size_t body = (size_t)row.key_len + row.meta_len;
        p = rec + body + (8 - body % 8) % 8;
        PyObject *service = unpack_exact(&key, rec + prefix_len, rec + row.key_len);
        if (!service) goto fail;
        if (what == SCAN_SERVICES) {
            int r = PyList_Append(out, service);
            Py_DECREF(service);
            if (r < 0) goto fail;
            continue;
        }
        PyObject *md = unpack_exact(&meta, rec + row.key_len, rec + body);
        PyObject *pid = md ? new_int(&meta, (int64_t)row.pid) : NULL;
        if (!pid || !PyDict_CheckExact(md)) {
            Py_DECREF(service);
            Py_XDECREF(md);
            Py_XDECREF(pid);
            goto fail;
        }
        int keep = confirm ? confirmed(md, confirm) : 1;
        if (keep <= 0) {
            Py_DECREF(service);
            Py_DECREF(md);
            Py_DECREF(pid);
            if (keep < 0) goto fail;
            continue;
        }
        PyObject *e = new_entry(entry_type, service, pid, md);
        if (!e || PyList_Append(out, e) < 0) {
            Py_XDECREF(e);
            goto fail;
        }
        Py_DECREF(e);
    }
    cursor_clear(&meta);
    cursor_clear(&key);
    PyMem_Free(strs);
    return out;
fail:
    cursor_clear(&meta);
    cursor_clear(&key);
    PyMem_Free(strs);
    Py_DECREF(out);
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_MemoryError)) PyErr_Clear();
    return NULL;
}

/* scan(prefix, type_tag, caps, what, entry_type[, confirm]) -> list | int | None. ``prefix``
 * is the checked namespace's key prefix (namespace + NUL); ``type_tag`` None or a tag;
 * ``caps`` a mask (0: any); ``what`` SCAN_ENTRIES, SCAN_SERVICES or SCAN_COUNT; ``confirm``
 * a tuple of (field, wanted) pairs entries must match (see confirmed()). None: declined. */
static PyObject *Fast_scan(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    REQUIRE_INIT(self);
    if (nargs < 5 || nargs > 6 || !PyBytes_Check(args[0]) || !PyLong_Check(args[2]) ||
        !PyLong_Check(args[3]) || !PyType_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "scan(prefix, type_tag, caps, what, entry_type, confirm=())");
        return NULL;
    }
    PyObject *confirm = nargs == 6 ? args[5] : NULL;
    if (confirm) {
        int ok = PyTuple_CheckExact(confirm);
        for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(confirm); i++) {
            PyObject *pair = PyTuple_GET_ITEM(confirm, i);
            ok = PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2;
        }
        if (!ok) {
            PyErr_SetString(PyExc_TypeError, "confirm must be a tuple of (field, wanted) pairs");
            return NULL;
        }
        if (!PyTuple_GET_SIZE(confirm)) confirm = NULL;
    }
    PyTypeObject *entry_type = (PyTypeObject *)args[4];
    if (!PyType_IsSubtype(entry_type, &PyTuple_Type) ||
        entry_type->tp_basicsize != PyTuple_Type.tp_basicsize ||
        entry_type->tp_itemsize != PyTuple_Type.tp_itemsize) {
        PyErr_SetString(PyExc_TypeError, "entry_type must be a plain tuple subclass");
        return NULL;
    }
    int by_type = args[1] != Py_None;
    uint64_t type_tag = by_type ? PyLong_AsUnsignedLongLong(args[1]) : 0;
    uint64_t caps = PyLong_AsUnsignedLongLong(args[2]);
    long what = PyLong_AsLong(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (what < SCAN_ENTRIES || what > SCAN_COUNT) {
        PyErr_SetString(PyExc_ValueError, "what must be 0 (entries), 1 (services) or 2 (count)");
        return NULL;
    }
    Py_ssize_t prefix_len = PyBytes_GET_SIZE(args[0]);
    const uint8_t *prefix = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    if (prefix_len < 2 || prefix[prefix_len - 1] != 0) {
        PyErr_SetString(PyExc_ValueError, "prefix must be a namespace followed by NUL");
        return NULL;
    }
    Buf rows = BUF_INIT(rows);
    Py_ssize_t count = 0;
    /* From ready() to the end of scan_collect: no Python code (see _speedups.c). */
    int r = ready(self) ? scan_collect(self, prefix, (uint64_t)prefix_len, by_type, type_tag, caps,
                                       what != SCAN_COUNT, &rows, &count)
                        : 0;
    PyObject *out = NULL;
    if (r < 0) {
        out = PyErr_NoMemory();
    } else if (r == 0) {
        PyErr_Clear();
    } else if (what == SCAN_COUNT) {
        out = PyLong_FromSsize_t(count);
    } else {
        /* Thousands of dicts and lists, none of which can form a cycle: pause the collector,
         * which would otherwise walk the young generation every few hundred of them. */
        int gc_was_on = PyGC_Disable();
        out = scan_build(&rows, count, (uint64_t)prefix_len, (int)what, entry_type, confirm);
        if (gc_was_on) PyGC_Enable();
    }
    buf_free(&rows);
    if (out) {
        self->n_scans++;
        return out;
    }
    if (PyErr_Occurred()) return NULL;
    self->n_declined++;
    Py_RETURN_NONE;
}
