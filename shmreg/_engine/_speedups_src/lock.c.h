/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * The writer lock (robust pthread mutex) and this process's identity. */

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
