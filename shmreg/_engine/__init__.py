"""The shared-memory engine: the bytes of a registry and the only code that writes them.

Layers, bottom up (each module imports only those above it in this list):

``layout``
    the byte layout of the root and data segments, drawn once: word numbers, slot fields
    and their packing. Everything else reads and writes through it.
``segment``
    POSIX shared-memory segments: create, open, link, unlink, permissions.
``lock``
    the writer lock.
``crashpoints``
    named places where tests kill a writer.
``events``
    the event ring in the root segment.
``table``
    one data generation: probing, seqlock reads, journaled writes, recovery.
``store``
    one registry as a whole: root, lock, the current generation, growth.
``fsck`` and ``upgrade``
    checking and repairing a registry, and bringing an older layout up to date.

``shmreg.backends.SharedMemoryBackend`` is the registry API on top of this package.
"""
