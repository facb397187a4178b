/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * The Fast object and its cached mapping of a Store: reload, mapped, ready, probing. */

/* ------------------------------------------------------------------------ the object */

typedef struct {
    PyObject_HEAD
    PyObject *store;      /* shmreg._engine.store.Store */
    PyObject *namespaces; /* the namespace cache: namespace -> (prefix, crc32, length) */
    PyObject *epoch_obj;  /* Store.remap_epoch, a one-word array */
    PyObject *unpackb;    /* metadata decoder: bytes -> dict */
    PyObject *crash_point;/* shmreg._engine.crashpoints.crash_point, or None when not armed */
    /* The Python path, called when this one declines: the backend class's own functions,
     * called with the backend, which is held weakly (it holds this object: a strong
     * reference back would make every handle a cycle, freed only by the collector). */
    PyObject *backend_ref;
    PyObject *fallback_lookup;
    PyObject *fallback_lookup_meta;
    PyObject *fallback_register;
    PyObject *fallback_register_many;
    PyObject *str_tags;   /* the codec's cache: str -> 32-bit tag */
    PyObject *type_tag;   /* codec.type_tag(metadata), for what the cache cannot answer */
    PyObject *capability_mask; /* codec.capability_mask(metadata), likewise */
    uint64_t max_meta;    /* the registry's max_metadata_bytes */
    PyObject *self_identity; /* identity.self_identity */
    uint64_t self_pid, self_start, identity_forks;
    PyObject *root_path;  /* the root segment's file, for the liveness holder's own mapping */
    uint64_t life_slots;  /* 0: no liveness table (an upgraded registry) or not usable */
    uint64_t life_claim_forks; /* forks_seen when this handle last tried to claim */
    uint64_t n_reads, n_commits, n_scans, n_declined; /* answered here / committed here / scans
                                                      * answered here / handed on */
    struct Claim *claim;  /* this handle's liveness claim (liveness.c.h), or NULL */
    PyObject *table;      /* the Table the cached data pointers belong to */
    /* The root and data views the cached pointers point into, and, while the writer lock
     * is held (pin/unpin), buffer exports of both: a mapping with an export is not
     * unmapped (close() leaves it to the last view), so a close() in another thread while
     * a commit calls into Python cannot pull memory out from under it. Reads need no
     * export: they run no Python code between checking the epoch and their last access. */
    PyObject *root_buf, *data_buf;
    Py_buffer root_view, data_view;
    int pinned;
    int released;         /* release() ran: the store is closing, every call declines */
    const volatile uint64_t *epoch;
    uint64_t seen_epoch;
    uint64_t *root;       /* root words */
    uint8_t *data;        /* data segment */
    uint64_t gen, nslots, arena_off, arena_size;
    int valid;
} Fast;

static PyObject *str_table, *str_buf, *str_rq, *str_nslots, *str_arena_off, *str_arena_size,
    *str_gen;

/* Every method's first line: a Fast made with __new__ alone (or cleared by the collector)
 * has no store to read. */
#define REQUIRE_INIT(self)                                                        \
    do {                                                                          \
        if (!(self)->store) {                                                     \
            PyErr_SetString(PyExc_RuntimeError, "Fast object is not initialised"); \
            return NULL;                                                          \
        }                                                                         \
    } while (0)

static void unpin(Fast *self) {
    if (!self->pinned) return;
    PyBuffer_Release(&self->data_view);
    PyBuffer_Release(&self->root_view);
    self->pinned = 0;
}

/* Exports of both mappings, for the locked section. 0 when the views are gone (closed). */
static int pin(Fast *self) {
    if (self->pinned) return 1;
    if (PyObject_GetBuffer(self->root_buf, &self->root_view, PyBUF_SIMPLE) < 0) goto fail;
    if (PyObject_GetBuffer(self->data_buf, &self->data_view, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&self->root_view);
        goto fail;
    }
    if (self->root_view.buf != (void *)self->root || self->data_view.buf != (void *)self->data) {
        PyBuffer_Release(&self->data_view);
        PyBuffer_Release(&self->root_view);
        goto fail;
    }
    self->pinned = 1;
    return 1;
fail:
    PyErr_Clear();
    return 0;
}

static void drop_views(Fast *self) {
    self->valid = 0;
    unpin(self);
    Py_CLEAR(self->root_buf);
    Py_CLEAR(self->data_buf);
    Py_CLEAR(self->table);
}

/* The address and length of ``obj``'s buffer, without keeping an export. */
static void *buffer_address_len(PyObject *obj, Py_ssize_t *out_len) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    void *p = view.buf;
    *out_len = view.len;
    PyBuffer_Release(&view);
    return p;
}

static int attr_u64(PyObject *obj, PyObject *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return PyErr_Occurred() ? -1 : 0;
}

