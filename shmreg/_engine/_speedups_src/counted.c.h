/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Counted point reads for the operation metrics. */

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
    /* As _opmetrics._wrap_read: the block's calls count before the timed call runs (so
     * pending() never under-counts), and only a call that returned is timed. */
    if (add_to_attr_int(self->stats, str_calls, self->every) < 0) return NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    PyObject *out = PyObject_Vectorcall(self->fn, args, nargsf, kw);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (!out) {
        count_failure(self);
        return NULL;
    }
    long long ns = (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    if (ns < 0) ns = 0;
    int bucket = 0;
    for (unsigned long long v = (unsigned long long)ns >> self->first_shift; v; v >>= 1) bucket++;
    if (bucket > self->nbuckets - 1) bucket = self->nbuckets - 1;
    if (add_to_list_item(self->stats, str_sum_ns, 0, ns) < 0 ||
        add_to_list_item(self->stats, str_buckets, bucket, 1) < 0) {
        Py_DECREF(out);
        return NULL;
    }
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
