"""Remote tier on Redis/Valkey: page blocks keyed by fingerprint + page hash, shared between replicas.

Every call has a short socket timeout; on a failure the tier marks itself down and retries after
``retry_s`` -- a request never waits on Redis beyond that bound.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from tierserve.kv.tiers import codec, flush_at_exit

log = logging.getLogger("tierserve.kv.remote")


class RemoteTier:
    name = "remote"

    def __init__(self, url: str, fingerprint: str, timeout_s: float = 0.25, retry_s: float = 5.0,
                 ttl_s: int | None = None) -> None:
        import redis   # optional dependency (pip install redis)

        self.url, self.fingerprint = url, fingerprint
        self.prefix = f"tierserve:kv:{fingerprint[:16]}:"
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.retry_s, self.ttl_s = retry_s, ttl_s
        self._down_until = 0.0
        self.num_errors = 0
        self.num_corrupt = 0
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._writer, name="tierserve-remote-kv", daemon=True).start()
        flush_at_exit(self)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, e: Exception) -> None:
        self.num_errors += 1
        if self.available:
            log.warning("remote KV tier %s unreachable (%s); retrying in %.0fs", self.url, e, self.retry_s)
        self._down_until = time.monotonic() + self.retry_s

    def read(self, block_hash: bytes, tokens: tuple[int, ...]) -> bytes | None:
        if not self.available:
            return None
        try:
            blob = self.client.get(self.prefix + block_hash.hex())
        except Exception as e:     # redis raises many connection error types
            self._failed(e)
            return None
        if blob is None:
            return None
        try:
            return codec.decode(blob, self.fingerprint, block_hash, tokens)
        except codec.CorruptBlock as e:
            self.num_corrupt += 1
            log.warning("remote KV block %s rejected (%s)", block_hash.hex(), e)
            return None

    def write_async(self, block_hash: bytes, tokens: tuple[int, ...], payload: bytes) -> None:
        if self.available:
            self._queue.put((block_hash, tokens, payload))

    def _writer(self) -> None:
        while True:
            block_hash, tokens, payload = self._queue.get()
            try:
                if self.available:
                    blob = codec.encode(self.fingerprint, block_hash, tokens, payload)
                    self.client.set(self.prefix + block_hash.hex(), blob, ex=self.ttl_s, nx=True)
            except Exception as e:
                self._failed(e)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
