/* shmreg's compiled fast path: the hot point operations over the same bytes, under the same
 * protocol, as the pure-Python engine (table.py, events.py, backends/_shm.py).
 *
 * Scope, on purpose narrow: a lock-free lookup (pid, or pid + generation + metadata) and the
 * locked part of registering a new name. Anything unusual -- a key not yet in the key cache,
 * a slot that stays odd, a table that must grow, a name already held, damaged bytes, a
 * generation that moved -- returns NotImplemented, and the Python path does the whole
 * operation again from the start. It alone raises errors, repairs, grows and judges
 * takeovers, so the compiled path can never disagree with it on anything but speed.
 *
 * Every layout number comes from _layout.h, generated from layout.py (a test checks that the
 * committed header is what layout.py generates today).
 *
 * Memory safety. Raw pointers into the root and the current data generation are cached. They
 * stay valid while the Store keeps the mapping: Store bumps its remap epoch (a one-word
 * array this object reads through a pointer) whenever it closes or replaces a mapping, and
 * every entry point compares the epoch before touching shared memory. Between that check
 * and the last shared-memory access no Python code runs (no allocation, no call), so no other
 * thread can unmap underneath: the GIL is held throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_layout.h"

/* Slot fields, from the generated header's (word, shift, mask) declarations. */
#define SLOT_FIELD(w, name) (((w) >> SHMREG_S_##name##_SHIFT) & SHMREG_S_##name##_MASK)
#define SHMREG_REC_OFFSET(w2) (SLOT_FIELD(w2, REC_OFFSET) * SHMREG_RECORD_ALIGN)
#define SHMREG_REC_KEY_LEN(w2) SLOT_FIELD(w2, KEY_LEN)
#define SHMREG_REC_STATE(w2) SLOT_FIELD(w2, STATE)
#define SHMREG_LIFE_HOME(pid, n) ((((uint64_t)(pid) * SHMREG_LIFE_HASH_MULT) & 0xFFFFFFFFull) % (n))

/* Not layout but codec and backend rules this path must apply alike; the module exports
 * them and a test compares each with its Python original. */
#define SHMREG_TYPE_ABSENT 0            /* codec.TYPE_ABSENT */
#define SHMREG_TYPE_ANY 0xFFFFFFFFull   /* codec.TYPE_ANY */
#define SHMREG_MAX_METADATA_DEPTH 32    /* codec.MAX_METADATA_DEPTH */
#define SHMREG_MAX_KEY_BYTES 1024       /* codec.MAX_KEY_BYTES */
#define SHMREG_KEY_CACHE_LIMIT 262144   /* backends._shm_base._KEY_CACHE_LIMIT */
#define SHMREG_EVENT_REGISTERED 1       /* events.REGISTERED */

#define LO32 0xFFFFFFFFull
/* glibc keeps a robust mutex's futex word first in pthread_mutex_t (checked at import). */
static int life_usable;

#define SPINS 256
#define LOCK_SPINS 8 /* yields before a busy writer lock is left to Python's blocking wait */ /* seqlock retries before handing the read to Python (which waits, repairs) */

/* ------------------------------------------------------------------------------ crc32 */

/* zlib's crc32 (reflected 0xEDB88320), continuing from a seed as zlib.crc32(data, seed). */
static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = crc_table[0][c & 0xFF] ^ (c >> 8);
            crc_table[t][n] = c;
        }
    }
}

static uint32_t crc32_seeded(uint32_t seed, const uint8_t *p, size_t len) {
    uint32_t c = ~seed;
    while (len >= 8) { /* slicing by 8: records and the journal are tens to hundreds of bytes */
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^
            crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return ~c;
}

/* ------------------------------------------------------------------ shared-memory words */

static inline uint64_t load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* One seqlock-validated copy of a slot (table.py read_slot). 0 if it kept changing. */
static int read_slot(const uint64_t *slot, uint64_t out[SHMREG_SLOT_WORDS]) {
    for (int spin = 0; spin < SPINS; spin++) {
        uint64_t s1 = load_acquire(slot);
        for (int i = 0; i < SHMREG_SLOT_WORDS; i++) out[i] = load_relaxed(slot + i);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (!(s1 & 1) && load_relaxed(slot) == s1) return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ the object */

typedef struct {
    PyObject_HEAD
    PyObject *store;      /* shmreg._engine.store.Store */
    PyObject *keys;       /* the backend's key cache: (namespace, service) -> KeyInfo */
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
    PyObject *pack;       /* metadata encoder (the codec's reused msgpack Packer.pack) */
    PyObject *str_tags;   /* the codec's cache: str -> 32-bit tag */
    PyObject *type_tag;   /* codec.type_tag(metadata), for what the cache cannot answer */
    PyObject *capability_mask; /* codec.capability_mask(metadata), likewise */
    uint64_t max_meta;    /* the registry's max_metadata_bytes */
    PyObject *self_identity; /* identity.self_identity */
    uint64_t self_pid, self_start, identity_forks;
    PyObject *root_path;  /* the root segment's file, for the liveness holder's own mapping */
    uint64_t life_slots;  /* 0: no liveness table (an upgraded registry) or not usable */
    uint64_t life_claim_forks; /* forks_seen when this handle last tried to claim */
    uint64_t n_reads, n_commits, n_declined; /* answered here / committed here / handed on */
    int claimed;
    PyObject *table;      /* the Table the cached data pointers belong to (keeps it mapped) */
    const volatile uint64_t *epoch;
    uint64_t seen_epoch;
    uint64_t *root;       /* root words */
    uint8_t *data;        /* data segment */
    uint64_t gen, nslots, arena_off, arena_size;
    int valid;
} Fast;

static PyObject *str_table, *str_buf, *str_rq, *str_nslots, *str_arena_off, *str_arena_size,
    *str_gen;

static void *buffer_address_len(PyObject *obj, Py_ssize_t *out_len) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    void *p = view.buf;
    Py_ssize_t len = view.len;
    PyBuffer_Release(&view);
    *out_len = len;
    if (len < SHMREG_HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "mapping too small");
        return NULL;
    }
    return p;
}

static void *buffer_address(PyObject *obj) {
    Py_ssize_t len;
    return buffer_address_len(obj, &len);
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
static int reload(Fast *self) {
    self->valid = 0;
    Py_CLEAR(self->table);
    uint64_t epoch = *self->epoch;
    PyObject *rq = PyObject_GetAttr(self->store, str_rq);
    if (!rq) goto decline;
    Py_ssize_t root_len = 0;
    self->root = buffer_address_len(rq, &root_len);
    Py_DECREF(rq);
    if (!self->root) goto decline;
    self->life_slots = load_relaxed(self->root + SHMREG_R_LIFE_SLOTS);
    if (!life_usable || self->life_slots > (1u << 20) ||
        (uint64_t)root_len < SHMREG_LIFE_OFFSET + self->life_slots * SHMREG_LIFE_SLOT_SIZE)
        self->life_slots = 0;
    PyObject *table = PyObject_GetAttr(self->store, str_table);
    if (!table) goto decline;
    PyObject *buf = PyObject_GetAttr(table, str_buf);
    if (!buf) {
        Py_DECREF(table);
        goto decline;
    }
    self->data = buffer_address(buf);
    Py_DECREF(buf);
    if (!self->data || attr_u64(table, str_gen, &self->gen) || attr_u64(table, str_nslots, &self->nslots) ||
        attr_u64(table, str_arena_off, &self->arena_off) ||
        attr_u64(table, str_arena_size, &self->arena_size) || self->nslots == 0) {
        Py_DECREF(table);
        goto decline;
    }
    self->table = table;
    if (*self->epoch != epoch) goto decline; /* a getattr ran Python code that remapped */
    self->seen_epoch = epoch;
    self->valid = 1;
    return 0;
decline:
    PyErr_Clear();
    self->valid = 0;
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
        uint64_t w2 = words[SHMREG_S_REC], state = SHMREG_REC_STATE(w2);
        if (state == SHMREG_EMPTY) return 0;
        if (state == SHMREG_USED && (words[SHMREG_S_HASH] & LO32) == hash && key_equals(self, w2, key, len))
            return 1;
        if (++i == n) i = 0;
    }
    return 0;
}

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
    PyObject *info = cached_key(self, ns, service, 1);
    if (!info) return DECLINE;
    PyObject *key = PyTuple_GET_ITEM(info, 0);
    uint64_t hash = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(info, 1));
    int r = DECLINE;
    if (hash == (uint64_t)-1 && PyErr_Occurred())
        PyErr_Clear();
    else if (ready(self)) /* from here to the end of find(): no Python code (file header) */
        r = find(self, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), (uint32_t)hash, words);
    Py_DECREF(info); /* the key cache (or nothing else) holds it: the bytes were used above */
    return r;
}