/* Re-read the Store's current mapping. 0 when usable; -1 (no exception set) when this path
 * must decline: the store is closed, or the Python side has not followed a growth yet. */
static PyObject *str_root;

static int reload(Fast *self) {
    drop_views(self);
    if (self->released) return -1;
    uint64_t epoch = *self->epoch;
    PyObject *root = PyObject_GetAttr(self->store, str_root); /* the root SharedMemory */
    self->root_buf = root ? PyObject_GetAttr(root, str_buf) : NULL;
    Py_XDECREF(root);
    if (!self->root_buf) goto decline;
    Py_ssize_t root_len = 0, data_len = 0;
    self->root = buffer_address_len(self->root_buf, &root_len);
    /* The root must reach past the event ring (every layout has it); the liveness table
     * is used only where the root is long enough for all its slots. */
    if (!self->root || (uint64_t)root_len < SHMREG_LIFE_OFFSET) goto decline;
    self->life_slots = load_relaxed(self->root + SHMREG_R_LIFE_SLOTS);
    if (!life_usable || self->life_slots > (1u << 20) ||
        (uint64_t)root_len < SHMREG_LIFE_OFFSET + self->life_slots * SHMREG_LIFE_SLOT_SIZE)
        self->life_slots = 0;
    PyObject *table = PyObject_GetAttr(self->store, str_table);
    if (!table) goto decline;
    self->table = table;
    self->data_buf = PyObject_GetAttr(table, str_buf);
    if (!self->data_buf) goto decline;
    self->data = buffer_address_len(self->data_buf, &data_len);
    if (!self->data) goto decline;
    if (attr_u64(table, str_gen, &self->gen) || attr_u64(table, str_nslots, &self->nslots) ||
        attr_u64(table, str_arena_off, &self->arena_off) ||
        attr_u64(table, str_arena_size, &self->arena_size) || self->nslots == 0)
        goto decline;
    /* The Table checked these against the segment; check again here, where a wrong value
     * would be a read out of bounds rather than an exception. */
    uint64_t len = (uint64_t)data_len;
    if (len < SHMREG_HEADER_SIZE || self->nslots > (len - SHMREG_HEADER_SIZE) / SHMREG_SLOT_SIZE ||
        self->arena_off < SHMREG_HEADER_SIZE + self->nslots * SHMREG_SLOT_SIZE ||
        self->arena_off > len || self->arena_size > len - self->arena_off)
        goto decline;
    if (*self->epoch != epoch) goto decline; /* a getattr ran Python code that remapped */
    self->seen_epoch = epoch;
    self->valid = 1;
    return 0;
decline:
    PyErr_Clear();
    drop_views(self);
    return -1;
}

/* Pointers usable now (mapped), and the table the root names (ready)? Call with nothing
 * shared in flight. */
static inline int mapped(Fast *self) {
    return (self->valid && *self->epoch == self->seen_epoch) || reload(self) == 0;
}

static inline int ready(Fast *self) {
    return mapped(self) && load_acquire(self->root + SHMREG_R_GEN) == self->gen;
}

static inline uint64_t *slot_at(Fast *self, uint64_t index) {
    return (uint64_t *)(self->data + SHMREG_HEADER_SIZE) + index * SHMREG_SLOT_WORDS;
}

static inline int key_equals(Fast *self, uint64_t w2, const char *key, Py_ssize_t len) {
    uint64_t off = self->arena_off + SHMREG_REC_OFFSET(w2);
    if ((Py_ssize_t)SHMREG_REC_KEY_LEN(w2) != len) return 0;
    /* A damaged offset must not read outside the arena: compare as unequal, as a short
     * slice does in Python. */
    if (off + (uint64_t)len > self->arena_off + self->arena_size) return 0;
    return memcmp(self->data + off, key, (size_t)len) == 0;
}

/* Lock-free probe (table.py find). 1 found (words filled), 0 absent, -1 decline. */
static int find(Fast *self, const char *key, Py_ssize_t len, uint32_t hash, uint64_t words[8]) {
    uint64_t n = self->nslots, i = hash % n;
    for (uint64_t probes = 0; probes < n; probes++) {
        if (!read_slot(slot_at(self, i), words)) return -1;
        /* The state as table.py find reads it: the whole top of the word, so a damaged
         * bit above the state field reads as neither empty nor used (probe on). */
        uint64_t w2 = words[SHMREG_S_REC], state = w2 >> SHMREG_S_STATE_SHIFT;
        if (state == SHMREG_EMPTY) return 0;
        if (state == SHMREG_USED && (words[SHMREG_S_HASH] & LO32) == hash && key_equals(self, w2, key, len))
            return 1;
        if (++i == n) i = 0;
    }
    return 0;
}
