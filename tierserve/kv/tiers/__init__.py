"""Lower KV tiers: pinned CPU RAM (host.py), local disk (disk.py), Redis/Valkey (remote.py).

``TierManager`` (manager.py) owns placement: which full, hashed pages live in which tier, the
transfers between them and the GPU pool, and the load-vs-recompute decision.
"""


def flush_at_exit(tier) -> None:
    """Queued writes reach storage before the interpreter exits (writer threads are daemons)."""
    import atexit
    import weakref

    ref = weakref.ref(tier)
    atexit.register(lambda: ref() is not None and ref().flush())
