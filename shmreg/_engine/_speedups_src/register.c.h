/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * register and register_many. */

/* register(namespace, service, owner, metadata) -> generation (the Python path answers what
 * this declines: a tuple service, metadata to check, a name already held, growth). */
static PyObject *Fast_register(Fast *self, PyObject *const *args, Py_ssize_t nargs) {
    REQUIRE_INIT(self);
    if (nargs != 4) return python_path(self, self->fallback_register, args, nargs);
    Prepared p;
    int r = prepare(self, args[0], args[1], args[2], args[3], &p);
    if (r < 0) return NULL;
    if (r == 0) {
        self->n_declined++;
        return python_path(self, self->fallback_register, args, nargs);
    }
    uint64_t generation = 0;
    int locked = own_identity(self) < 0 ? -1 : ready(self) && pin(self) ? lock(self) : 0;
    if (locked == 1 && (p.head[3] & LO32) == self->self_pid && p.head[4] == self->self_start)
        life_claim(self); /* registering for itself: let readers skip kill() for this pid */
    if (locked == 1) { /* lock() to unlock(): no Python code but crash points, allocation */
        generation = commit_new(self, PyBytes_AS_STRING(p.record), p.key_len, p.hash,
                                PyBytes_AS_STRING(p.record), (uint64_t)PyBytes_GET_SIZE(p.record),
                                p.head, p.caps);
        unlock(self, generation == (uint64_t)-1);
    }
    unpin(self);
    Py_DECREF(p.record);
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
    REQUIRE_INIT(self);
    if (nargs != 2 || !PyList_CheckExact(args[1]))
        return python_path(self, self->fallback_register_many, args, nargs);
    /* A private copy: the caller's list may change while Python code runs in between (the
     * codec's tags, the Python path for one item), and its items must stay alive. */
    PyObject *items = PyList_GetSlice(args[1], 0, PyList_GET_SIZE(args[1]));
    if (!items) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(items), done = 0;
    if (n == 0) {
        Py_DECREF(items);
        return PyList_New(0);
    }
    Prepared *prep = PyMem_Calloc((size_t)n, sizeof *prep);
    if (!prep) {
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
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
        PyObject *call[2] = {args[0], items};
        PyObject *gens = python_path(self, self->fallback_register_many, call, 2);
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
        int locked = ready(self) && pin(self) ? lock(self) : 0;
        if (locked < 0) {
            unpin(self);
            Py_CLEAR(out);
            goto cleanup;
        }
        uint64_t generation = 0;
        if (locked == 1) {
            if (claim) life_claim(self);
            for (; done < n; done++) {
                Prepared *p = &prep[done];
                generation = commit_new(self, PyBytes_AS_STRING(p->record), p->key_len, p->hash,
                                        PyBytes_AS_STRING(p->record),
                                        (uint64_t)PyBytes_GET_SIZE(p->record), p->head, p->caps);
                if (generation == 0 || generation >= COMMIT_REFUSED) break;
                PyObject *g = PyLong_FromUnsignedLongLong(generation);
                if (!g) { /* committed, but no room to say so: the caller sees MemoryError */
                    generation = COMMIT_REFUSED;
                    done++;
                    break;
                }
                PyList_SET_ITEM(out, done, g);
                self->n_commits++;
            }
            unlock(self, generation == (uint64_t)-1);
        }
        unpin(self);
        if (locked == 1) {
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
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(prep[i].record);
    PyMem_Free(prep);
    Py_DECREF(items);
    return out;
}
