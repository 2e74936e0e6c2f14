"""redis_store: any replica resumes any stream, through Redis (chatsvc note 15).

`RedisStore` is the store that chatsvc's core calls when RESUME_STORE=redis://: its writer copies
each stream's log into a Redis Stream behind the live path, its listener stops a local stream when a
DELETE on another replica names it, and `find` gives other replicas a `RemoteLog` to follow. The keys,
the Lua script and the start-time check are here too. Its deliberate departures (the writer's
interval, the queue bound, presence and liveness keys, every key expiring) are chatsvc's notes 15
and 19.

This module never imports chatsvc: what it needs from the core (settings, metrics, the protocols'
encoding, the error a follower gets, how to stop a local stream) is passed in, and described by the
Protocols below. chatsvc imports it only with a Redis store: redis-py imports OpenTelemetry's
metrics SDK when that is installed, which note 14 keeps out otherwise. "Note N" in this module is
chatsvc's note N.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import suppress
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import anyio
import redis
import redis.asyncio
from opentelemetry import trace
from prometheus_client import Counter, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from logging_conf import correlation_id

log = logging.getLogger("chatsvc")

#: The writer gathers this long after the first event to write (note 15): a round trip costs some
#: 190 µs of CPU, and each XADD in it 25 to 55 µs more, so a stream's deltas should share one.
STORE_WRITE_INTERVAL_S = 0.05
CANCEL_CHANNEL = "chatsvc:cancel"  # DELETE on one replica, for the replica producing the stream
#: Liveness in the store (note 19): each replica renews a key naming it, and each follower on a
#: replica other than the producer's the stream's presence key, this often; each key lives
#: STORE_PRESENCE_TTL_S, so a replica or a follower that stopped renewing is gone within that.
STORE_PRESENCE_S = 1.0
STORE_PRESENCE_TTL_S = 3.0
STORE_BAD_MESSAGE_LOG_S = 10.0  # at most one log line this often for malformed cancel messages
CANCEL_AFTER = re.compile(r"[0-9]{1,9}")  # a cancel message's last event shown (note 23), as chatsvc's SEQ
#: A write that can create a key sets its expiry in the same step (note 19), so that no key ever
#: lives without one: KEYS[1] the key; ARGV[1] its expiry in ms, or "" to leave the key's own;
#: ARGV[2] "XX" to write only a key that exists; ARGV[3] the command; ARGV[4...] its arguments.
WRITE_EXPIRING = """
if ARGV[2] == 'XX' and redis.call('exists', KEYS[1]) == 0 then return false end
local reply = redis.call(ARGV[3], KEYS[1], unpack(ARGV, 4))
if ARGV[1] ~= '' then redis.call('pexpire', KEYS[1], ARGV[1]) end
return reply
"""
#: An Idempotency-Key (chatsvc's `Service.claim`): KEYS[1] its key; ARGV[1] the value to take it
#: with, ARGV[2] a value that may be replaced ("" for none), ARGV[3] the expiry in ms. Nil when
#: taken, else the value it holds.
CLAIM = """
local held = redis.call('get', KEYS[1])
if held and held ~= ARGV[2] then return held end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false
"""
#: An Idempotency-Key settled: KEYS[1] its key; if it still holds ARGV[1], it now holds ARGV[2] for
#: ARGV[3] ms, or with ARGV[2] "" is deleted. Another value (a later claim) is left alone.
SETTLE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then return redis.call('del', KEYS[1]) end
redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def chain_settles(
    later: dict[str, tuple[str, str | None]], earlier: dict[str, tuple[str, str | None]]
) -> dict[str, tuple[str, str | None]]:
    """Settles not yet written, `earlier` then `later`, as one each: a key's X -> Y then Y -> Z is
    X -> Z, since the store still holds X (a stream that started and failed within one batch)."""
    chained = dict(earlier)
    for name, (held, value) in later.items():
        if name in chained and chained[name][1] == held:
            held = chained[name][0]
        chained[name] = (held, value)
    return chained


ERRORS = (redis.RedisError, OSError, TimeoutError)  # what an unreachable or slow Redis raises
T = TypeVar("T")
ChatKey = tuple[bytes | None, str]  # (owner, chat id), as chatsvc names an AI SDK chat


class StoreUnavailable(Exception):
    """Redis did not answer in time (or no replica listens): the core's 503 resume_unavailable."""


