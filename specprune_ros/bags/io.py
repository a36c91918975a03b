"""Opening, checking and writing rosbag2 bags (MCAP by default, sqlite3 on request) with ``rosbags``.

Every failure a user can cause (no such bag, truncated or corrupt file, a topic missing or of the wrong
type, a type nobody can decode) surfaces as ``BagError`` whose message names the bag, the topic and the
problem; CLIs print it and exit with status 2 instead of showing a traceback.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from rosbags.highlevel import AnyReader, AnyReaderError
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_typestore

STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
BAG_VERSION = 9
# rosbags' sqlite3 writer keeps every message in one transaction until close: a crash or a failed write would
# roll all of them back, so BagWriter commits this often (MCAP loses at most its open chunk anyway)
SQLITE_COMMIT_MESSAGES = 100
SQLITE_COMMIT_PERIOD_S = 1.0


class BagError(ValueError):
    """A bag that cannot be used as asked; the message says which bag, topic and problem."""


def default_typestore():
    """The ROS 2 Kilted message definitions (the newest ROS 2 store when this rosbags has no Kilted)."""
    store = getattr(Stores, 'ROS2_KILTED', None)
    if store is None:
        candidates = [s for s in Stores if s.name.startswith('ROS2_')]
        store = candidates[-1] if candidates else Stores.LATEST
    return get_typestore(store)


def normalize_topic(topic: str) -> str:
    """Absolute topic name ('camera/x' -> '/camera/x')."""
    topic = topic.strip()
    return topic if topic.startswith('/') else '/' + topic


# --- QoS as stored in bag metadata -----------------------------------------------------------------------------
_ZERO = QosTime(sec=0, nsec=0)
_INFINITE = QosTime(sec=2147483647, nsec=4294967295)


def make_qos(reliable: bool = True, transient_local: bool = False, depth: int = 10) -> Qos:
    return Qos(history=QosHistory.KEEP_LAST, depth=depth,
               reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
               durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
               deadline=_INFINITE, lifespan=_INFINITE, liveliness=QosLiveliness.AUTOMATIC,
               liveliness_lease_duration=_INFINITE, avoid_ros_namespace_conventions=False)


def qos_summary(profiles: Sequence[Any]) -> tuple[bool, bool]:
    """(reliable, transient_local) that a publisher replaying these offered profiles should use.

    Reliable unless every recorded publisher was best effort; transient local if any was.
    """
    if not profiles:
        return True, False
    reliable = any(getattr(p, 'reliability', None) != QosReliability.BEST_EFFORT for p in profiles)
    transient = any(getattr(p, 'durability', None) == QosDurability.TRANSIENT_LOCAL for p in profiles)
    return reliable, transient


# --- reading ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopicInfo:
    topic: str
    msgtype: str
    count: int
    offered_qos: tuple = ()


class BagReader:
    """``AnyReader`` with clear errors; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._reader: Optional[AnyReader] = None

    def __enter__(self) -> 'BagReader':
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        path = self.path
        if not path.exists():
            raise BagError(f'bag {path}: no such file or directory')
        if path.is_file() and path.suffix in ('.mcap', '.db3'):
            raise BagError(f'bag {path}: give the bag directory (with metadata.yaml), not the storage file')
        if path.is_dir() and not (path / 'metadata.yaml').is_file():
            raise BagError(f'bag {path}: not a rosbag2 directory (metadata.yaml is missing)')
        try:
            self._reader = AnyReader([path], default_typestore=default_typestore())
            self._reader.open()
        except (AnyReaderError, FileNotFoundError, OSError, KeyError, ValueError, struct.error, EOFError) as error:
            self._reader = None
            text = _describe(error)
            if 'message type' in text.lower() or 'msgdef' in text.lower() or 'hash mismatch' in text.lower():
                hint = 'a message definition stored in the bag is broken or does not match its type'
            elif 'metadata' in text.lower() or 'yaml' in text.lower():
                hint = 'metadata.yaml is damaged'
            else:
                hint = ('the file is truncated or corrupt (an interrupted recording: re-record it, or re-index '
                        'it with ros2 bag reindex)')
            raise BagError(f'bag {path}: cannot be opened ({text}); {hint}') from None

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:
                pass
            self._reader = None

    @property
    def reader(self) -> AnyReader:
        if self._reader is None:
            raise BagError(f'bag {self.path}: not open')
        return self._reader

    def topics(self) -> dict[str, TopicInfo]:
        out: dict[str, TopicInfo] = {}
        for connection in self.reader.connections:
            qos = tuple(getattr(getattr(connection, 'ext', None), 'offered_qos_profiles', ()) or ())
            previous = out.get(connection.topic)
            count = connection.msgcount + (previous.count if previous else 0)
            out[connection.topic] = TopicInfo(connection.topic, connection.msgtype, count,
                                              qos + (previous.offered_qos if previous else ()))
        return out

    def require(self, topic: str, allowed_types: Iterable[str], what: str) -> TopicInfo:
        """The topic's info; ``BagError`` when it is missing, empty or of another type."""
        allowed = tuple(allowed_types)
        topics = self.topics()
        info = topics.get(topic)
        if info is None:
            listing = ', '.join(f'{t} ({i.msgtype})' for t, i in sorted(topics.items())) or 'no topics at all'
            raise BagError(f'bag {self.path}: {what} topic {topic} is missing; the bag has: {listing}')
        if info.msgtype not in allowed:
            raise BagError(f'bag {self.path}: {what} topic {topic} has type {info.msgtype}, expected '
                           f"{' or '.join(allowed)}")
        if info.count == 0:
            raise BagError(f'bag {self.path}: {what} topic {topic} has no messages')
        return info

    def raw_messages(self, topics: Optional[Iterable[str]] = None, start_ns: Optional[int] = None,
                     stop_ns: Optional[int] = None) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, msgtype, bag time ns, raw CDR) in bag-time order; ``BagError`` on a truncated file."""
        wanted = None if topics is None else set(topics)
        connections = [c for c in self.reader.connections if wanted is None or c.topic in wanted]
        if not connections:
            return
        try:
            for connection, timestamp, raw in self.reader.messages(connections=connections, start=start_ns,
                                                                   stop=stop_ns):
                yield connection.topic, connection.msgtype, timestamp, raw
        except (AnyReaderError, OSError, KeyError, ValueError, struct.error, EOFError, IndexError) as error:
            raise BagError(f'bag {self.path}: reading failed ({_describe(error)}); the file is truncated or '
                           'corrupt') from None
        except Exception as error:  # the storage libraries raise their own types for broken files
            if type(error).__module__.split('.')[0] in ('rosbags', 'sqlite3', 'apsw', 'zstandard', 'lz4'):
                raise BagError(f'bag {self.path}: reading failed ({_describe(error)}); the file is truncated '
                               'or corrupt') from None
            raise

    def deserialize(self, raw: bytes, msgtype: str, topic: str = '') -> Any:
        try:
            return self.reader.deserialize(raw, msgtype)
        except Exception as error:
            where = f' on {topic}' if topic else ''
            raise BagError(f'bag {self.path}: cannot decode a {msgtype} message{where} ({_describe(error)}); '
                           'unknown type or corrupt data') from None

    @property
    def start_time(self) -> int:
        return self.reader.start_time

    @property
    def end_time(self) -> int:
        return self.reader.end_time


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return f'{type(error).__name__}: {text}' if type(error).__name__ not in text else text


def check_types_known(reader: BagReader, topics: Iterable[str]) -> None:
    """``BagError`` naming each topic whose type neither the bag nor the typestore defines."""
    store = reader.reader.typestore
    infos = reader.topics()
    unknown = [f'{t} ({infos[t].msgtype})' for t in topics if t in infos and infos[t].msgtype not in store.types]
    if unknown:
        raise BagError(f'bag {reader.path}: unknown message type on {", ".join(unknown)}: the bag carries no '
                       'definition and the ROS 2 typestore does not know it')


# --- writing ---------------------------------------------------------------------------------------------------
def custom_type_hash(msgtype: str, msgdef: str) -> str:
    """RIHS01 hash of a ``.msg`` definition that the standard typestore does not know."""
    from rosbags.typesys import get_types_from_msg
    store = default_typestore()
    try:
        store.register(get_types_from_msg(msgdef, msgtype))
        return store.hash_rihs01(msgtype)
    except Exception as error:
        raise BagError(f'message type {msgtype}: invalid definition ({_describe(error)})') from None


class BagWriter:
    """A new rosbag2 bag; ``add_topic`` once per topic, then ``write`` (message objects) or ``write_raw`` (CDR).

    sqlite3 bags are committed every ``SQLITE_COMMIT_MESSAGES`` messages or ``SQLITE_COMMIT_PERIOD_S`` seconds,
    so a killed process leaves the committed messages readable. After a failed write, ``close`` makes the
    metadata (and ``counts``) say what the database holds, not what was handed to it.
    """

    def __init__(self, path: str | Path, storage: str = 'mcap', typestore: Any = None) -> None:
        if storage not in STORAGES:
            raise BagError(f'storage must be one of {sorted(STORAGES)}, got {storage!r}')
        self.path = Path(path)
        self.storage = storage
        self.typestore = typestore or default_typestore()
        try:
            self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=STORAGES[storage])
        except WriterError as error:
            raise BagError(f'bag {self.path}: {error}') from None
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.write_failed = False
        self._uncommitted = 0
        self._committed_at = time.monotonic()

    def __enter__(self) -> 'BagWriter':
        self.open()
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        self.close()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer.open()

    def close(self) -> None:
        """Write the metadata and close; after a failed sqlite3 write, the counts are those of the database."""
        if self.write_failed and self.storage == 'sqlite3':
            self._recount_sqlite()
        self._writer.close()

    def has_topic(self, topic: str) -> bool:
        return topic in self._connections

    def add_topic(self, topic: str, msgtype: str, qos: Optional[Sequence[Qos]] = None,
                  msgdef: Optional[str] = None, rihs01: Optional[str] = None) -> None:
        if topic in self._connections:
            return
        if msgdef is None and msgtype not in self.typestore.types:
            raise BagError(f'cannot record {topic}: message type {msgtype} is unknown to the ROS 2 typestore '
                           '(no definition to store in the bag)')
        kwargs: dict[str, Any] = {'offered_qos_profiles': list(qos or [make_qos()])}
        if msgdef is not None:
            if not rihs01:
                rihs01 = custom_type_hash(msgtype, msgdef)
            kwargs.update(msgdef=msgdef, rihs01=rihs01)
        else:
            kwargs['typestore'] = self.typestore
        self._connections[topic] = self._writer.add_connection(topic, msgtype, **kwargs)
        self.counts[topic] = 0

    def write_raw(self, topic: str, timestamp_ns: int, data: bytes) -> None:
        try:
            self._writer.write(self._connections[topic], int(timestamp_ns), data)
        except Exception:
            self.write_failed = True
            raise
        self.counts[topic] += 1
        if self.storage == 'sqlite3':
            self._uncommitted += 1
            if self._uncommitted >= SQLITE_COMMIT_MESSAGES \
                    or time.monotonic() - self._committed_at >= SQLITE_COMMIT_PERIOD_S:
                self.commit()

    def write(self, topic: str, timestamp_ns: int, message: Any) -> None:
        msgtype = self._connections[topic].msgtype
        self.write_raw(topic, timestamp_ns, self.typestore.serialize_cdr(message, msgtype))

    def commit(self) -> None:
        """Make the messages written so far durable (sqlite3; MCAP writes its chunks as they fill)."""
        connection = self._sqlite_connection()
        if connection is None:
            return
        try:
            connection.commit()
        except Exception:
            self.write_failed = True
            raise
        self._uncommitted = 0
        self._committed_at = time.monotonic()

    def _sqlite_connection(self) -> Any:
        """The sqlite3 connection of rosbags' storage writer, or None (MCAP, or a rosbags without one)."""
        connection = getattr(getattr(self._writer, 'storage', None), 'conn', None)
        return connection if callable(getattr(connection, 'commit', None)) else None

    def _recount_sqlite(self) -> None:
        """Drop the failed transaction and take counts and time span from the rows the database holds.

        rosbags writes metadata.yaml from its own counters, which include messages of the rolled-back transaction.
        """
        connection = self._sqlite_connection()
        counts = getattr(self._writer, 'counts', None)
        if connection is None or not isinstance(counts, dict):
            return
        connection.rollback()
        rows = connection.execute('SELECT topic_id, COUNT(*), MIN(timestamp), MAX(timestamp) FROM messages '
                                  'GROUP BY topic_id').fetchall()
        held = {topic_id: (count, low, high) for topic_id, count, low, high in rows}
        for topic, bag_connection in self._connections.items():
            count = held.get(bag_connection.id, (0,))[0]
            counts[bag_connection.id] = count
            self.counts[topic] = count
        if held:
            self._writer.min_timestamp = min(low for _, low, _ in held.values())
            self._writer.max_timestamp = max(high for _, _, high in held.values())
        else:
            self._writer.min_timestamp, self._writer.max_timestamp = 2**63 - 1, 0