static PyObject *Fast_lookup(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
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

/* (pid, generation, metadata) of the live entry, None, or the fallback's answer. */
static PyObject *entry(Fast *self, PyObject *const *args, Py_ssize_t nargs, int with_gen) {
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
            uint32_t seed = (uint32_t)((pid ^ w[SHMREG_S_START] ^ (w[SHMREG_S_START] >> 32)) & LO32);
            if (crc32_seeded(seed, rec, key_len + meta_len) == (uint32_t)(w[SHMREG_S_OWNER] >> 32)) {
                /* The record is checked and, once published, never rewritten: copy it out,
                 * then shared memory is no longer touched (the allocation may run Python). */
                PyObject *raw = PyBytes_FromStringAndSize((const char *)rec + key_len, (Py_ssize_t)meta_len);
                if (!raw) return NULL;
                PyObject *meta = PyObject_CallOneArg(self->unpackb, raw);
                Py_DECREF(raw);
                if (meta && PyDict_CheckExact(meta)) {
                    PyObject *out = with_gen ? Py_BuildValue("(KKN)", pid, w[SHMREG_S_NAMEGEN], meta)
                                             : Py_BuildValue("(KN)", pid, meta);
                    return out;
                }
                Py_XDECREF(meta);
                PyErr_Clear(); /* undecodable: the Python path raises CorruptRegistry */
            }
        }
    }
    return NULL; /* decline */
}

static PyObject *Fast_lookup_with_metadata(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *out = entry(self, args, nargs, 0);
    if (out || PyErr_Occurred()) {
        self->n_reads += out != NULL;
        return out;
    }
    self->n_declined++;
    return python_path(self, self->fallback_lookup_meta, args, nargs);
}

/* entry(namespace, service) -> (pid, generation, metadata) | None | NotImplemented */
static PyObject *Fast_entry(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *out = entry(self, args, nargs, 1);
    if (out || PyErr_Occurred()) return out;
    Py_RETURN_NOTIMPLEMENTED;
}

/* ---------------------------------------------------------------------- writing */

static int crash(Fast *self, const char *point) {
    if (self->crash_point == Py_None) return 0;
    PyObject *r = PyObject_CallFunction(self->crash_point, "s", point);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}
#define CRASH(name)                                         \
    do {                                                    \
        if (crash(self, name) < 0) return (uint64_t)-1;     \
    } while (0)

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* events.py Ring.write */
static void emit(Fast *self, uint64_t seq, uint64_t kind, uint64_t reason, const char *key,
                 Py_ssize_t key_len, uint64_t pid, uint64_t generation, uint64_t start, uint64_t t) {
    uint64_t *ring = self->root + SHMREG_RING_OFFSET / 8;
    uint64_t *e = ring + (seq % SHMREG_RING_EVENTS) * (SHMREG_EVENT_SIZE / 8);
    size_t cut = key_len < SHMREG_KEY_ROOM ? (size_t)key_len : SHMREG_KEY_ROOM;
    store_release(e, 0);
    store_relaxed(e + 1, kind | (reason << 8) | ((uint64_t)cut << 16) | (pid << 32));
    store_relaxed(e + 2, generation);
    store_relaxed(e + 3, t);
    store_relaxed(e + 4, start);
    memcpy((uint8_t *)(e + 5), key, cut);
    store_release(e, seq);
    if (load_relaxed(self->root + SHMREG_R_EVENT_SEQ) < seq) store_release(self->root + SHMREG_R_EVENT_SEQ, seq);
}

/* Commit the registration of a name with no used slot, exactly as _register_locked +
 * Table.commit do, or decline (return 0) before changing anything visible. The caller holds
 * the writer lock and has made sure ready(self). ``w2`` lacks the record offset. Returns the
 * generation, 0 to decline, (uint64_t)-1 with an exception set by a crash point (the owner
 * word stays set: the next writer recovers), or COMMIT_REFUSED with an exception set before
 * anything changed (the arena could not grow: /dev/shm full). */
