/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * The journaled commit of a new registration, and its event. */

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
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the zero lands before any word after it */
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
    __atomic_thread_fence(__ATOMIC_RELEASE); /* ...before any slot word changes */
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
