/* shmreg's compiled fast path: the hot operations over the same bytes, under the same
 * protocol, as the pure-Python engine (table.py, events.py, store.py, backends/_shm.py).
 *
 * Scope, on purpose narrow: lock-free point reads (pid; pid, generation and metadata), the
 * registration of names nobody holds (one, or a batch under one lock hold), liveness words
 * (a death read from memory instead of kill()), scans of one namespace by type and
 * capabilities (find, listings, counts), and the operation metrics' counted reads.
 * Anything unusual -- a tuple service, metadata that needs checking, a slot that stays odd,
 * a table that must grow, a name already held, a busy lock, damaged bytes, a generation
 * that moved -- is handed to the Python path, which does the whole operation again from
 * the start. It alone raises errors, repairs, grows and judges takeovers, so the compiled
 * path never disagrees with it on anything but speed (and, by design, on owners that are
 * zombies or have exec'd: see liveness.c.h).
 *
 * Every layout number comes from _layout.h, generated from layout.py (a test checks that the
 * committed header is what layout.py generates today). The code is one translation unit
 * made of the pieces in _speedups_src/ included below, one job each.
 *
 * Memory safety. Raw pointers into the root and the current data generation are cached. They
 * stay valid while the Store keeps the mapping: Store bumps its remap epoch (a one-word
 * array this object reads through a pointer) whenever it closes or replaces a mapping, and
 * every entry point compares the epoch before touching shared memory. Between that check
 * and the last shared-memory access no Python code runs (no allocation, no call; where one
 * must, the epoch is checked again after it), so no other thread can unmap underneath: the
 * GIL is held throughout.
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
/* layout.record_seed: a record's crc32 starts from its owner, so a flipped bit in the slot's
 * pid or start ticks fails the record's checksum too. */
static inline uint32_t record_seed(uint64_t pid, uint64_t start) {
    return (uint32_t)((pid ^ start ^ (start >> SHMREG_SEED_FOLD_SHIFT)) & 0xFFFFFFFFull);
}
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

#define SPINS 256 /* seqlock retries before handing the read to Python (which waits, repairs) */
#define LOCK_SPINS 8 /* yields before a busy writer lock is left to Python's blocking wait */

/* The pieces, in dependency order (one job each; see each file's first lines). */
#include "_speedups_src/crc32.c.h"
#include "_speedups_src/memory.c.h"
#include "_speedups_src/mapping.c.h"
#include "_speedups_src/msgpack.c.h"
#include "_speedups_src/keys.c.h"
#include "_speedups_src/reads.c.h"
#include "_speedups_src/commit.c.h"
#include "_speedups_src/prepare.c.h"
#include "_speedups_src/lock.c.h"
#include "_speedups_src/liveness.c.h"
#include "_speedups_src/register.c.h"
#include "_speedups_src/unpack.c.h"
#include "_speedups_src/scan.c.h"

/* --------------------------------------------------------------------- boilerplate */

static int Fast_init(Fast *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"store", "epoch", "unpackb", "crash_point", "lookup",
                            "lookup_with_metadata", "register", "str_tags", "type_tag",
                            "capability_mask", "max_metadata_bytes", "namespaces", "self_identity",
                            "root_path", "backend", "register_many", NULL};
    PyObject *store, *epoch, *unpackb, *crash_point, *lookup, *lookup_meta, *reg,
        *str_tags, *type_tag, *capability_mask, *namespaces, *self_identity, *root_path,
        *backend_ref, *reg_many;
    unsigned long long max_meta;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOO!OOKO!OUOO", names, &store, &epoch,
                                     &unpackb, &crash_point, &lookup, &lookup_meta, &reg,
                                     &PyDict_Type, &str_tags, &type_tag,
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
    Py_INCREF(str_tags); Py_XSETREF(self->str_tags, str_tags);
    Py_INCREF(type_tag); Py_XSETREF(self->type_tag, type_tag);
    Py_INCREF(capability_mask); Py_XSETREF(self->capability_mask, capability_mask);
    self->max_meta = max_meta;
    Py_INCREF(namespaces); Py_XSETREF(self->namespaces, namespaces);
    Py_INCREF(self_identity); Py_XSETREF(self->self_identity, self_identity);
    Py_INCREF(root_path); Py_XSETREF(self->root_path, root_path);
    self->life_claim_forks = UINT64_MAX;
    self->claim = NULL;
    self->self_pid = 0;
    self->epoch = p;
    self->valid = 0;
    return 0;
}