#define COMMIT_REFUSED ((uint64_t)-2)
static uint64_t commit_new(Fast *self, const char *key, Py_ssize_t key_len, uint32_t hash,
                           const char *record, uint64_t padded, const uint64_t head[5], uint64_t caps) {
    uint64_t *hdr = (uint64_t *)self->data;
    uint64_t top = hdr[SHMREG_D_TOP], live = hdr[SHMREG_D_LIVE], tombs = hdr[SHMREG_D_TOMBS];
    uint64_t garbage = hdr[SHMREG_D_GARBAGE], ops = hdr[SHMREG_D_OPS], owners = hdr[SHMREG_D_NAMEGEN];
    /* table.py counters(): values no writer could produce are Python's to report. */
    if (top > self->arena_size || top % SHMREG_RECORD_ALIGN || live > self->nslots ||
        tombs > self->nslots - live || garbage > top || ops >= SHMREG_COUNTER_LIMIT ||
        owners >= SHMREG_COUNTER_LIMIT)
        return 0;
    /* Growth or a full arena: Python's. */
    if ((double)(live + tombs + 1) > SHMREG_MAX_LOAD * (double)self->nslots ||
        top + padded > self->arena_size || padded % SHMREG_RECORD_ALIGN)
        return 0;
    if (top + padded > load_relaxed(hdr + SHMREG_D_ALLOCATED)) {
        /* The next arena chunk: Table.allocate_to fallocates it (and raises cleanly when
         * /dev/shm is full). It is Python, so the mapping is re-checked afterwards. */
        PyObject *r = PyObject_CallMethod(self->table, "allocate_to", "K",
                                          (unsigned long long)(top + padded));
        if (!r) return (uint64_t)-2;
        Py_DECREF(r);
        if (*self->epoch != self->seen_epoch || !self->valid) return 0;
    }

    /* table.py probe_for_write: the first reusable slot, or the key's own (then decline:
     * an update or a takeover, which Python judges). */
    uint64_t n = self->nslots, i = hash % n, index = UINT64_MAX;
    int reuse_tomb = 0;
    for (uint64_t probes = 0; probes < n; probes++) {
        uint64_t *s = slot_at(self, i);
        uint64_t sw2 = s[SHMREG_S_REC], state = SHMREG_REC_STATE(sw2);
        if (state == SHMREG_EMPTY) {
            if (index == UINT64_MAX) index = i;
            break;
        }
        if (state == SHMREG_TOMB) {
            if (index == UINT64_MAX) {
                index = i;
                reuse_tomb = 1;
            }
        } else if ((s[SHMREG_S_HASH] & LO32) == hash && key_equals(self, sw2, key, key_len)) {
            return 0;
        }
        if (++i == n) i = 0;
    }
    if (index == UINT64_MAX) return 0;
    uint64_t seq = load_relaxed(self->root + SHMREG_R_EVENT_SEQ) + 1;
    if (seq >= SHMREG_COUNTER_LIMIT) return 0;

    tombs -= (uint64_t)reuse_tomb;
    live += 1;
    owners += 1;
    uint64_t generation = owners;
    /* Stage the record above the arena top: unreferenced until the slot is published. */
    memcpy(self->data + self->arena_off + top, record, padded);
    uint64_t body[7] = {head[0], head[1] | (top / SHMREG_RECORD_ALIGN), head[2], head[3], head[4],
                        generation, caps};
    uint64_t counters[6] = {top + padded, live, tombs, garbage, ops + 1, owners};

    /* Table.commit: journal, apply, event, retire. */
    uint64_t *slot = slot_at(self, index);
    uint64_t target = (slot[0] | 1) + 1;
    uint64_t kind = SHMREG_EVENT_REGISTERED, reason = 0;
    uint64_t event = kind | (reason << 8) | (seq << 16);
    uint64_t t = now_ns();
    uint64_t journal[SHMREG_JOURNAL_WORDS];
    journal[0] = index;
    journal[1] = target;
    memcpy(journal + 2, body, sizeof body);
    memcpy(journal + 9, counters, sizeof counters);
    journal[15] = event;
    journal[16] = t;
    CRASH("commit.staged");
    for (int k = 0; k < SHMREG_JOURNAL_WORDS; k++) store_relaxed(hdr + SHMREG_J_SLOT + k, journal[k]);
    store_relaxed(hdr + SHMREG_J_CRC, crc32_seeded(0, (const uint8_t *)journal, sizeof journal));
    store_release(hdr + SHMREG_J_STATE, SHMREG_J_VALID);
    CRASH("commit.journal_valid");
    store_release(slot, target - 1); /* odd: readers retry */
    CRASH("commit.slot_odd");
    for (int k = 0; k < 7; k++) store_relaxed(slot + 1 + k, body[k]);
    CRASH("commit.slot_words");
    for (int k = 0; k < 6; k++) store_relaxed(hdr + SHMREG_D_TOP + k, counters[k]);
    CRASH("commit.counters");
    store_release(slot, target); /* the publish point */
    CRASH("commit.published");
    emit(self, seq, kind, reason, key, key_len, head[3] & LO32, generation, head[4], t);
    CRASH("commit.event_written");
    store_release(hdr + SHMREG_J_STATE, 0);
    CRASH("commit.journal_retired");
    return generation;
}

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
    PyObject *info;   /* owned: the key cache entry; key bytes are its first item */
    PyObject *key;
    uint32_t hash;
    PyObject *record; /* owned: key + packed metadata + padding */
    uint64_t head[5];
    uint64_t caps;
} Prepared;

/* backends/_shm.py _prepare. 1 prepared, 0 decline, -1 error. */
static int prepare(Fast *self, PyObject *ns, PyObject *service, PyObject *owner, PyObject *metadata,
                   Prepared *out) {
    out->record = NULL;
    out->info = NULL;
    if (!PyTuple_Check(owner) || PyTuple_GET_SIZE(owner) < 2) return 0;
    if (metadata != Py_None && !PyDict_CheckExact(metadata)) return 0;
    PyObject *info = cached_key(self, ns, service, 0);
    if (!info) return 0;
    out->info = info;
    uint64_t pid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(owner, 0));
    uint64_t start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(owner, 1));
    uint64_t key_hash = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(info, 1));
    uint64_t ns_hash = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(info, 2));
    if (PyErr_Occurred() || pid == 0 || pid > LO32) {
        PyErr_Clear();
        Py_CLEAR(out->info);
        return 0;
    }
    PyObject *meta = metadata;
    if (meta == Py_None) {
        meta = PyDict_New();
        if (!meta) {
            Py_CLEAR(out->info);
            return -1;
        }
    } else {
        Py_INCREF(meta);
    }
    int result = 0;
    Buf packed = {.p = packed.local, .len = 0, .cap = sizeof packed.local};
    int r = pack_plain(&packed, meta, 0);
    if (r) {
        result = r < 0 ? -1 : 0; /* declined: Python's codec names what cannot be stored */
        if (r < 0) PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t meta_len = (Py_ssize_t)packed.len;
    if ((uint64_t)meta_len > self->max_meta) goto done; /* MetadataTooLarge, from Python */
    uint64_t type_tag, caps;
    if (query_tags(self, meta, &type_tag, &caps) < 0) {
        PyErr_Clear();
        goto done;
    }
    PyObject *key = PyTuple_GET_ITEM(info, 0);
    Py_ssize_t key_len = PyBytes_GET_SIZE(key);
    Py_ssize_t len = key_len + meta_len, padded = (len + SHMREG_RECORD_ALIGN - 1) & ~(Py_ssize_t)(SHMREG_RECORD_ALIGN - 1);
    PyObject *record = PyBytes_FromStringAndSize(NULL, padded);
    if (!record) {
        result = -1;
        goto done;
    }
    char *rec = PyBytes_AS_STRING(record);
    memcpy(rec, PyBytes_AS_STRING(key), (size_t)key_len);
    memcpy(rec + key_len, packed.p, (size_t)meta_len);
    memset(rec + len, 0, (size_t)(padded - len));
    uint32_t seed = (uint32_t)((pid ^ start ^ (start >> 32)) & LO32);
    uint32_t crc = crc32_seeded(seed, (const uint8_t *)rec, (size_t)len);
    out->key = key;
    out->hash = (uint32_t)key_hash;
    out->record = record;
    out->head[0] = (key_hash & LO32) | (ns_hash << 32);
    out->head[1] = ((uint64_t)key_len << 32) | ((uint64_t)SHMREG_USED << 48);
    out->head[2] = (uint64_t)meta_len | (type_tag << 32);
    out->head[3] = pid | ((uint64_t)crc << 32);
    out->head[4] = start;
    out->caps = caps;
    result = 1;
done:
    if (packed.p != packed.local) PyMem_Free(packed.p);
    Py_DECREF(meta);
    if (result != 1) Py_CLEAR(out->info);
    return result;
}

