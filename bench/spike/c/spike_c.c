/* The three hot paths as a hand-written CPython extension over raw pointers into the
 * registry's segments. Same work, same bytes as shmreg's Python path (see table.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <zlib.h>

#define SLOT_WORD0 512 /* slots follow the 4 KiB data header */
#define RING_WORD0 512 /* the event ring follows the 4 KiB of root words */
#define RING_EVENTS 4096
#define EVENT_WORDS 32
#define KEY_ROOM 216
#define R_EVENT_SEQ 17
#define D_ALLOCATED 11
#define J_STATE 16
#define J_SLOT 17
#define J_CRC 34
#define LO32 0xFFFFFFFFull
#define COUNTER_LIMIT (1ull << 48)

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static PyObject *SpikeError;
static PyObject *unpackb;     /* msgpack.unpackb */
static PyObject *unpack_kw;   /* ("raw", "strict_map_key") */

typedef struct {
    PyObject_HEAD
    Py_buffer data, root;
    unsigned char *p;
    uint64_t *q, *rq;
    uint64_t nslots, arena_off, arena_size;
    double fill_limit;
} Fast;

static int Fast_init(Fast *self, PyObject *args, PyObject *kw) {
    PyObject *data, *root;
    if (!PyArg_ParseTuple(args, "OO", &data, &root)) return -1;
    if (PyObject_GetBuffer(data, &self->data, PyBUF_WRITABLE) < 0) return -1;
    if (PyObject_GetBuffer(root, &self->root, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&self->data);
        return -1;
    }
    self->p = self->data.buf;
    self->q = self->data.buf;
    self->rq = self->root.buf;
    self->nslots = self->q[2];
    self->arena_off = self->q[3];
    self->arena_size = self->q[4];
    self->fill_limit = 0.75 * (double)self->nslots;
    return 0;
}