static int Fast_traverse(Fast *self, visitproc visit, void *arg) {
    Py_VISIT(self->store);
    Py_VISIT(self->epoch_obj);
    Py_VISIT(self->unpackb);
    Py_VISIT(self->crash_point);
    Py_VISIT(self->backend_ref);
    Py_VISIT(self->fallback_lookup);
    Py_VISIT(self->fallback_lookup_meta);
    Py_VISIT(self->fallback_register);
    Py_VISIT(self->fallback_register_many);
    Py_VISIT(self->str_tags);
    Py_VISIT(self->type_tag);
    Py_VISIT(self->capability_mask);
    Py_VISIT(self->namespaces);
    Py_VISIT(self->self_identity);
    Py_VISIT(self->table);
    return 0;
}

static int Fast_clear(Fast *self) {
    life_release(self); /* needs root_path: before anything is cleared */
    self->released = 1;
    drop_views(self);
    Py_CLEAR(self->store);
    Py_CLEAR(self->unpackb);
    Py_CLEAR(self->crash_point);
    Py_CLEAR(self->backend_ref);
    Py_CLEAR(self->fallback_lookup);
    Py_CLEAR(self->fallback_lookup_meta);
    Py_CLEAR(self->fallback_register);
    Py_CLEAR(self->fallback_register_many);
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
    self->released = 1; /* for good: the store is closing, every later call declines */
    drop_views(self);
    Py_RETURN_NONE;
}

static PyObject *Fast_life_verdict(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    REQUIRE_INIT(self);
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
    REQUIRE_INIT(self);
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
    return Py_BuildValue("{sKsKsKsK}", "reads", self->n_reads, "commits", self->n_commits,
                         "scans", self->n_scans, "declined", self->n_declined);
}

static PyMethodDef Fast_methods[] = {
    {"counts", (PyCFunction)Fast_counts, METH_NOARGS,
     "{'reads', 'commits', 'scans', 'declined'}: calls this handle answered here or handed to "
     "Python"},
    {"scan", (PyCFunction)(void (*)(void))Fast_scan, METH_FASTCALL,
     "scan(prefix, type_tag, caps, what, entry_type, confirm=()) -> entries, services or a "
     "count; None when declined (the Python scan answers)"},
    {"claim", (PyCFunction)Fast_claim, METH_O,
     "claim(owner): with the writer lock held, claim this process's liveness slot"},
    {"lookup", (PyCFunction)(void (*)(void))Fast_lookup, METH_FASTCALL,
     "lookup(namespace, service) -> pid | None (the Python path answers what this declines)"},
    {"lookup_with_metadata", (PyCFunction)(void (*)(void))Fast_lookup_with_metadata, METH_FASTCALL,
     "lookup_with_metadata(namespace, service) -> (pid, metadata) | None"},
    {"register_many", (PyCFunction)(void (*)(void))Fast_register_many, METH_FASTCALL,
     "register_many(namespace, [(service, owner, metadata), ...]) -> [generation, ...]"},
    {"register", (PyCFunction)(void (*)(void))Fast_register, METH_FASTCALL,
     "register(namespace, service, owner, metadata) -> generation"},
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

#include "_speedups_src/counted.c.h"

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
    {"unpack", (PyCFunction)(void (*)(void))py_unpack, METH_FASTCALL,
     "unpack(data, use_list=True) -> the value a scan decodes, ValueError where it declines"},
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
    INTERN(str_root, "_root");
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
        PyModule_AddIntConstant(m, "EVENT_REGISTERED", SHMREG_EVENT_REGISTERED) < 0 ||
        PyModule_AddIntConstant(m, "SCAN_ENTRIES", SCAN_ENTRIES) < 0 ||
        PyModule_AddIntConstant(m, "SCAN_SERVICES", SCAN_SERVICES) < 0 ||
        PyModule_AddIntConstant(m, "SCAN_COUNT", SCAN_COUNT) < 0)
        return NULL;
    return m;
}
