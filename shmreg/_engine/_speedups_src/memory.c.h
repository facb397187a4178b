/* Part of _speedups.c, included once into its single translation unit (so every helper
 * stays static and inlinable); the order of inclusion there is the order of definition.
 * Shared-memory words: atomic loads and stores, the seqlock read of one slot. */

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