# What the store needs from the core, described rather than imported


class StoreSettings(Protocol):
    """The settings the store reads, by chatsvc's names."""

    @property
    def RESUME_STORE_TIMEOUT_S(self) -> float: ...
    @property
    def RESUME_STORE_QUEUE_MB(self) -> float: ...
    @property
    def RESUME_TTL_S(self) -> float: ...
    @property
    def REQUEST_TIMEOUT_S(self) -> float: ...
    @property
    def CONNECT_TIMEOUT_S(self) -> float: ...
    @property
    def MAX_TOKENS(self) -> int: ...


class StoreMetrics(Protocol):
    """The store's metrics, which chatsvc's registry holds (and reports without a store too)."""

    @property
    def store_writes(self) -> Counter: ...  # round trips of the writer, by result
    @property
    def store_latency(self) -> Histogram: ...
    @property
    def store_unresumable(self) -> Counter: ...  # streams given up on, by reason


class Encoding(Protocol):
    """A chat protocol (chatsvc note 12) as the store knows it: its name, and how it encodes an event."""

    @property
    def path(self) -> str: ...
    @property
    def event(self) -> Callable[[str, int, str, dict[str, Any]], bytes]: ...


class Mirrored(Protocol):
    """A stream's log on its producing replica, as the writer reads it."""

    @property
    def stream_id(self) -> str: ...
    @property
    def chat(self) -> ChatKey | None: ...
    @property
    def correlation_id(self) -> str | None: ...  # of the request that started it, for the writer's lines
    @property
    def finished(self) -> bool: ...
    @property
    def delivered(self) -> bool: ...  # a follower has sent its terminal event
    @property
    def reached(self) -> int: ...  # how many events it had before a stop cut it, if one did (note 23)
    def __len__(self) -> int: ...


P = TypeVar("P", bound=Encoding)


def store_keys(stream_id: str) -> tuple[str, str]:
    """A stream's events (a Redis Stream) and its facts (a hash); one hash tag, so one cluster slot."""
    return f"chatsvc:{{{stream_id}}}:events", f"chatsvc:{{{stream_id}}}:facts"


def presence_key(stream_id: str) -> str:
    """Alive while a follower on a replica other than the producer's follows the stream (note 19)."""
    return f"chatsvc:{{{stream_id}}}:followed"


def idempotency_store_key(name: str) -> str:
    """An Idempotency-Key, by the digest that chatsvc names it with (never the key itself)."""
    return f"chatsvc:idempotency:{name}"


def chat_store_key(chat: ChatKey) -> str:
    owner, chat_id = chat
    return f"chatsvc:chat:{owner.hex() if owner else '-'}:{chat_id}"


def _same_owner(a: bytes | None, b: bytes | None) -> bool:
    """As chatsvc compares the owner of a stream it holds."""
    if a is None or b is None:
        return a is b
    return secrets.compare_digest(a, b)


class StreamCopy:
    """What the writer knows of one stream's copy: the events it has yet to write, and how far."""

    __slots__ = ("cut", "entry", "note", "stored", "unstored")

    def __init__(self) -> None:
        self.unstored: list[bytes] = []
        self.stored = 0  # events written (or handed to a write in flight)
        self.entry = 0  # the next Redis Stream entry's id is `{entry}-1`: its first event's seq, or past a cut
        self.cut: int | None = None  # events from this seq on, written already, are void (note 23)
        self.note: str | None = None  # why it is resumable on its own replica only, if it is


