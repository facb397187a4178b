/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Liveness words: claims, the holder thread, verdicts. */

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
    dev_t dev; /* with ino: the segment itself, so a registry destroyed and made again */
    ino_t ino; /* under the same name is a new claim, not the old one's */
    uint8_t *map;
    size_t len;
    pthread_mutex_t *mutex;
    int refs;
    struct Claim *next;
} Claim;

static Claim *claims; /* this process's claims; touched with the GIL held */
static int nclaims;
/* The kernel walks at most 2048 entries of a thread's robust list when it exits, and marks
 * none past them: the holder must never hold more, or a dead process could read as alive.
 * Registries past this many in one process fall back to kill() for its entries. */
#define MAX_CLAIMS 1024

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
        /* The holder blocks every signal (a new thread inherits the creator's mask): a
         * signal for the process must reach a Python thread. Were it delivered here, the
         * main thread, asleep in a system call, would not wake to run its handler (an
         * agent's SIGTERM handler, say) until its sleep ended on its own. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        int rc = pthread_create(&t, &attr, holder_main, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
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
    nclaims = 0;
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
    struct stat seg;
    if (stat(path, &seg)) return;
    for (Claim *c = claims; c; c = c->next) {
        if (!strcmp(c->path, path) && c->dev == seg.st_dev && c->ino == seg.st_ino) {
            c->refs++;
            self->claim = c;
            return;
        }
    }
    if (nclaims >= MAX_CLAIMS) return;
    size_t len = SHMREG_LIFE_OFFSET + self->life_slots * SHMREG_LIFE_SLOT_SIZE;
    if (strlen(path) >= sizeof(((Claim *)0)->path)) return;
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return;
    struct stat st;
    uint8_t *map = MAP_FAILED;
    if (!fstat(fd, &st) && (size_t)st.st_size >= len && st.st_dev == seg.st_dev &&
        st.st_ino == seg.st_ino)
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
    __atomic_thread_fence(__ATOMIC_RELEASE); /* odd before any word of the claim changes */
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
    c->dev = seg.st_dev;
    c->ino = seg.st_ino;
    c->map = map;
    c->len = len;
    c->mutex = m;
    c->refs = 1;
    c->next = claims;
    claims = c;
    nclaims++;
    self->claim = c;
}

/* Let go of this handle's claim; the last handle to the registry unlocks and unmaps. */
static void life_release(Fast *self) {
    Claim *mine = self->claim;
    self->claim = NULL;
    if (!mine || self->life_claim_forks != forks_seen) return; /* none, or the parent's */
    for (Claim **pc = &claims; *pc; pc = &(*pc)->next) {
        Claim *c = *pc;
        if (c != mine) continue;
        if (--c->refs > 0) return;
        *pc = c->next;
        nclaims--;
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