/* ---------------------------------------------------------------------- the lock */

/* This process's identity as Store.begin writes it into the owner words. Cached; a fork
 * bumps forks_seen (pthread_atfork), and the child asks Python again. */
static volatile uint64_t forks_seen = 0;
static void life_after_fork_in_child(void);
static void after_fork_in_child(void) {
    forks_seen++;
    life_after_fork_in_child();
}

static int own_identity(Fast *self) {
    if (self->identity_forks == forks_seen && self->self_pid) return 0;
    PyObject *me = PyObject_CallNoArgs(self->self_identity);
    if (!me) return -1;
    if (!PyTuple_Check(me) || PyTuple_GET_SIZE(me) < 2) {
        Py_DECREF(me);
        PyErr_SetString(PyExc_TypeError, "self_identity() must return (pid, start_ticks, ...)");
        return -1;
    }
    self->self_pid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(me, 0));
    self->self_start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(me, 1));
    Py_DECREF(me);
    if (PyErr_Occurred()) {
        self->self_pid = 0;
        return -1;
    }
    self->identity_forks = forks_seen;
    return 0;
}

static inline pthread_mutex_t *writer_mutex(Fast *self) {
    return (pthread_mutex_t *)((uint8_t *)self->root + SHMREG_R_MUTEX_OFFSET);
}

/* Store.begin's fast case: the lock free, no dead writer to recover after, the generation
 * this object maps. 1 locked, 0 decline (Python's begin() then waits, recovers, follows a
 * growth, reports damage), -1 error. Never blocks, so the GIL is never given up while raw
 * pointers are in use. Call only when ready(self). */
static int lock(Fast *self) {
    pthread_mutex_t *m = writer_mutex(self);
    int rc = pthread_mutex_trylock(m);
    /* Another writer inside: commits take well under a microsecond, so wait briefly
     * (yielding the CPU: on a busy machine the holder may need it) before handing the
     * call to Python's blocking acquire. */
    for (int spin = 0; rc == EBUSY && spin < LOCK_SPINS; spin++) {
        sched_yield();
        rc = pthread_mutex_trylock(m);
    }
    if (rc == EOWNERDEAD) {
        /* The holder died. The mutex is ours and made consistent; what the holder left
         * half-done is found below through the owner words, and repaired by Python. */
        rc = pthread_mutex_consistent(m);
        if (rc) {
            pthread_mutex_unlock(m);
            return 0;
        }
    }
    if (rc) return 0;
    if (load_relaxed(self->root + SHMREG_R_OWNER_PID) != 0 ||
        load_relaxed(self->root + SHMREG_R_GEN) != self->gen) {
        pthread_mutex_unlock(m);
        return 0;
    }
    store_relaxed(self->root + SHMREG_R_OWNER_START, self->self_start);
    store_release(self->root + SHMREG_R_OWNER_PID, self->self_pid);
    if (crash(self, "lock.owner_set") < 0) {
        pthread_mutex_unlock(m); /* owner word left set: the next writer recovers */
        return -1;
    }
    return 1;
}

/* Store.end. After an error the owner word stays set, so the next writer (Python's begin)
 * repairs whatever the interrupted commit left, from its journal. */
static void unlock(Fast *self, int failed) {
    if (!failed) store_release(self->root + SHMREG_R_OWNER_PID, 0);
    pthread_mutex_unlock(writer_mutex(self));
}

/* ------------------------------------------------------------------ liveness words
 *
 * kill(pid, 0) costs ~0.5 us here, more than the rest of a lookup. A process that registers
 * through this path claims a slot in the root's liveness table (layout.py describes it) and
 * has a thread of its own hold that slot's robust mutex until the process ends; the kernel
 * then marks the futex word OWNER_DIED (at exit and at exec). A reader compares pid and
 * start ticks under the slot's sequence word and reads the futex word: OWNER_DIED is a
 * death, a thread id is a live holder, anything else is "unknown" and kill() decides.
 *
 * The holder maps the root segment itself and keeps that mapping until it has unlocked: a
 * held robust mutex in unmapped memory would stop the kernel's walk of the holder's robust
 * list at exit, and later mutexes on it would never be marked.
 */
#define LIFE_PROBES 32 /* a reader gives up (and asks kill) after this many slots */


typedef struct Claim {
    char path[512];
    uint8_t *map;
    size_t len;
    pthread_mutex_t *mutex;
    int refs;
    struct Claim *next;
} Claim;

static Claim *claims; /* this process's claims; touched with the GIL held */

/* The holder thread, one per process, started on the first claim. */
static pthread_mutex_t holder_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t holder_cond = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t *holder_request; /* mutex to lock (op 1) or unlock (op 2) */
static int holder_op, holder_rc, holder_started;
static uint64_t holder_served, holder_asked;

static void *holder_main(void *unused) {
    (void)unused;
    pthread_mutex_lock(&holder_lock);
    for (;;) {
        while (holder_served == holder_asked) pthread_cond_wait(&holder_cond, &holder_lock);
        int rc;
        if (holder_op == 1) {
            /* trylock: the claimer just initialised this mutex under the writer lock, so it
             * is free; if damage says otherwise, the claim fails rather than wait (the
             * claimer holds the writer lock). */
            rc = pthread_mutex_trylock(holder_request);
            if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(holder_request);
        } else {
            rc = pthread_mutex_unlock(holder_request);
        }
        holder_rc = rc;
        holder_served = holder_asked;
        pthread_cond_broadcast(&holder_cond);
    }
    return NULL;
}

/* Have the holder thread lock (1) or unlock (2) ``m``; its pthread result. */
static int holder_do(pthread_mutex_t *m, int op) {
    pthread_mutex_lock(&holder_lock);
    if (!holder_started) {
        pthread_attr_t attr;
        pthread_t t;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        int rc = pthread_create(&t, &attr, holder_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc) {
            pthread_mutex_unlock(&holder_lock);
            return rc;
        }
        holder_started = 1;
    }
    holder_request = m;
    holder_op = op;
    uint64_t ticket = ++holder_asked;
    pthread_cond_broadcast(&holder_cond);
    while (holder_served < ticket) pthread_cond_wait(&holder_cond, &holder_lock);
    int rc = holder_rc;
    pthread_mutex_unlock(&holder_lock);
    return rc;
}

static void life_after_fork_in_child(void) {
    /* The holder thread and its holds stayed with the parent; so do the claims. The
     * mappings copied into this child are dropped (they hold nothing here). */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    holder_lock = fresh;
    holder_cond = fresh_cond;
    holder_started = 0;
    holder_served = holder_asked = 0;
    for (Claim *c = claims, *next; c; c = next) {
        next = c->next;
        munmap(c->map, c->len);
        free(c);
    }
    claims = NULL;
}