static void Fast_dealloc(Fast *self) {
    if (self->data.obj) PyBuffer_Release(&self->data);
    if (self->root.obj) PyBuffer_Release(&self->root);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Copy the seqlock-validated slot holding the key into out; 0 when absent. */
static int find(Fast *self, const char *key, Py_ssize_t klen, uint64_t hash, uint64_t *out) {
    uint64_t n = self->nslots, i = hash % n;
    for (uint64_t probes = 0; probes < n; probes++) {
        uint64_t *slot = self->q + SLOT_WORD0 + i * 8, s1;
        for (;;) {
            s1 = LOAD(slot);
            for (int k = 1; k < 8; k++) out[k] = ((volatile uint64_t *)slot)[k];
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (!(s1 & 1) && LOAD(slot) == s1) break;
        }
        uint64_t state = out[2] >> 48;
        if (state == 0) return 0;
        if (state == 1 && (out[1] & LO32) == hash && ((out[2] >> 32) & 0xFFFF) == (uint64_t)klen
            && memcmp(self->p + self->arena_off + (out[2] & LO32) * 8, key, klen) == 0)
            return 1;
        if (++i == n) i = 0;
    }
    return 0;
}

static int alive(uint64_t pid) {
    if (pid == 0 || pid > 0x7FFFFFFF) return 0;
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

static int key_args(PyObject *const *args, Py_ssize_t nargs, const char **key, Py_ssize_t *klen,
                    uint64_t *hash) {
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "expected (key: bytes, key_hash: int)");
        return -1;
    }
    *key = PyBytes_AS_STRING(args[0]);
    *klen = PyBytes_GET_SIZE(args[0]);
    *hash = PyLong_AsUnsignedLongLong(args[1]);
    return (*hash == (uint64_t)-1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *Fast_lookup(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *key;
    Py_ssize_t klen;
    uint64_t hash, w[8];
    if (key_args(args, nargs, &key, &klen, &hash) < 0) return NULL;
    if (!find(self, key, klen, hash, w) || !alive(w[4] & LO32)) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(w[4] & LO32);
}

static PyObject *Fast_lookup_meta(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *key;
    Py_ssize_t klen;
    uint64_t hash, w[8];
    if (key_args(args, nargs, &key, &klen, &hash) < 0) return NULL;
    if (!find(self, key, klen, hash, w) || !alive(w[4] & LO32)) Py_RETURN_NONE;
    uint64_t pid = w[4] & LO32, off = self->arena_off + (w[2] & LO32) * 8 + klen;
    uint64_t mlen = w[3] & LO32;
    if (off + mlen > self->arena_off + self->arena_size) {
        PyErr_SetString(SpikeError, "record runs past the arena");
        return NULL;
    }
    /* Checksum the copy, not shared memory; the key half is the caller's equal key. */
    PyObject *meta = PyBytes_FromStringAndSize((const char *)self->p + off, (Py_ssize_t)mlen);
    if (!meta) return NULL;
    uLong crc = crc32((pid ^ w[5] ^ (w[5] >> 32)) & LO32, (const Bytef *)key, (uInt)klen);
    crc = crc32(crc, (const Bytef *)PyBytes_AS_STRING(meta), (uInt)mlen);
    if (crc != w[4] >> 32) {
        Py_DECREF(meta);
        PyErr_SetString(SpikeError, "record fails its checksum");
        return NULL;
    }
    PyObject *call[3] = {meta, Py_False, Py_True};
    PyObject *decoded = PyObject_Vectorcall(unpackb, call, 1, unpack_kw);
    Py_DECREF(meta);
    if (!decoded) return NULL;
    PyObject *pyid = PyLong_FromUnsignedLongLong(pid);
    if (!pyid) {
        Py_DECREF(decoded);
        return NULL;
    }
    PyObject *out = PyTuple_Pack(2, pyid, decoded);
    Py_DECREF(pyid);
    Py_DECREF(decoded);
    return out;
}

static PyObject *fail(const char *why) {
    PyErr_SetString(SpikeError, why);
    return NULL;
}

/* A new key's registration as _register_locked does it, lock already held.
 * item: (key, key_hash, padded record, head words 1-5, capabilities mask). */
static PyObject *Fast_register_locked(Fast *self, PyObject *item) {
    PyObject *key_o, *rec_o, *head_o;
    unsigned long long hash, caps, head[5];
    if (!PyArg_ParseTuple(item, "SKSOK", &key_o, &hash, &rec_o, &head_o, &caps)) return NULL;
    if (!PyArg_ParseTuple(head_o, "KKKKK", &head[0], &head[1], &head[2], &head[3], &head[4]))
        return NULL;
    const char *key = PyBytes_AS_STRING(key_o), *rec = PyBytes_AS_STRING(rec_o);
    uint64_t klen = PyBytes_GET_SIZE(key_o), padded = PyBytes_GET_SIZE(rec_o);
    uint64_t *q = self->q, *rq = self->rq;
    uint64_t top = q[5], live = q[6], tombs = q[7], garbage = q[8], ops = q[9], owners = q[10];
    if (top > self->arena_size || top % 8 || live + tombs > self->nslots || garbage > top
        || ops >= COUNTER_LIMIT || owners >= COUNTER_LIMIT)
        return fail("counters out of range");
    if ((double)(live + tombs + 1) > self->fill_limit || top + padded > self->arena_size)
        return fail("growth is not part of the spike");
    /* probe_for_write */
    uint64_t n = self->nslots, i = hash % n;
    int64_t first_free = -1, index = -1;
    for (uint64_t probes = 0; probes < n; probes++) {
        uint64_t *slot = q + SLOT_WORD0 + i * 8, w2 = slot[2], state = (w2 >> 48) & 0xFF;
        if (state == 0) {
            index = first_free < 0 ? (int64_t)i : first_free;
            break;
        }
        if (state == 2) {
            if (first_free < 0) first_free = (int64_t)i;
        } else if ((slot[1] & LO32) == hash && ((w2 >> 32) & 0xFFFF) == klen
                   && memcmp(self->p + self->arena_off + (w2 & LO32) * 8, key, klen) == 0) {
            return fail("existing keys are not part of the spike");
        }
        if (++i == n) i = 0;
    }
    if (index < 0) index = first_free;
    if (first_free >= 0) tombs--;
    live++;
    owners++;
    /* stage */
    if (top + padded > q[D_ALLOCATED]) return fail("arena allocation is not part of the spike");
    memcpy(self->p + self->arena_off + top, rec, padded);
    /* journal: slot, image (seq + body), counters, event, time */
    uint64_t *slot = q + SLOT_WORD0 + index * 8, seq = rq[R_EVENT_SEQ] + 1, j[17];
    if (seq >= COUNTER_LIMIT) return fail("event sequence out of range");
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t body[7] = {head[0], head[1] | (top >> 3), head[2], head[3], head[4], owners, caps};
    uint64_t counters[6] = {top + padded, live, tombs, garbage, ops + 1, owners};
    j[0] = (uint64_t)index;
    j[1] = (slot[0] | 1) + 1;
    memcpy(j + 2, body, sizeof body);
    memcpy(j + 9, counters, sizeof counters);
    j[15] = 1 | (seq << 16);
    j[16] = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    memcpy(q + J_SLOT, j, sizeof j);
    q[J_CRC] = crc32(0, (const Bytef *)j, sizeof j);
    STORE(q + J_STATE, 1);
    /* apply: odd, body, counters, even */
    STORE(slot, j[1] - 1);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    for (int k = 0; k < 7; k++) slot[1 + k] = body[k];
    for (int k = 0; k < 6; k++) STORE(q + 5 + k, counters[k]);
    STORE(slot, j[1]);
    /* emit the event, then retire the journal */
    uint64_t *ev = rq + RING_WORD0 + (seq % RING_EVENTS) * EVENT_WORDS;
    uint64_t ekey = klen < KEY_ROOM ? klen : KEY_ROOM;
    STORE(ev, 0);
    ev[1] = 1 | (ekey << 16) | ((body[3] & LO32) << 32);
    ev[2] = owners;
    ev[3] = j[16];
    ev[4] = body[4];
    memcpy(ev + 5, key, ekey);
    STORE(ev, seq);
    if (rq[R_EVENT_SEQ] < seq) rq[R_EVENT_SEQ] = seq;
    STORE(q + J_STATE, 0);
    return PyLong_FromUnsignedLongLong(owners);
}

static PyMethodDef Fast_methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))Fast_lookup, METH_FASTCALL, "pid or None"},
    {"lookup_meta", (PyCFunction)(void (*)(void))Fast_lookup_meta, METH_FASTCALL,
     "(pid, metadata) or None"},
    {"register_locked", (PyCFunction)Fast_register_locked, METH_O, "new key, lock held"},
    {NULL},
};

static PyTypeObject FastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "spike_c.Fast",
    .tp_basicsize = sizeof(Fast),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Fast_init,
    .tp_dealloc = (destructor)Fast_dealloc,
    .tp_methods = Fast_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "spike_c", NULL, -1, NULL};

PyMODINIT_FUNC PyInit_spike_c(void) {
    PyObject *msgpack = PyImport_ImportModule("msgpack");
    if (!msgpack) return NULL;
    unpackb = PyObject_GetAttrString(msgpack, "unpackb");
    Py_DECREF(msgpack);
    unpack_kw = Py_BuildValue("(ss)", "raw", "strict_map_key");
    if (!unpackb || !unpack_kw || PyType_Ready(&FastType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    SpikeError = PyErr_NewException("spike_c.SpikeError", NULL, NULL);
    Py_INCREF(&FastType);
    if (PyModule_AddObject(m, "Fast", (PyObject *)&FastType) < 0
        || PyModule_AddObject(m, "SpikeError", SpikeError) < 0)
        return NULL;
    return m;
}
