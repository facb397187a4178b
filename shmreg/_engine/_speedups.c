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
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_layout.h"

#define LO32 0xFFFFFFFFull
#define SPINS 256 /* seqlock retries before handing the read to Python (which waits, repairs) */

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
    PyObject *fallback_lookup; /* the Python path, called when this one declines */
    PyObject *fallback_lookup_meta;
    PyObject *fallback_register; /* backend.register's Python path */
    PyObject *pack;       /* metadata encoder (the codec's reused msgpack Packer.pack) */
    PyObject *str_tags;   /* the codec's cache: str -> 32-bit tag */
    PyObject *type_tag;   /* codec.type_tag(metadata), for what the cache cannot answer */
    PyObject *capability_mask; /* codec.capability_mask(metadata), likewise */
    uint64_t max_meta;    /* the registry's max_metadata_bytes */
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

static void *buffer_address(PyObject *obj) {
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    void *p = view.buf;
    Py_ssize_t len = view.len;
    PyBuffer_Release(&view);
    if (len < SHMREG_HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "mapping too small");
        return NULL;
    }
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
static int reload(Fast *self) {
    self->valid = 0;
    Py_CLEAR(self->table);
    uint64_t epoch = *self->epoch;
    PyObject *rq = PyObject_GetAttr(self->store, str_rq);
    if (!rq) goto decline;
    self->root = buffer_address(rq);
    Py_DECREF(rq);
    if (!self->root) goto decline;
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

/* Pointers usable now, and the table the root names? Call with nothing shared in flight. */
static inline int ready(Fast *self) {
    if (!self->valid || *self->epoch != self->seen_epoch) {
        if (reload(self) < 0) return 0;
    }
    return load_acquire(self->root + SHMREG_R_GEN) == self->gen;
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

/* Key bytes for a str or int service (shm_base.py ShmBase._key), cached as Python caches
 * them; NULL (no exception) declines: tuples, a namespace not seen yet, anything to reject. */
static PyObject *encode_key(Fast *self, PyObject *ns, PyObject *service, PyObject *pair) {
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
    PyObject *packed = PyObject_CallOneArg(self->pack, service);
    if (!packed || !PyBytes_CheckExact(packed)) {
        Py_XDECREF(packed);
        return NULL; /* out of range, not encodable: Python raises InvalidKey */
    }
    PyObject *prefix = PyTuple_GET_ITEM(ns_info, 0);
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix), slen = PyBytes_GET_SIZE(packed);
    PyObject *raw = NULL, *info = NULL;
    if (plen + slen > SHMREG_MAX_KEY_BYTES) goto done;
    raw = PyBytes_FromStringAndSize(NULL, plen + slen);
    if (!raw) goto done;
    memcpy(PyBytes_AS_STRING(raw), PyBytes_AS_STRING(prefix), (size_t)plen);
    memcpy(PyBytes_AS_STRING(raw) + plen, PyBytes_AS_STRING(packed), (size_t)slen);
    uint32_t hash = crc32_seeded(0, (const uint8_t *)PyBytes_AS_STRING(raw), (size_t)(plen + slen));
    info = Py_BuildValue("(NkOOO)", raw, (unsigned long)hash, PyTuple_GET_ITEM(ns_info, 1),
                         PyTuple_GET_ITEM(ns_info, 2), (PyObject *)t);
    raw = NULL;
    if (info && PyDict_GET_SIZE(self->keys) < SHMREG_KEY_CACHE_LIMIT &&
        PyDict_SetItem(self->keys, pair, info) < 0) {
        Py_CLEAR(info);
    }
done:
    Py_DECREF(packed);
    Py_XDECREF(raw);
    if (!info) PyErr_Clear();
    return info;
}

/* The key cache entry for (namespace, service) as a new reference, or NULL (no exception)
 * to decline. */
static PyObject *cached_key(Fast *self, PyObject *ns, PyObject *service) {
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
        info = encode_key(self, ns, service, pair);
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

enum { FOUND = 1, ABSENT = 0, DECLINE = -1 };

static int locate(Fast *self, PyObject *ns, PyObject *service, uint64_t words[8]) {
    PyObject *info = cached_key(self, ns, service);
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
    if (nargs != 2) return PyObject_Vectorcall(self->fallback_lookup, args, nargs, NULL);
    uint64_t words[8];
    int r = locate(self, args[0], args[1], words);
    if (r == DECLINE) return PyObject_Vectorcall(self->fallback_lookup, args, nargs, NULL);
    if (r == ABSENT) Py_RETURN_NONE;
    uint64_t pid = words[SHMREG_S_OWNER] & LO32;
    if (!alive(pid)) Py_RETURN_NONE;
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
        if (!alive(pid)) Py_RETURN_NONE;
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
    if (out || PyErr_Occurred()) return out;
    return PyObject_Vectorcall(self->fallback_lookup_meta, args, nargs, NULL);
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
 * generation, 0 to decline, or (uint64_t)-1 with an exception set (a crash point's). */
static uint64_t commit_new(Fast *self, const char *key, Py_ssize_t key_len, uint32_t hash,
                           const char *record, uint64_t padded, const uint64_t head[5], uint64_t caps) {
    uint64_t *hdr = (uint64_t *)self->data;
    uint64_t top = hdr[SHMREG_D_TOP], live = hdr[SHMREG_D_LIVE], tombs = hdr[SHMREG_D_TOMBS];
    uint64_t garbage = hdr[SHMREG_D_GARBAGE], ops = hdr[SHMREG_D_OPS], owners = hdr[SHMREG_D_NAMEGEN];
    /* table.py counters(): values no writer could produce are Python's to report. */
    if (top > self->arena_size || top % SHMREG_RECORD_ALIGN || live + tombs > self->nslots ||
        garbage > top || ops >= SHMREG_COUNTER_LIMIT || owners >= SHMREG_COUNTER_LIMIT)
        return 0;
    /* Growth, a full arena, or an arena page still to allocate: Python's. */
    if ((double)(live + tombs + 1) > SHMREG_MAX_LOAD * (double)self->nslots ||
        top + padded > self->arena_size || top + padded > hdr[SHMREG_D_ALLOCATED] ||
        padded % SHMREG_RECORD_ALIGN)
        return 0;

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

/* codec.py _fast_ok, strict: 1 when plainly storable, 0 to let Python check (and raise). */
static int plainly_storable(PyObject *v, int depth) {
    if (depth > SHMREG_MAX_METADATA_DEPTH) return 0;
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyUnicode_Type || t == &PyBool_Type || v == Py_None || t == &PyBytes_Type) return 1;
    if (t == &PyLong_Type) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        (void)x;
        if (overflow == 0) return 1;
        if (overflow < 0) return 0;
        unsigned long long u = PyLong_AsUnsignedLongLong(v); /* up to 2**64 - 1 */
        (void)u;
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    if (t == &PyFloat_Type) return !isnan(PyFloat_AS_DOUBLE(v));
    if (t == &PyList_Type) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(v); i++)
            if (!plainly_storable(PyList_GET_ITEM(v, i), depth + 1)) return 0;
        return 1;
    }
    if (t == &PyDict_Type) {
        Py_ssize_t pos = 0;
        PyObject *k, *item;
        while (PyDict_Next(v, &pos, &k, &item))
            if (Py_TYPE(k) != &PyUnicode_Type || !plainly_storable(item, depth + 1)) return 0;
        return 1;
    }
    return 0;
}

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
    PyObject *info = cached_key(self, ns, service);
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
    PyObject *packed = NULL;
    if (!plainly_storable(meta, 0)) goto done;
    packed = PyObject_CallOneArg(self->pack, meta);
    if (!packed || !PyBytes_CheckExact(packed)) {
        PyErr_Clear(); /* Python's path names what cannot be encoded */
        goto done;
    }
    Py_ssize_t meta_len = PyBytes_GET_SIZE(packed);
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
    char *r = PyBytes_AS_STRING(record);
    memcpy(r, PyBytes_AS_STRING(key), (size_t)key_len);
    memcpy(r + key_len, PyBytes_AS_STRING(packed), (size_t)meta_len);
    memset(r + len, 0, (size_t)(padded - len));
    uint32_t seed = (uint32_t)((pid ^ start ^ (start >> 32)) & LO32);
    uint32_t crc = crc32_seeded(seed, (const uint8_t *)r, (size_t)len);
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
    Py_XDECREF(packed);
    Py_DECREF(meta);
    if (result != 1) Py_CLEAR(out->info);
    return result;
}

/* ---------------------------------------------------------------------- the lock */

static PyObject *str_begin, *str_end;

/* Store.begin(): the writer lock, recovery of a dead writer, the current generation. */
static int lock(Fast *self) {
    PyObject *r = PyObject_CallMethodNoArgs(self->store, str_begin);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static int unlock(Fast *self, int failed) {
    PyObject *r = PyObject_CallMethodOneArg(self->store, str_end, failed ? Py_True : Py_False);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

/* register(namespace, service, owner, metadata) -> generation (the Python path answers what
 * this declines: a new key to encode, metadata to check, a name already held, growth). */
static PyObject *Fast_register(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) return PyObject_Vectorcall(self->fallback_register, args, nargs, NULL);
    Prepared p;
    int r = prepare(self, args[0], args[1], args[2], args[3], &p);
    if (r < 0) return NULL;
    if (r == 0) return PyObject_Vectorcall(self->fallback_register, args, nargs, NULL);
    if (lock(self) < 0) {
        Py_DECREF(p.record);
        Py_DECREF(p.info);
        return NULL;
    }
    uint64_t generation = 0;
    if (ready(self))
        generation = commit_new(self, PyBytes_AS_STRING(p.key), PyBytes_GET_SIZE(p.key), p.hash,
                                PyBytes_AS_STRING(p.record), (uint64_t)PyBytes_GET_SIZE(p.record),
                                p.head, p.caps);
    int failed = generation == (uint64_t)-1;
    Py_DECREF(p.record);
    Py_DECREF(p.info);
    if (unlock(self, failed) < 0 || failed) return NULL;
    if (generation == 0) return PyObject_Vectorcall(self->fallback_register, args, nargs, NULL);
    return PyLong_FromUnsignedLongLong(generation);
}

/* --------------------------------------------------------------------- boilerplate */

static int Fast_init(Fast *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"store", "keys", "epoch", "unpackb", "crash_point", "lookup",
                            "lookup_with_metadata", "register", "pack", "str_tags", "type_tag",
                            "capability_mask", "max_metadata_bytes", "namespaces", NULL};
    PyObject *store, *keys, *epoch, *unpackb, *crash_point, *lookup, *lookup_meta, *reg, *pack,
        *str_tags, *type_tag, *capability_mask, *namespaces;
    unsigned long long max_meta;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OOOOOOOO!OOKO!", names, &store, &PyDict_Type,
                                     &keys, &epoch, &unpackb, &crash_point, &lookup, &lookup_meta,
                                     &reg, &pack, &PyDict_Type, &str_tags, &type_tag,
                                     &capability_mask, &max_meta, &PyDict_Type, &namespaces))
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
    Py_INCREF(lookup); Py_XSETREF(self->fallback_lookup, lookup);
    Py_INCREF(lookup_meta); Py_XSETREF(self->fallback_lookup_meta, lookup_meta);
    Py_INCREF(reg); Py_XSETREF(self->fallback_register, reg);
    Py_INCREF(pack); Py_XSETREF(self->pack, pack);
    Py_INCREF(str_tags); Py_XSETREF(self->str_tags, str_tags);
    Py_INCREF(type_tag); Py_XSETREF(self->type_tag, type_tag);
    Py_INCREF(capability_mask); Py_XSETREF(self->capability_mask, capability_mask);
    self->max_meta = max_meta;
    Py_INCREF(namespaces); Py_XSETREF(self->namespaces, namespaces);
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
    Py_VISIT(self->fallback_lookup);
    Py_VISIT(self->fallback_lookup_meta);
    Py_VISIT(self->fallback_register);
    Py_VISIT(self->pack);
    Py_VISIT(self->str_tags);
    Py_VISIT(self->type_tag);
    Py_VISIT(self->capability_mask);
    Py_VISIT(self->namespaces);
    Py_VISIT(self->table);
    return 0;
}