static inline uint64_t *life_slot(uint8_t *root, uint64_t i) {
    return (uint64_t *)(root + SHMREG_LIFE_OFFSET + i * SHMREG_LIFE_SLOT_SIZE);
}

static inline uint32_t futex_word(const uint64_t *slot) {
    return __atomic_load_n((const uint32_t *)((const uint8_t *)slot + SHMREG_LIFE_MUTEX_AT),
                           __ATOMIC_RELAXED);
}

/* 1 alive, 0 dead, -1 unknown: the reader's question, answered from memory. */
static int life_verdict(Fast *self, uint64_t pid, uint64_t start) {
    uint64_t n = self->life_slots;
    if (!n) return -1;
    uint64_t home = SHMREG_LIFE_HOME(pid, n);
    for (uint64_t k = 0; k < n && k < LIFE_PROBES; k++) {
        const uint64_t *slot = life_slot((uint8_t *)self->root, (home + k) % n);
        uint64_t s1 = load_acquire(slot + SHMREG_LIFE_SEQ);
        if (s1 & 1) return -1; /* being claimed */
        uint64_t p = load_relaxed(slot + SHMREG_LIFE_PID), st = load_relaxed(slot + SHMREG_LIFE_START);
        uint32_t word = futex_word(slot);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (load_relaxed(slot + SHMREG_LIFE_SEQ) != s1) return -1;
        if (!s1 && !p) return -1; /* never used: the end of the chain */
        if (p == pid && st == start) {
            if (word & SHMREG_FUTEX_OWNER_DIED) return 0;
            return (word & SHMREG_FUTEX_TID_MASK) ? 1 : -1;
        }
    }
    return -1;
}

static inline int owner_alive(Fast *self, uint64_t pid, uint64_t start) {
    if (pid == 0 || pid > INT_MAX) return 0;
    int v = life_verdict(self, pid, start);
    return v >= 0 ? v : alive(pid);
}

/* Claim this process's slot in the registry's table (caller holds the writer lock and
 * registers for its own pid). Best effort: on any failure lookups just ask kill(). */
static void life_claim(Fast *self) {
    if (!life_usable || !self->life_slots || self->life_claim_forks == forks_seen) return;
    self->life_claim_forks = forks_seen; /* one attempt per process per handle */
    const char *path = PyUnicode_AsUTF8(self->root_path);
    if (!path) {
        PyErr_Clear();
        return;
    }
    for (Claim *c = claims; c; c = c->next) {
        if (!strcmp(c->path, path)) {
            c->refs++;
            self->claimed = 1;
            return;
        }
    }
    size_t len = SHMREG_LIFE_OFFSET + self->life_slots * SHMREG_LIFE_SLOT_SIZE;
    if (strlen(path) >= sizeof(((Claim *)0)->path)) return;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st;
    uint8_t *map = MAP_FAILED;
    if (!fstat(fd, &st) && (size_t)st.st_size >= len)
        map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return;
    uint64_t n = self->life_slots, pid = self->self_pid, start = self->self_start;
    uint64_t home = SHMREG_LIFE_HOME(pid, n), chosen = UINT64_MAX;
    for (uint64_t k = 0; k < n && k < LIFE_PROBES; k++) {
        uint64_t i = (home + k) % n, *slot = life_slot(map, i);
        uint32_t word = futex_word(slot);
        /* Free: never used, released (word 0), or its holder died. A slot that still names
         * a live thread belongs to a live process, never taken over. */
        if (!(word & SHMREG_FUTEX_TID_MASK) || (word & SHMREG_FUTEX_OWNER_DIED)) {
            chosen = i;
            break;
        }
    }
    if (chosen == UINT64_MAX) {
        munmap(map, len);
        return;
    }
    uint64_t *slot = life_slot(map, chosen);
    pthread_mutex_t *m = (pthread_mutex_t *)((uint8_t *)slot + SHMREG_LIFE_MUTEX_AT);
    uint64_t seq = load_relaxed(slot + SHMREG_LIFE_SEQ);
    store_release(slot + SHMREG_LIFE_SEQ, seq | 1);
    store_relaxed(slot + SHMREG_LIFE_PID, pid);
    store_relaxed(slot + SHMREG_LIFE_START, start);
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(m, &attr);
    pthread_mutexattr_destroy(&attr);
    store_release(slot + SHMREG_LIFE_SEQ, (seq | 1) + 1);
    if (!rc) rc = holder_do(m, 1);
    if (rc) {
        munmap(map, len); /* nothing held: the word stays 0, "unknown" */
        return;
    }
    Claim *c = calloc(1, sizeof *c);
    if (!c) return; /* held until exit, unreleased: harmless */
    strcpy(c->path, path);
    c->map = map;
    c->len = len;
    c->mutex = m;
    c->refs = 1;
    c->next = claims;
    claims = c;
    self->claimed = 1;
}

/* Let go of this handle's claim; the last handle to the registry unlocks and unmaps. */
static void life_release(Fast *self) {
    if (!self->claimed) return;
    self->claimed = 0;
    if (self->life_claim_forks != forks_seen) return; /* claimed by the parent */
    const char *path = self->root_path ? PyUnicode_AsUTF8(self->root_path) : NULL;
    if (!path) {
        PyErr_Clear();
        return;
    }
    for (Claim **pc = &claims; *pc; pc = &(*pc)->next) {
        Claim *c = *pc;
        if (strcmp(c->path, path)) continue;
        if (--c->refs > 0) return;
        *pc = c->next;
        if (!holder_do(c->mutex, 2)) munmap(c->map, c->len);
        /* An unlock that failed leaves the mapping: a held mutex must stay mapped. */
        free(c);
        return;
    }
}

static void life_probe_layout(void) {
    /* glibc keeps the futex word (owner tid) in the first int of pthread_mutex_t on every
     * architecture; verify here, so another libc falls back to kill() rather than guess. */
    pthread_mutex_t m;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (pthread_mutex_init(&m, &attr)) return;
    pthread_mutexattr_destroy(&attr);
    if (pthread_mutex_lock(&m)) return;
    uint32_t word;
    memcpy(&word, &m, sizeof word);
    life_usable = (word & SHMREG_FUTEX_TID_MASK) == (uint32_t)syscall(SYS_gettid);
    pthread_mutex_unlock(&m);
    pthread_mutex_destroy(&m);
}

/* register(namespace, service, owner, metadata) -> generation (the Python path answers what
 * this declines: a new key to encode, metadata to check, a name already held, growth). */
static PyObject *Fast_register(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) return python_path(self, self->fallback_register, args, nargs);
    Prepared p;
    int r = prepare(self, args[0], args[1], args[2], args[3], &p);
    if (r < 0) return NULL;
    if (r == 0) {
        self->n_declined++;
        return python_path(self, self->fallback_register, args, nargs);
    }
    uint64_t generation = 0;
    int locked = own_identity(self) < 0 ? -1 : ready(self) ? lock(self) : 0;
    if (locked == 1 && (p.head[3] & LO32) == self->self_pid && p.head[4] == self->self_start)
        life_claim(self); /* registering for itself: let readers skip kill() for this pid */
    if (locked == 1) { /* lock() to unlock(): no Python code but crash points, allocation */
        generation = commit_new(self, PyBytes_AS_STRING(p.key), PyBytes_GET_SIZE(p.key), p.hash,
                                PyBytes_AS_STRING(p.record), (uint64_t)PyBytes_GET_SIZE(p.record),
                                p.head, p.caps);
        unlock(self, generation == (uint64_t)-1);
    }
    Py_DECREF(p.record);
    Py_DECREF(p.info);
    if (locked < 0 || generation == (uint64_t)-1 || generation == COMMIT_REFUSED) return NULL;
    if (generation == 0) {
        self->n_declined++;
        return python_path(self, self->fallback_register, args, nargs);
    }
    self->n_commits++;
    return PyLong_FromUnsignedLongLong(generation);
}