class RedisStore(Generic[P]):
    """Every replica's stream logs, in Redis (note 15). The producing replica's StreamLog stays the
    live path; this writer copies each log into a Redis Stream behind it, everything appended since
    its last round trip in one pipeline, and other replicas follow that copy with XREAD BLOCK. A
    DELETE reaches the producing replica by pub/sub."""

    unavailable: ClassVar[type[Exception]] = StoreUnavailable  # what a call raises when no answer comes

    def __init__(
        self,
        url: str,
        settings: StoreSettings,
        metrics: StoreMetrics,
        protocols: Mapping[str, P],
        *,
        error_body: Callable[[str, str], dict[str, Any]],
        pieces: Callable[[list[bytes], int, int], Iterator[bytes]],
        on_cancel: Callable[[str, str | None, int | None], None],
    ) -> None:
        self.metrics = metrics
        self.protocols = protocols  # by the name that a stream's facts give
        self.error_body = error_body  # an error event's body, from its code and detail
        self.pieces = pieces  # events as a follower's writes (note 20)
        self.on_cancel = on_cancel  # stop the stream with this id if it runs here: correlation id, last seq shown
        self.timeout = settings.RESUME_STORE_TIMEOUT_S  # every round trip's bound
        self.redis = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=min(settings.CONNECT_TIMEOUT_S, self.timeout),
            socket_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1),  # once, on a fresh connection (Redis restarted); no waits
        )
        # The writer's state of each log, kept as long as the log lives: the log is the core's.
        self.copies: weakref.WeakKeyDictionary[Mirrored, StreamCopy] = weakref.WeakKeyDictionary()
        # The writer's queue: the logs with something to write, in order, each once, so that a round
        # trip carries one XADD a stream. Not an asyncio.Queue: that bounds items, and full, makes the
        # producer wait or refuses the newest; here the bound is bytes, and the stream with the
        # longest backlog is given up on (note 15).
        self.dirty: dict[Mirrored, None] = {}
        self.queued = 0  # bytes in their `unstored` lists
        self.queue_limit = int(settings.RESUME_STORE_QUEUE_MB * 1024 * 1024)
        self.wake = asyncio.Event()
        # Streams whose facts must say a new state once Redis answers: unresumable (given up on), or
        # abandoned (nobody followed within the grace, note 19).
        self.marks: dict[str, str] = {}
        self.settling: dict[str, tuple[str, str | None]] = {}  # Idempotency-Keys: what each held, now holds
        self.live_ttl = math.ceil(settings.REQUEST_TIMEOUT_S + settings.RESUME_TTL_S + 10)  # outlives any run
        self.live_ttl_ms = self.live_ttl * 1000
        self.opening_ttl_ms = math.ceil(settings.REQUEST_TIMEOUT_S + 10) * 1000  # outlives any opening
        self.finished_ttl_ms = max(1, int(settings.RESUME_TTL_S * 1000))
        self.presence_ttl_ms = int(STORE_PRESENCE_TTL_S * 1000)
        self.replica_key = f"chatsvc:replica:{secrets.token_hex(8)}"  # alive while this replica is (note 19)
        self.bad_messages = 0  # malformed cancel messages since the last line about them
        self.bad_message_logged = -math.inf
        self.max_entries = settings.MAX_TOKENS + 16  # write batches: at most one per delta, meta, end
        self.block_ms = max(1, int(self.timeout * 500))  # an XREAD BLOCK returns well within the timeout
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(task) for task in (self.write(), self.listen(), self.stay_alive())]

    async def stop(self) -> None:
        """After the producers: one last write of what is queued (bounded), then close."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.dirty or self.settling:
            await self.write_once()
        await self.redis.aclose()

    async def answers(self) -> bool:
        try:
            return bool(await self.ask(self.redis.ping()))
        except StoreUnavailable:
            return False

    async def ask(self, command: Awaitable[T]) -> T:
        """One round trip outside the writer, bounded by RESUME_STORE_TIMEOUT_S."""
        try:
            with anyio.fail_after(self.timeout):
                return await command
        except ERRORS:
            raise StoreUnavailable("RESUME_STORE does not answer") from None

    def write_expiring(
        self, pipe: redis.asyncio.client.Pipeline, key: str, ttl_ms: int | None, *command: Any, existing: bool = False
    ) -> None:
        """Queue a write that sets the key's expiry in the same step (`ttl_ms`; None: the key's own),
        or (`existing`) that creates no key: no key lives without an expiry (note 19)."""
        pipe.eval(WRITE_EXPIRING, 1, key, "" if ttl_ms is None else ttl_ms, "XX" if existing else "", *command)

    # Writing: the producing replica

    async def stay_alive(self) -> None:
        """Renew this replica's liveness key: followers elsewhere end when it lapses (note 19)."""
        while True:
            with suppress(StoreUnavailable):  # `write` and `listen` log a lost Redis; a lapse means it
                await self.ask(self.redis.set(self.replica_key, 1, px=self.presence_ttl_ms))
            await asyncio.sleep(STORE_PRESENCE_S)

    def announce(
        self,
        stream_id: str,
        owner: bytes | None,
        protocol: P,
        chat: ChatKey | None,
        span_context: trace.SpanContext,
        prompt_tokens: int,
    ) -> asyncio.Task[BaseException | None]:
        """Write a new stream's facts while its upstream opens: no client learns the stream's id
        (from the response) before every replica can find it. The task's result is the failure, if any."""
        pipe = self.redis.pipeline(transaction=False)
        _, facts = store_keys(stream_id)
        ids = span_context
        fields = {
            "protocol": protocol.path,
            "owner": owner.hex() if owner else "",  # a keyed digest, never a key
            "trace": f"{ids.trace_id:032x}{ids.span_id:016x}" if ids.is_valid else "",
            "state": "live",
            "replica": self.replica_key,  # followers elsewhere end when it lapses (note 19)
            "prompt_tokens": prompt_tokens,  # for the usage of a `stream_lost` event
        }
        self.write_expiring(pipe, facts, self.live_ttl_ms, "HSET", *(x for item in fields.items() for x in item))
        if chat is not None:
            pipe.set(chat_store_key(chat), stream_id, ex=self.live_ttl)
        return asyncio.create_task(self.execute(pipe))

    async def execute(self, pipe: redis.asyncio.client.Pipeline) -> BaseException | None:
        """One round trip, bounded and counted; the failure, if any."""
        started = time.monotonic()
        try:
            with anyio.fail_after(self.timeout):
                await pipe.execute()
        except ERRORS as exc:
            self.metrics.store_writes.labels("failed").inc()
            return exc
        self.metrics.store_writes.labels("ok").inc()
        self.metrics.store_latency.observe(time.monotonic() - started)
        return None

    def copy_of(self, stream_log: Mirrored) -> StreamCopy:
        if (copy := self.copies.get(stream_log)) is None:
            copy = self.copies[stream_log] = StreamCopy()
        return copy

    def mirror(self, stream_log: Mirrored, entries: list[bytes], size: int) -> None:
        """Queue what was appended (or, with no entries, that the terminal event was delivered)."""
        copy = self.copy_of(stream_log)
        if copy.note is not None:
            return
        copy.unstored += entries
        self.queued += size
        self.dirty[stream_log] = None
        self.wake.set()
        while self.queued > self.queue_limit and self.dirty:  # the largest backlog goes first
            self.give_up(max(self.dirty, key=lambda d: sum(map(len, self.copies[d].unstored))), "behind", None)

    def cut(self, stream_log: Mirrored, length: int) -> None:
        """The log was cut to its first `length` events (note 23): those not yet written are dropped;
        if some were written, the next write, by the same writer and so in order with the appends,
        says that its events replace them from `length` on."""
        copy = self.copy_of(stream_log)
        if copy.note is not None:
            return
        kept = max(0, length - copy.stored)
        self.queued -= sum(map(len, copy.unstored[kept:]))
        copy.unstored = copy.unstored[:kept]
        if copy.stored > length:
            copy.cut = copy.stored = length

    def give_up(self, stream_log: Mirrored, reason: str, exc: BaseException | None) -> None:
        """This stream's copy stays incomplete: resumable on this replica only, with a log line and a metric."""
        copy = self.copy_of(stream_log)
        if copy.note is not None:
            return
        copy.note = reason
        self.queued -= sum(map(len, copy.unstored))
        copy.unstored = []
        self.dirty.pop(stream_log, None)
        self.mark(stream_log.stream_id, "unresumable")
        self.metrics.store_unresumable.labels(reason).inc()
        token = correlation_id.set(stream_log.correlation_id)  # the writer's task serves every stream
        try:
            log.warning(
                "store_behind" if reason == "behind" else "store_write_failed",
                extra={"stream_id": stream_log.stream_id, "stored_seq": copy.stored - 1,
                       "exception": type(exc).__name__ if exc else None},
            )  # fmt: skip
        finally:
            correlation_id.reset(token)

    def mark(self, stream_id: str, state: str) -> None:
        """Write this state into the stream's facts with the next round trip."""
        self.marks[stream_id] = state
        self.wake.set()

    async def write(self) -> None:
        while True:
            await self.wake.wait()
            await asyncio.sleep(STORE_WRITE_INTERVAL_S)  # what comes meanwhile shares the round trip
            self.wake.clear()
            await self.write_once()

    async def write_once(self) -> None:
        """One pipelined round trip for everything queued; a failure gives up on the streams in it."""
        batch, self.dirty = list(self.dirty), {}
        marking, self.marks = self.marks, {}
        settling, self.settling = self.settling, {}
        pipe = self.redis.pipeline(transaction=False)
        for stream_log in batch:
            self.queue_writes(pipe, stream_log)
        for stream_id, state in marking.items():
            events, facts = store_keys(stream_id)
            if state == "unresumable":  # given up on, perhaps before its facts went out: they may be new
                self.write_expiring(pipe, facts, self.live_ttl_ms, "HSET", "state", state)
            else:  # abandoned: gone everywhere once RESUME_TTL_S has passed, as a finished one
                self.write_expiring(pipe, facts, self.finished_ttl_ms, "HSET", "state", state, existing=True)
                pipe.pexpire(events, self.finished_ttl_ms)
        for name, (held, value) in settling.items():
            pipe.eval(SETTLE, 1, idempotency_store_key(name), held, value or "", self.live_ttl_ms)
        if (failure := await self.execute(pipe)) is not None:
            self.marks = {**marking, **self.marks}
            self.settling = chain_settles(self.settling, settling)
            for stream_log in batch:
                self.give_up(stream_log, "failed", failure)

    def queue_writes(self, pipe: redis.asyncio.client.Pipeline, stream_log: Mirrored) -> None:
        """One XADD of the events not yet written, under the id of the first one's seq (past a cut, of
        the seq that the log's first event past the old end had: ids only grow); the expiry
        moved to RESUME_TTL_S with the terminal one (the facts went out with `announce`). Only the
        first XADD creates the Redis Stream, with its expiry in the same step (note 19)."""
        copy = self.copies[stream_log]
        entries, first, entry = copy.unstored, copy.stored, copy.entry
        self.queued -= sum(map(len, entries))
        copy.unstored = []
        copy.stored += len(entries)
        copy.entry += len(entries)
        events, facts = store_keys(stream_log.stream_id)
        if entries:
            fields: dict[Any, Any] = {str(first + i): event for i, event in enumerate(entries)}
            if copy.cut is not None:  # first: a reader drops what it holds from there on (note 23)
                fields = {"cut": str(copy.cut), **fields}
                copy.cut = None
            ended = stream_log.finished and copy.stored == len(stream_log)
            if ended:
                fields["end"] = b""
                if stream_log.reached:  # before the end: a reader that sees the end sees it (`find`)
                    self.write_expiring(pipe, facts, None, "HSET", "reached", str(stream_log.reached), existing=True)
            if entry == 0:
                flat = (x for item in fields.items() for x in item)
                self.write_expiring(pipe, events, self.live_ttl_ms, "XADD", "MAXLEN", self.max_entries, "0-1", *flat)
            else:
                pipe.xadd(events, fields, id=f"{entry}-1", maxlen=self.max_entries, approximate=False, nomkstream=True)
            if ended:
                self.write_expiring(pipe, facts, self.finished_ttl_ms, "HSET", "state", "finished", existing=True)
                for key in (events, *([chat_store_key(stream_log.chat)] if stream_log.chat else [])):
                    pipe.pexpire(key, self.finished_ttl_ms)
        if stream_log.delivered:  # perhaps after the facts expired: then nothing is written
            self.write_expiring(pipe, facts, None, "HSET", "delivered", "1", existing=True)

    # Idempotency-Keys: any replica

    async def claim(self, name: str, value: str, replaced: str | None) -> str | None:
        """Take the key with `value` unless it holds another value than `replaced`: None when taken,
        else what it holds. While its stream opens, it lives as long as an opening can last."""
        held = await self.ask(
            self.redis.eval(CLAIM, 1, idempotency_store_key(name), value, replaced or "", self.opening_ttl_ms)
        )
        return held.decode() if isinstance(held, bytes) else None

    def settle(self, name: str, held: str, value: str | None) -> None:
        """With the next write: the stream started (`value`, kept as long as the stream's facts can
        be), or never will (None: the key is free). Queued, so that the live path never waits."""
        self.settling = chain_settles({name: (held, value)}, self.settling)
        self.wake.set()

    # Reading: any replica

    async def find(self, stream_id: str, owner: bytes | None) -> RemoteLog[P] | None:
        """A stream from the store, its facts checked as chatsvc checks a local one: None when there
        is none, another owner's, or abandoned; StoreUnavailable when its copy is incomplete."""
        events, facts_key = store_keys(stream_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(events)  # all so far, for the follower's replay: one round trip in all
        pipe.hgetall(facts_key)  # after them: the facts written with (before) the last events read
        read, facts = await self.ask(pipe.execute())
        if not facts:
            return None
        if b"owner" in facts and not _same_owner(bytes.fromhex(facts[b"owner"].decode()) or None, owner):
            return None
        if facts.get(b"state") == b"abandoned":  # as its own replica answers (note 19)
            return None
        if facts.get(b"state") == b"unresumable" or b"protocol" not in facts:  # given up on before its facts
            raise StoreUnavailable("this stream's copy in RESUME_STORE is incomplete")
        length, finished = 0, False
        if read:
            fields = read[-1][1]
            length = max(int(key) for key in fields if key not in (b"end", b"cut")) + 1
            finished = b"end" in fields
        return RemoteLog(self, stream_id, facts, read, length, finished)

    async def followed_elsewhere_ms(self, stream_id: str) -> int:
        """How long the presence of followers on other replicas lasts yet (note 19), in ms; 0 for
        none, and when Redis does not answer: then no other replica can follow the stream either."""
        try:
            return max(0, await self.ask(self.redis.pttl(presence_key(stream_id))))
        except StoreUnavailable:
            return 0

    async def delivered(self, stream_id: str) -> bool:
        """Whether a follower (on any replica) has sent the stream's terminal event."""
        return bool(await self.ask(self.redis.hget(store_keys(stream_id)[1], "delivered")))

    async def find_chat(self, chat: ChatKey) -> str | None:
        stream_id: bytes | None = await self.ask(self.redis.get(chat_store_key(chat)))  # type: ignore[arg-type]
        return stream_id.decode() if stream_id else None

    # Stopping: DELETE on any replica

    async def cancel(self, stream_id: str, after: int | None) -> None:
        """Tell every replica; the one producing the stream stops it (`listen`), after the event
        `after` if one is named (note 23)."""
        # With the DELETE's correlation id: the producing replica logs stream_cancelled with it.
        message = f"{stream_id} {correlation_id.get() or ''}" + ("" if after is None else f" {after}")
        listeners = await self.ask(self.redis.publish(CANCEL_CHANNEL, message))
        if not listeners:  # no replica hears: not even the one producing it
            raise StoreUnavailable("no replica is listening on RESUME_STORE")

    async def listen(self) -> None:
        """Cancel the local producers that a DELETE on another replica names; resubscribe after a loss."""
        lost = False
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    if lost:
                        log.info("store_reconnected")
                        lost = False
                    while True:
                        message = await pubsub.get_message(timeout=self.timeout / 2)
                        if message is not None:
                            self.cancel_named(message["data"])
            except ERRORS as exc:
                if not lost:
                    log.warning("store_unreachable", extra={"exception": type(exc).__name__})
                    lost = True
                await asyncio.sleep(self.timeout)

    def cancel_named(self, data: bytes) -> None:
        """Cancel the producer that a cancel message names, if it is here. Anyone who can publish to
        Redis can send anything: what is not `<stream id> <correlation id>[ <last seq shown>]` is
        counted and ignored. (A replica that does not know the seq takes it as part of the id.)"""
        try:
            stream_id, _, rest = data.decode().partition(" ")
            request_id, _, after = rest.partition(" ")
            if after and not CANCEL_AFTER.fullmatch(after):
                raise ValueError(after)
        except (AttributeError, UnicodeDecodeError, ValueError):
            self.bad_messages += 1
            if time.monotonic() - self.bad_message_logged >= STORE_BAD_MESSAGE_LOG_S:  # a flood is one line
                self.bad_message_logged = time.monotonic()
                size = len(data) if isinstance(data, bytes) else None
                log.warning("store_bad_message", extra={"bytes": size, "ignored": self.bad_messages})
                self.bad_messages = 0
            return
        self.on_cancel(stream_id, request_id or None, int(after) if after else None)


class RemoteLog(Generic[P]):
    """A stream produced on another replica, read from the store (note 15), with the face that
    chatsvc's followers and resumes know from a StreamLog."""

    def __init__(
        self, store: RedisStore[P], stream_id: str, facts: dict[bytes, bytes], read: Any, length: int, finished: bool
    ) -> None:
        self.store = store
        self.read: Any = read  # the entries that `find` read: the replay's first batch
        self.stream_id = stream_id
        self.protocol = store.protocols[facts[b"protocol"].decode()]
        self.length = length
        self.finished = finished
        self.delivered = facts.get(b"delivered") == b"1"
        self.reached = int(facts.get(b"reached", b"0"))  # how many events it had before a stop cut it (note 23)
        self.replica_key = facts.get(b"replica", b"").decode()  # the producing replica's liveness (note 19)
        self.prompt_tokens = int(facts.get(b"prompt_tokens", b"0"))
        trace_ids = facts.get(b"trace", b"").decode()
        self.span_context = (
            trace.SpanContext(int(trace_ids[:32], 16), int(trace_ids[32:], 16), is_remote=True)
            if trace_ids
            else trace.INVALID_SPAN_CONTEXT
        )

    def __len__(self) -> int:
        return self.length

    def attach(self) -> None:
        pass  # the grace is the producing replica's affair

    def detach(self, *, too_slow: bool) -> None:
        pass

    async def follow(self, position: int) -> AsyncIterator[bytes]:
        """The events from `position` on: the store's copy so far, then each write as XREAD BLOCK
        returns it, to the terminal event. A gap, an incomplete copy or a lost store ends the
        response without one: the client's reconnect then gets its answer (404 or 503). While it
        follows, its presence keeps the producer's grace from running out; a producer that is gone
        ends it with an `error` event `stream_lost` (note 19)."""
        redis_client, events, facts = self.store.redis, *store_keys(self.stream_id)
        timeout = self.store.timeout
        last_id: Any = None  # the last entry read
        expected = 0  # the seq that the next event must have
        read: Any  # [(entry id, {seq: event, ..., maybe b"end": b""})], bytes all (no decoding)
        batch: list[bytes] = []  # the events of one read to send (emptied once sent)
        present_until = 0.0  # when the presence key must be renewed
        try:
            while True:
                if time.monotonic() >= present_until:  # one round trip every STORE_PRESENCE_S, not per read
                    present_until = time.monotonic() + STORE_PRESENCE_S
                    with anyio.fail_after(timeout):
                        await redis_client.set(presence_key(self.stream_id), 1, px=self.store.presence_ttl_ms)
                with anyio.fail_after(timeout):
                    if last_id is None:
                        read, self.read = self.read, None
                    else:
                        reply: Any = await redis_client.xread({events: last_id}, block=self.store.block_ms)
                        read = reply[0][1] if reply else []  # RESP2: [[key, entries]]
                if not read:
                    pipe = redis_client.pipeline(transaction=False)
                    pipe.hget(facts, "state")
                    pipe.exists(self.replica_key or facts)  # facts: a copy by a replica that names none
                    with anyio.fail_after(timeout):
                        state, producing = await pipe.execute()
                    if state in (None, b"unresumable"):
                        log.warning("store_follow_ended", extra={"stream_id": self.stream_id, "seq": expected - 1})
                        return
                    if state == b"abandoned" or (state == b"live" and not producing):
                        yield self.lost_event(expected, state.decode())
                        return
                    last_id = last_id or "0-0"
                    continue
                ended = False
                for entry_id, fields in read:
                    last_id = entry_id
                    for key, value in fields.items():
                        if key == b"end":
                            ended = True
                        elif key == b"cut":  # note 23: the events from this seq on are void, the next replace them
                            cut = int(value)
                            del batch[max(0, len(batch) - (expected - cut)) :]  # it holds seqs up to expected
                            expected = cut
                            position = min(position, cut)  # past the cut, a follower still gets the end
                        elif int(key) != expected:  # trimmed or lost: never a stream with a hole
                            log.warning("store_gap", extra={"stream_id": self.stream_id, "seq": expected})
                            return
                        else:
                            expected += 1
                            if expected > position:
                                batch.append(value)
                for piece in self.store.pieces(batch, 0, len(batch)):  # note 20
                    yield piece
                # Sent: nothing of what was read stays in this frame while it waits (a cancelled
                # follower's frame stays in anyio's cycle until a collection: chatsvc note 10).
                read = reply = fields = value = None
                batch, piece = [], b""
                if ended:
                    pipe = redis_client.pipeline(transaction=False)
                    self.store.write_expiring(pipe, facts, None, "HSET", "delivered", "1", existing=True)
                    with anyio.fail_after(timeout):
                        await pipe.execute()
                    return
        except ERRORS as exc:
            log.warning("store_read_failed", extra={"stream_id": self.stream_id, "exception": type(exc).__name__})
        finally:
            del self  # a cancelled follower's frame stays in anyio's cycle: not this copy with it

    def lost_event(self, seq: int, state: str) -> bytes:
        """The terminal event for a follower whose producer is gone: its replica stopped (or, in a
        race with the grace, it was abandoned) before the stream's end reached the store."""
        log.warning("store_stream_lost", extra={"stream_id": self.stream_id, "seq": seq - 1, "state": state})
        error = self.store.error_body("stream_lost", "the replica producing this stream stopped before its end")
        completion = max(0, seq - 1)  # one entry a delta after the meta (an estimate, note 6)
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "source": "estimated",
        }
        return self.protocol.event(self.stream_id, seq, "error", {**error, "usage": usage})


def check_redis(url: str, timeout_s: float) -> None:
    """At start: that this Redis answers within `timeout_s`; StoreUnavailable naming the failure if not."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StoreUnavailable(type(exc).__name__) from None
    finally:
        client.close()