static int Fast_clear(Fast *self) {
    self->valid = 0;
    Py_CLEAR(self->store);
    Py_CLEAR(self->keys);
    Py_CLEAR(self->unpackb);
    Py_CLEAR(self->crash_point);
    Py_CLEAR(self->fallback_lookup);
    Py_CLEAR(self->fallback_lookup_meta);
    Py_CLEAR(self->fallback_register);
    Py_CLEAR(self->pack);
    Py_CLEAR(self->str_tags);
    Py_CLEAR(self->type_tag);
    Py_CLEAR(self->capability_mask);
    Py_CLEAR(self->namespaces);
    Py_CLEAR(self->table);
    /* epoch_obj last: self->epoch points into it. */
    Py_CLEAR(self->epoch_obj);
    return 0;
}

static void Fast_dealloc(Fast *self) {
    PyObject_GC_UnTrack(self);
    Fast_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Fast_invalidate(Fast *self, PyObject *unused) {
    self->valid = 0;
    Py_CLEAR(self->table);
    Py_RETURN_NONE;
}

static PyMethodDef Fast_methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))Fast_lookup, METH_FASTCALL,
     "lookup(namespace, service) -> pid | None (the Python path answers what this declines)"},
    {"lookup_with_metadata", (PyCFunction)(void (*)(void))Fast_lookup_with_metadata, METH_FASTCALL,
     "lookup_with_metadata(namespace, service) -> (pid, metadata) | None"},
    {"entry", (PyCFunction)(void (*)(void))Fast_entry, METH_FASTCALL,
     "entry(namespace, service) -> (pid, generation, metadata) | None | NotImplemented"},
    {"register", (PyCFunction)(void (*)(void))Fast_register, METH_FASTCALL,
     "register(namespace, service, owner, metadata) -> generation"},
    {"invalidate", (PyCFunction)Fast_invalidate, METH_NOARGS, "forget the cached mapping"},
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

static PyMethodDef module_methods[] = {
    {"crc32", (PyCFunction)(void (*)(void))py_crc32, METH_FASTCALL,
     "crc32(data, seed=0): zlib's crc32, as the compiled path computes it (for tests)"},
    {NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups",
                                    "shmreg's compiled fast path (see _speedups.c).", -1,
                                    module_methods};

PyMODINIT_FUNC PyInit__speedups(void) {
    crc_init();
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
    INTERN(str_begin, "begin");
    INTERN(str_end, "end");
    if (PyType_Ready(&FastType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FastType);
    if (PyModule_AddObject(m, "Fast", (PyObject *)&FastType) < 0) {
        Py_DECREF(&FastType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "LAYOUT_VERSION", SHMREG_LAYOUT_VERSION) < 0) return NULL;
    return m;
}