/* register_many(namespace, items) -> [generation, ...] for (service, owner, metadata) items.
 *
 * Prepared in full before the lock (any item this path cannot prepare sends the whole batch
 * to Python, before anything changed); then committed one by one under one hold of the
 * lock. An item it declines there (a held name, growth) ends its share: Python registers
 * that item and the rest, as a sequence of registrations would. */
static PyObject *Fast_register_many(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_CheckExact(args[1]))
        return python_path(self, self->fallback_register_many, args, nargs);
    PyObject *items = args[1];
    Py_ssize_t n = PyList_GET_SIZE(items), done = 0;
    if (n == 0) return PyList_New(0);
    Prepared *prep = PyMem_Calloc((size_t)n, sizeof *prep);
    if (!prep) return PyErr_NoMemory();
    PyObject *out = NULL;
    int r = 1, claim = 0;
    for (Py_ssize_t i = 0; i < n && r == 1; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3) {
            r = 0;
            break;
        }
        r = prepare(self, args[0], PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1),
                    PyTuple_GET_ITEM(item, 2), &prep[i]);
    }
    if (r < 0) goto cleanup;
    out = PyList_New(n);
    if (!out) goto cleanup;
    if (r == 0) { /* something to check or encode the Python way: the whole batch */
        self->n_declined++;
        PyObject *gens = python_path(self, self->fallback_register_many, args, nargs);
        Py_DECREF(out);
        out = gens;
        goto cleanup;
    }
    if (own_identity(self) < 0) {
        Py_CLEAR(out);
        goto cleanup;
    }
    for (Py_ssize_t i = 0; i < n && !claim; i++)
        claim = (prep[i].head[3] & LO32) == self->self_pid && prep[i].head[4] == self->self_start;
    while (done < n) {
        int locked = ready(self) ? lock(self) : 0;
        if (locked < 0) {
            Py_CLEAR(out);
            goto cleanup;
        }
        uint64_t generation = 0;
        if (locked == 1) {
            if (claim) life_claim(self);
            for (; done < n; done++) {
                Prepared *p = &prep[done];
                generation = commit_new(self, PyBytes_AS_STRING(p->key), PyBytes_GET_SIZE(p->key),
                                        p->hash, PyBytes_AS_STRING(p->record),
                                        (uint64_t)PyBytes_GET_SIZE(p->record), p->head, p->caps);
                if (generation == 0 || generation >= COMMIT_REFUSED) break;
                PyList_SET_ITEM(out, done, PyLong_FromUnsignedLongLong(generation));
                self->n_commits++;
            }
            unlock(self, generation == (uint64_t)-1);
            if (generation >= COMMIT_REFUSED) { /* the list's NULL items are skipped on free */
                Py_CLEAR(out);
                goto cleanup;
            }
        }
        if (done < n) { /* this item the Python way (a held name, growth, a busy lock) */
            self->n_declined++;
            PyObject *item = PyList_GET_ITEM(items, done);
            PyObject *call[4] = {args[0], PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1),
                                 PyTuple_GET_ITEM(item, 2)};
            PyObject *gen = python_path(self, self->fallback_register, call, 4);
            if (!gen) {
                Py_CLEAR(out);
                goto cleanup;
            }
            PyList_SET_ITEM(out, done, gen);
            done++;
        }
    }
cleanup:
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(prep[i].record);
        Py_XDECREF(prep[i].info);
    }
    PyMem_Free(prep);
    return out;
}

/* --------------------------------------------------------------------- boilerplate */

static int Fast_init(Fast *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"store", "keys", "epoch", "unpackb", "crash_point", "lookup",
                            "lookup_with_metadata", "register", "pack", "str_tags", "type_tag",
                            "capability_mask", "max_metadata_bytes", "namespaces", "self_identity",
                            "root_path", "backend", "register_many", NULL};
    PyObject *store, *keys, *epoch, *unpackb, *crash_point, *lookup, *lookup_meta, *reg, *pack,
        *str_tags, *type_tag, *capability_mask, *namespaces, *self_identity, *root_path,
        *backend_ref, *reg_many;
    unsigned long long max_meta;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OOOOOOOO!OOKO!OUOO", names, &store, &PyDict_Type,
                                     &keys, &epoch, &unpackb, &crash_point, &lookup, &lookup_meta,
                                     &reg, &pack, &PyDict_Type, &str_tags, &type_tag,
                                     &capability_mask, &max_meta, &PyDict_Type, &namespaces,
                                     &self_identity, &root_path, &backend_ref, &reg_many))
        return -1;
    Py_buffer view;
    if (PyObject_GetBuffer(epoch, &view, PyBUF_WRITABLE) < 0) return -1;
    int ok = view.len >= 8 && ((uintptr_t)view.buf % 8) == 0;
    const volatile uint64_t *p = view.buf;
    PyBuffer_Release(&view); /* the array is kept alive below and never resized */
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "epoch must be an 8-byte aligned word");
        return -1;
    }
    Py_INCREF(store); Py_XSETREF(self->store, store);
    Py_INCREF(keys); Py_XSETREF(self->keys, keys);
    Py_INCREF(epoch); Py_XSETREF(self->epoch_obj, epoch);
    Py_INCREF(unpackb); Py_XSETREF(self->unpackb, unpackb);
    Py_INCREF(crash_point); Py_XSETREF(self->crash_point, crash_point);
    if (!PyWeakref_CheckRef(backend_ref)) {
        PyErr_SetString(PyExc_TypeError, "backend must be a weakref.ref");
        return -1;
    }
    Py_INCREF(backend_ref); Py_XSETREF(self->backend_ref, backend_ref);
    Py_INCREF(lookup); Py_XSETREF(self->fallback_lookup, lookup);
    Py_INCREF(lookup_meta); Py_XSETREF(self->fallback_lookup_meta, lookup_meta);
    Py_INCREF(reg); Py_XSETREF(self->fallback_register, reg);
    Py_INCREF(reg_many); Py_XSETREF(self->fallback_register_many, reg_many);
    Py_INCREF(pack); Py_XSETREF(self->pack, pack);
    Py_INCREF(str_tags); Py_XSETREF(self->str_tags, str_tags);
    Py_INCREF(type_tag); Py_XSETREF(self->type_tag, type_tag);
    Py_INCREF(capability_mask); Py_XSETREF(self->capability_mask, capability_mask);
    self->max_meta = max_meta;
    Py_INCREF(namespaces); Py_XSETREF(self->namespaces, namespaces);
    Py_INCREF(self_identity); Py_XSETREF(self->self_identity, self_identity);
    Py_INCREF(root_path); Py_XSETREF(self->root_path, root_path);
    self->life_claim_forks = UINT64_MAX;
    self->claimed = 0;
    self->self_pid = 0;
    self->epoch = p;
    self->valid = 0;
    return 0;
}

static int Fast_traverse(Fast *self, visitproc visit, void *arg) {
    Py_VISIT(self->store);
    Py_VISIT(self->keys);
    Py_VISIT(self->epoch_obj);
    Py_VISIT(self->unpackb);
    Py_VISIT(self->crash_point);
    Py_VISIT(self->backend_ref);
    Py_VISIT(self->fallback_lookup);
    Py_VISIT(self->fallback_lookup_meta);
    Py_VISIT(self->fallback_register);
    Py_VISIT(self->fallback_register_many);
    Py_VISIT(self->pack);
    Py_VISIT(self->str_tags);
    Py_VISIT(self->type_tag);
    Py_VISIT(self->capability_mask);
    Py_VISIT(self->namespaces);
    Py_VISIT(self->self_identity);
    Py_VISIT(self->table);
    return 0;
}

static int Fast_clear(Fast *self) {
    self->valid = 0;
    Py_CLEAR(self->store);
    Py_CLEAR(self->keys);
    Py_CLEAR(self->unpackb);
    Py_CLEAR(self->crash_point);
    Py_CLEAR(self->backend_ref);
    Py_CLEAR(self->fallback_lookup);
    Py_CLEAR(self->fallback_lookup_meta);
    Py_CLEAR(self->fallback_register);
    Py_CLEAR(self->fallback_register_many);
    Py_CLEAR(self->pack);
    Py_CLEAR(self->str_tags);
    Py_CLEAR(self->type_tag);
    Py_CLEAR(self->capability_mask);
    Py_CLEAR(self->namespaces);
    Py_CLEAR(self->self_identity);
    Py_CLEAR(self->root_path);
    Py_CLEAR(self->table);
    /* epoch_obj last: self->epoch points into it. */
    Py_CLEAR(self->epoch_obj);
    return 0;
}

static void Fast_dealloc(Fast *self) {
    PyObject_GC_UnTrack(self);
    life_release(self);
    Fast_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Fast_release(Fast *self, PyObject *unused) {
    (void)unused;
    life_release(self);
    self->valid = 0;
    Py_CLEAR(self->table);
    Py_RETURN_NONE;
}

static PyObject *Fast_invalidate(Fast *self, PyObject *unused) {
    (void)unused;
    self->valid = 0;
    Py_CLEAR(self->table);
    Py_RETURN_NONE;
}

static PyObject *Fast_life_verdict(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "life_verdict(pid, start_ticks)");
        return NULL;
    }
    uint64_t pid = PyLong_AsUnsignedLongLong(args[0]), start = PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (!mapped(self)) return PyLong_FromLong(-1); /* the root alone: any generation will do */
    return PyLong_FromLong(life_verdict(self, pid, start));
}

/* claim(owner): the caller (Python's register path) holds the writer lock and registers
 * for ``owner``; when that is this process, claim its liveness slot as Fast_register does. */
static PyObject *Fast_claim(Fast *self, PyObject *owner) {
    if (!PyTuple_Check(owner) || PyTuple_GET_SIZE(owner) < 2) Py_RETURN_NONE;
    if (own_identity(self) < 0) return NULL;
    uint64_t pid = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(owner, 0));
    uint64_t start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(owner, 1));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (pid == self->self_pid && start == self->self_start && ready(self)) life_claim(self);
    Py_RETURN_NONE;
}

static PyObject *Fast_counts(Fast *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("{sKsKsK}", "reads", self->n_reads, "commits", self->n_commits,
                         "declined", self->n_declined);
}

static PyMethodDef Fast_methods[] = {
    {"counts", (PyCFunction)Fast_counts, METH_NOARGS,
     "{'reads', 'commits', 'declined'}: calls this handle answered here or handed to Python"},
    {"claim", (PyCFunction)Fast_claim, METH_O,
     "claim(owner): with the writer lock held, claim this process's liveness slot"},
    {"lookup", (PyCFunction)(void (*)(void))Fast_lookup, METH_FASTCALL,
     "lookup(namespace, service) -> pid | None (the Python path answers what this declines)"},
    {"lookup_with_metadata", (PyCFunction)(void (*)(void))Fast_lookup_with_metadata, METH_FASTCALL,
     "lookup_with_metadata(namespace, service) -> (pid, metadata) | None"},
    {"entry", (PyCFunction)(void (*)(void))Fast_entry, METH_FASTCALL,
     "entry(namespace, service) -> (pid, generation, metadata) | None | NotImplemented"},
    {"register_many", (PyCFunction)(void (*)(void))Fast_register_many, METH_FASTCALL,
     "register_many(namespace, [(service, owner, metadata), ...]) -> [generation, ...]"},
    {"register", (PyCFunction)(void (*)(void))Fast_register, METH_FASTCALL,
     "register(namespace, service, owner, metadata) -> generation"},
    {"invalidate", (PyCFunction)Fast_invalidate, METH_NOARGS, "forget the cached mapping"},
    {"release", (PyCFunction)Fast_release, METH_NOARGS,
     "before the store closes: give up this handle's liveness claim and cached mapping"},
    {"life_verdict", (PyCFunction)(void (*)(void))Fast_life_verdict, METH_FASTCALL,
     "life_verdict(pid, start_ticks) -> 1 alive, 0 dead, -1 unknown (for tests and fsck)"},
    {NULL}};

static PyTypeObject FastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreg._engine._speedups.Fast",
    .tp_basicsize = sizeof(Fast),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Compiled point reads and registrations over one Store's shared memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Fast_init,
    .tp_dealloc = (destructor)Fast_dealloc,
    .tp_traverse = (traverseproc)Fast_traverse,
    .tp_clear = (inquiry)Fast_clear,
    .tp_methods = Fast_methods,
};

static PyObject *py_crc32(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer view;
    unsigned long seed = 0;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "crc32(data, seed=0)");
        return NULL;
    }
    if (nargs == 2) {
        seed = PyLong_AsUnsignedLong(args[1]);
        if (PyErr_Occurred()) return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t c = crc32_seeded((uint32_t)seed, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* ------------------------------------------------------------ counted point reads
 *
 * _opmetrics.py's read wrapper in C (the same figures; the Python one adds ~0.2 us to a
 * 0.3 us lookup): every call counted in blocks of ``every``, the one call per block timed
 * into the OpStats histogram, errors counted by exception type through ``stats.failed``. */
typedef struct {
    PyObject_HEAD
    PyObject *fn, *stats;
    long every, left;
    int first_shift, nbuckets;
    vectorcallfunc vectorcall;
} Counted;

static PyObject *str_calls, *str_buckets, *str_sum_ns, *str_failed;

static int add_to_attr_int(PyObject *obj, PyObject *name, long long n) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) return -1;
    PyObject *d = PyLong_FromLongLong(n);
    PyObject *sum = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    if (!sum) return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

static int add_to_list_item(PyObject *obj, PyObject *name, Py_ssize_t i, long long n) {
    PyObject *list = PyObject_GetAttr(obj, name);
    if (!list) return -1;
    int r = -1;
    if (PyList_Check(list) && i < PyList_GET_SIZE(list)) {
        PyObject *d = PyLong_FromLongLong(n);
        PyObject *sum = d ? PyNumber_Add(PyList_GET_ITEM(list, i), d) : NULL;
        Py_XDECREF(d);
        if (sum) r = PyList_SetItem(list, i, sum); /* steals sum */
    } else {
        PyErr_SetString(PyExc_TypeError, "OpStats list too short");
    }
    Py_DECREF(list);
    return r;
}

static void count_failure(Counted *self) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *r = value ? PyObject_CallMethodOneArg(self->stats, str_failed, value) : NULL;
    if (!r) PyErr_Clear(); /* counting must never replace the caller's exception */
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
}

static PyObject *Counted_call(Counted *self, PyObject *const *args, size_t nargsf, PyObject *kw) {
    if (--self->left) {
        PyObject *out = PyObject_Vectorcall(self->fn, args, nargsf, kw);
        if (!out) count_failure(self);
        return out;
    }
    self->left = self->every;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    PyObject *out = PyObject_Vectorcall(self->fn, args, nargsf, kw);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!out) count_failure(self);
    long long ns = (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    if (ns < 0) ns = 0;
    int bucket = 0;
    for (unsigned long long v = (unsigned long long)ns >> self->first_shift; v; v >>= 1) bucket++;
    if (bucket > self->nbuckets - 1) bucket = self->nbuckets - 1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb); /* keep the read's own exception, if any */
    if (add_to_attr_int(self->stats, str_calls, self->every) < 0 ||
        add_to_list_item(self->stats, str_sum_ns, 0, ns) < 0 ||
        add_to_list_item(self->stats, str_buckets, bucket, 1) < 0)
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
    return out;
}

static int Counted_init(Counted *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"fn", "stats", "every", "first_shift", "nbuckets", NULL};
    PyObject *fn, *stats;
    long every;
    int first_shift, nbuckets;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOlii", names, &fn, &stats, &every,
                                     &first_shift, &nbuckets))
        return -1;
    if (every < 1 || nbuckets < 1 || first_shift < 0 || first_shift > 62) {
        PyErr_SetString(PyExc_ValueError, "every >= 1, nbuckets >= 1, 0 <= first_shift <= 62");
        return -1;
    }
    Py_INCREF(fn); Py_XSETREF(self->fn, fn);
    Py_INCREF(stats); Py_XSETREF(self->stats, stats);
    self->every = self->left = every;
    self->first_shift = first_shift;
    self->nbuckets = nbuckets;
    self->vectorcall = (vectorcallfunc)Counted_call;
    return 0;
}

static PyObject *Counted_pending(Counted *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(self->every - self->left);
}

static int Counted_traverse(Counted *self, visitproc visit, void *arg) {
    Py_VISIT(self->fn);
    Py_VISIT(self->stats);
    return 0;
}

static int Counted_clear(Counted *self) {
    Py_CLEAR(self->fn);
    Py_CLEAR(self->stats);
    return 0;
}

static void Counted_dealloc(Counted *self) {
    PyObject_GC_UnTrack(self);
    Counted_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Counted_methods[] = {
    {"pending", (PyCFunction)Counted_pending, METH_NOARGS, "calls of the current block so far"},
    {NULL}};

static PyTypeObject CountedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreg._engine._speedups.Counted",
    .tp_basicsize = sizeof(Counted),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A point read counted and sampled into an OpStats (see shmreg._opmetrics).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counted_init,
    .tp_dealloc = (destructor)Counted_dealloc,
    .tp_traverse = (traverseproc)Counted_traverse,
    .tp_clear = (inquiry)Counted_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Counted, vectorcall),
    .tp_methods = Counted_methods,
};

static PyObject *py_pack(PyObject *mod, PyObject *obj) {
    (void)mod;
    Buf b = {.p = b.local, .len = 0, .cap = sizeof b.local};
    int r = pack_plain(&b, obj, 0);
    PyObject *out = r < 0 ? PyErr_NoMemory()
                    : r   ? Py_NewRef(Py_None)
                          : PyBytes_FromStringAndSize((const char *)b.p, (Py_ssize_t)b.len);
    if (b.p != b.local) PyMem_Free(b.p);
    return out;
}

static PyMethodDef module_methods[] = {
    {"pack", (PyCFunction)py_pack, METH_O,
     "pack(value) -> msgpack bytes as the compiled path writes them, or None where it declines"},
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_FASTCALL,
     "crc32(data, seed=0): zlib's crc32, as the compiled path computes it (for tests)"},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups",
                                    "shmreg's compiled fast path (see _speedups.c).", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    crc_init();
    life_probe_layout();
    if (pthread_atfork(NULL, NULL, after_fork_in_child)) {
        PyErr_SetString(PyExc_ImportError, "pthread_atfork failed");
        return NULL;
    }
#define INTERN(var, s) \
    if (!(var = PyUnicode_InternFromString(s))) return NULL
    INTERN(str_table, "table");
    INTERN(str_buf, "buf");
    INTERN(str_rq, "rq");
    INTERN(str_nslots, "nslots");
    INTERN(str_arena_off, "arena_off");
    INTERN(str_arena_size, "arena_size");
    INTERN(str_gen, "gen");
    INTERN(str_type, "type");
    INTERN(str_capabilities, "capabilities");
    INTERN(str_calls, "calls");
    INTERN(str_buckets, "buckets");
    INTERN(str_sum_ns, "sum_ns");
    INTERN(str_failed, "failed");
    if (PyType_Ready(&FastType) < 0 || PyType_Ready(&CountedType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FastType);
    if (PyModule_AddObject(m, "Fast", (PyObject *)&FastType) < 0) {
        Py_DECREF(&FastType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&CountedType);
    if (PyModule_AddObject(m, "Counted", (PyObject *)&CountedType) < 0) {
        Py_DECREF(&CountedType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "LAYOUT_VERSION", SHMREG_LAYOUT_VERSION) < 0) return NULL;
    if (PyModule_AddIntConstant(m, "LIVENESS_WORDS", life_usable) < 0 ||
        PyModule_AddIntConstant(m, "TYPE_ABSENT", SHMREG_TYPE_ABSENT) < 0 ||
        PyModule_AddObject(m, "TYPE_ANY", PyLong_FromUnsignedLongLong(SHMREG_TYPE_ANY)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_METADATA_DEPTH", SHMREG_MAX_METADATA_DEPTH) < 0 ||
        PyModule_AddIntConstant(m, "MAX_KEY_BYTES", SHMREG_MAX_KEY_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "KEY_CACHE_LIMIT", SHMREG_KEY_CACHE_LIMIT) < 0 ||
        PyModule_AddIntConstant(m, "EVENT_REGISTERED", SHMREG_EVENT_REGISTERED) < 0)
        return NULL;
    return m;
}
