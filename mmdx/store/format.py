"""Read and write the mmdx HDF5 layout; the only module that calls h5py.

The layout is specified in ``docs/store-format.md``. In short, a store is a
main HDF5 file plus a journal folder beside it (``<store>.journal/``). The
main file is never modified in place: writers commit each batch as a new
shard file in the journal (written under a temporary name, fsynced, then
renamed), and a compaction writes a fresh main file from the old one and the
journal, fsyncs it and renames it over the old one. A reader therefore sees
either the old or the new main file, never a half-written one.

Shards carry a sequence number that grows across compactions. The main file
records the highest sequence folded into it (``journal_applied_through``), so
shards a killed compaction left behind are ignored by readers and deleted by
the next writer, and never applied twice.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from mmdx import __version__
from mmdx.atomic import fsync_path
from mmdx.errors import StoreError

__all__ = [
    "FORMAT_VERSION",
    "FeatureSet",
    "Rows",
    "SetHeader",
    "journal_dir",
    "list_shards",
    "shard_sequence",
    "read_store",
    "rebuild_main",
    "write_shard",
]

FORMAT_VERSION = 1
ROOT_GROUP = "feature_sets"
APPLIED_ATTR = "journal_applied_through"
SHARD_SUFFIX = ".shard.h5"
_SHARD_NAME = re.compile(r"^(\d{12})-[0-9a-f]{8}" + re.escape(SHARD_SUFFIX) + "$")
logger = logging.getLogger(__name__)

_STR = h5py.string_dtype(encoding="utf-8")
_ROW_CHUNK = 1024


@dataclass
class SetHeader:
    """Identity and provenance of one feature set.

    ``config`` is the identity: two embed runs with equal configs write to the
    same feature set, any difference makes a new one. ``info`` holds
    provenance that does not change the vectors' meaning (for example counts
    of truncated texts), and is replaced by the latest writer.
    """

    name: str
    modality: str
    encoder: str
    width: int
    config: dict
    info: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    mmdx_version: str = __version__

    def to_attrs(self) -> dict:
        return {
            "modality": self.modality,
            "encoder": self.encoder,
            "width": int(self.width),
            "config_json": canonical_json(self.config),
            "info_json": canonical_json(self.info),
            "created": self.created,
            "updated": self.updated,
            "mmdx_version": self.mmdx_version,
        }

    @classmethod
    def from_attrs(cls, name: str, attrs, where: str) -> "SetHeader":
        try:
            return cls(
                name=name,
                modality=str(attrs["modality"]),
                encoder=str(attrs["encoder"]),
                width=int(attrs["width"]),
                config=json.loads(attrs["config_json"]),
                info=json.loads(attrs.get("info_json", "{}")),
                created=str(attrs.get("created", "")),
                updated=str(attrs.get("updated", "")),
                mmdx_version=str(attrs.get("mmdx_version", "")),
            )
        except (KeyError, ValueError) as exc:
            raise StoreError(
                f"{where}: feature set {name!r} has missing or invalid attributes ({exc}); "
                "run `mmdx store verify` on it"
            ) from exc


@dataclass
class Rows:
    """Rows of one feature set: one vector per (patient ID, item, view)."""

    patient_ids: np.ndarray  # object array of str
    items: np.ndarray  # object array of str: image path or text row
    hashes: np.ndarray  # object array of str: SHA-256 of the item's content
    views: np.ndarray  # int32: 0 for the plain item, k >= 1 for augmented view k
    vectors: np.ndarray  # float32, (n, width)

    def __len__(self) -> int:
        return len(self.patient_ids)

    @classmethod
    def empty(cls, width: int) -> "Rows":
        return cls(
            np.empty(0, dtype=object),
            np.empty(0, dtype=object),
            np.empty(0, dtype=object),
            np.empty(0, dtype=np.int32),
            np.empty((0, width), dtype=np.float32),
        )

    def keys(self) -> list[tuple[str, str, int]]:
        return list(zip(self.patient_ids.tolist(), self.items.tolist(), self.views.tolist()))


@dataclass
class FeatureSet:
    """A feature set as read: its header and its rows (journal applied)."""

    header: SetHeader
    rows: Rows

    @property
    def name(self) -> str:
        return self.header.name


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def journal_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".journal")


def list_shards(store_path: Path, after: int = 0) -> list[Path]:
    """Return the committed journal shards with a sequence above ``after``, in commit order.

    Temporary files of a shard being written are never listed.
    """
    folder = journal_dir(store_path)
    if not folder.is_dir():
        return []
    shards = [p for p in folder.iterdir() if _SHARD_NAME.match(p.name) and shard_sequence(p) > after]
    return sorted(shards, key=lambda p: p.name)


def shard_sequence(shard: Path) -> int:
    """Return the commit sequence number in a shard's file name."""
    return int(shard.name[:12])


def applied_through(store_path: Path) -> int:
    """Return the highest journal sequence folded into the main file (0 without a main file)."""
    if not store_path.exists():
        return 0
    with _open_h5(store_path) as handle:
        _check_version(handle, store_path)
        return int(handle.attrs.get(APPLIED_ATTR, 0))


def next_sequence(store_path: Path) -> int:
    """Return the sequence number the next shard gets; the caller holds the writer lock."""
    shards = list_shards(store_path)
    last = shard_sequence(shards[-1]) if shards else 0
    return max(last, applied_through(store_path)) + 1


def _contiguous(shards: list[Path], after: int) -> bool:
    expected = range(after + 1, after + 1 + len(shards))
    return [shard_sequence(p) for p in shards] == list(expected)


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode, locking=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not path.exists():
            # HDF5 reports a file deleted during its open (a shard folded by a
            # compaction) as a generic OSError; readers retry on FileNotFoundError.
            raise FileNotFoundError(path) from exc
        raise StoreError(
            f"{path}: not a readable HDF5 file ({exc}); "
            "check the path, or restore the store from a copy"
        ) from exc


def _check_version(handle: h5py.File, path: Path) -> None:
    version = handle.attrs.get("mmdx_format_version")
    if version is None:
        raise StoreError(
            f"{path}: HDF5 file without an mmdx_format_version attribute, so not an mmdx store; "
            "choose another --store path"
        )
    if int(version) > FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {int(version)} is newer than this mmdx "
            f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade mmdx"
        )


def _create_row_datasets(group: h5py.Group, width: int) -> None:
    chunk_rows = max(1, min(_ROW_CHUNK, (1 << 20) // max(4 * width, 1)))
    for key in ("patient_id", "item", "item_hash"):
        group.create_dataset(key, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(_ROW_CHUNK,))
    group.create_dataset("view", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(_ROW_CHUNK,))
    group.create_dataset(
        "vectors",
        shape=(0, width),
        maxshape=(None, width),
        dtype=np.float32,
        chunks=(chunk_rows, width),
    )


def _append_rows(group: h5py.Group, rows: Rows) -> None:
    n_old = group["patient_id"].shape[0]
    n_new = n_old + len(rows)
    for key, values in (
        ("patient_id", rows.patient_ids),
        ("item", rows.items),
        ("item_hash", rows.hashes),
        ("view", rows.views),
    ):
        group[key].resize((n_new,))
        group[key][n_old:n_new] = values
    group["vectors"].resize((n_new, group["vectors"].shape[1]))
    group["vectors"][n_old:n_new] = rows.vectors


def _read_keys(group: h5py.Group) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    patient_ids = np.asarray(group["patient_id"].asstr()[()], dtype=object)
    items = np.asarray(group["item"].asstr()[()], dtype=object)
    hashes = np.asarray(group["item_hash"].asstr()[()], dtype=object)
    views = np.asarray(group["view"][()], dtype=np.int32)
    return patient_ids, items, hashes, views


def _read_rows(group: h5py.Group, with_vectors: bool, where: str = "") -> Rows:
    patient_ids, items, hashes, views = _read_keys(group)
    width = int(group.attrs.get("width", group["vectors"].shape[1]))
    if group["vectors"].ndim != 2 or group["vectors"].shape[1] != width:
        raise StoreError(
            f"{where or group.file.filename}: feature set {group.name.split('/')[-1]!r} has vectors of shape "
            f"{group['vectors'].shape} but width {width}; run `mmdx store verify` on the store"
        )
    if with_vectors:
        vectors = np.asarray(group["vectors"][()], dtype=np.float32)
    else:
        vectors = np.empty((group["vectors"].shape[0], 0), dtype=np.float32)
    if vectors.shape[0] != len(patient_ids) or not (len(items) == len(hashes) == len(views) == len(patient_ids)):
        raise StoreError(
            f"{where or group.file.filename}: feature set {group.name.split('/')[-1]!r}: datasets have different "
            "row counts; run `mmdx store verify` on the store"
        )
    return Rows(patient_ids, items, hashes, views, vectors)


def _take(rows: Rows, index: np.ndarray) -> Rows:
    return Rows(rows.patient_ids[index], rows.items[index], rows.hashes[index], rows.views[index], rows.vectors[index])


def last_wins(rows: Rows) -> Rows:
    """Drop all but the last row of each repeated (patient ID, item, view) key."""
    last = {key: i for i, key in enumerate(rows.keys())}
    if len(last) == len(rows):
        return rows
    return _take(rows, np.asarray(sorted(last.values()), dtype=np.int64))


def write_shard(store_path: Path, header: SetHeader, rows: Rows, sequence: int | None = None) -> Path:
    """Commit one batch of rows as a new journal shard, atomically.

    The shard is written under a temporary name, flushed and fsynced, then
    renamed into place and the folder fsynced: after this returns the rows
    survive a crash, and before it they are absent, never half there. The
    caller holds the writer lock; ``sequence`` defaults to
    :func:`next_sequence`.
    """
    folder = journal_dir(store_path)
    if sequence is None:
        sequence = next_sequence(store_path)
    final = folder / f"{sequence:012d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
    temporary = final.with_name(final.name + ".tmp")
    try:
        if not folder.is_dir():
            folder.mkdir()
            fsync_path(folder.parent)
        with h5py.File(temporary, "w", locking=False) as handle:
            handle.attrs["mmdx_format_version"] = FORMAT_VERSION
            handle.attrs["set_name"] = header.name
            handle.attrs["sequence"] = sequence
            group = handle.create_group(f"{ROOT_GROUP}/{header.name}")
            for key, value in header.to_attrs().items():
                group.attrs[key] = value
            _create_row_datasets(group, header.width)
            _append_rows(group, rows)
        fsync_path(temporary)
        os.replace(temporary, final)
        fsync_path(folder)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise StoreError(
            f"{store_path}: writing journal shard {final.name} failed ({exc}); "
            "nothing of this batch was stored, so free disk space or fix permissions and run again"
        ) from exc
    return final


def _iter_shard_sets(shard: Path) -> Iterator[tuple[SetHeader, h5py.Group]]:
    with _open_h5(shard) as handle:
        _check_version(handle, shard)
        if ROOT_GROUP not in handle:
            raise StoreError(f"{shard}: journal shard without a {ROOT_GROUP!r} group; run `mmdx store verify`")
        for name, group in handle[ROOT_GROUP].items():
            yield SetHeader.from_attrs(name, group.attrs, str(shard)), group


class _SetBuilder:
    """Apply rows to a feature set in memory, the latest row per key winning."""

    def __init__(self, header: SetHeader, rows: Rows):
        self.header = header
        self.rows = last_wins(rows)
        self.index = {key: i for i, key in enumerate(self.rows.keys())}

    def apply(self, header: SetHeader, rows: Rows, where: str) -> None:
        if header.width != self.header.width or header.config != self.header.config:
            raise StoreError(
                f"{where}: rows for feature set {header.name!r} have a different configuration "
                "than the set; run `mmdx store verify`"
            )
        self.header.info = header.info or self.header.info
        self.header.updated = max(self.header.updated, header.updated)
        rows = last_wins(rows)
        replace_at, replace_from, append_from = [], [], []
        for i, key in enumerate(rows.keys()):
            j = self.index.get(key)
            if j is None:
                self.index[key] = len(self.rows) + len(append_from)
                append_from.append(i)
            else:
                replace_at.append(j)
                replace_from.append(i)
        if replace_at:
            at, src = np.asarray(replace_at), np.asarray(replace_from)
            self.rows.hashes[at] = rows.hashes[src]
            self.rows.vectors[at] = rows.vectors[src]
        if append_from:
            added = _take(rows, np.asarray(append_from))
            self.rows = Rows(
                np.concatenate([self.rows.patient_ids, added.patient_ids]),
                np.concatenate([self.rows.items, added.items]),
                np.concatenate([self.rows.hashes, added.hashes]),
                np.concatenate([self.rows.views, added.views]),
                np.concatenate([self.rows.vectors, added.vectors]),
            )


def read_store(
    store_path: Path, names: Iterable[str] | None = None, with_vectors: bool = True
) -> dict[str, FeatureSet]:
    """Read feature sets from the main file with the journal applied.

    ``names`` limits the sets read (all by default); ``with_vectors=False``
    reads keys and hashes only, for listings. The result is the state after
    some commit that finished before this call returned. A compaction
    running at the same time can delete shards before they are read, and a
    directory listing taken during a commit can miss a shard. Both make the
    read start again.
    """
    wanted = None if names is None else set(names)
    gaps = 0
    for attempt in range(_READ_ATTEMPTS):
        # The listing comes before the main file is opened: a compaction in
        # between folds every listed shard into the main file read next.
        shards = list_shards(store_path)
        try:
            return _read_store_once(store_path, shards, wanted, with_vectors, strict=gaps < _GAP_ATTEMPTS)
        except FileNotFoundError:
            if not list_shards(store_path) and not store_path.exists():
                raise StoreError(
                    f"{store_path}: store not found; check the store path, "
                    "or run `mmdx embed` to create it"
                ) from None
        except _JournalGap:
            gaps += 1
        logger.debug("%s: journal changed while reading (attempt %d), reading again", store_path, attempt + 1)
        time.sleep(min(0.01 * (attempt + 1), 0.2))
    raise StoreError(f"{store_path}: the journal kept changing while reading; try again")


_READ_ATTEMPTS = 40
_GAP_ATTEMPTS = 5


class _JournalGap(Exception):
    """The shard listing skips a sequence number, so it missed a shard renamed during the listing."""


def _read_store_once(store_path, shards, wanted, with_vectors, strict=True) -> dict[str, FeatureSet]:
    builders: dict[str, _SetBuilder] = {}
    folded = 0
    if store_path.exists():
        with _open_h5(store_path) as handle:
            _check_version(handle, store_path)
            folded = int(handle.attrs.get(APPLIED_ATTR, 0))
            for name, group in handle.get(ROOT_GROUP, {}).items():
                if wanted is not None and name not in wanted:
                    continue
                header = SetHeader.from_attrs(name, group.attrs, str(store_path))
                builders[name] = _SetBuilder(header, _read_rows(group, with_vectors, str(store_path)))
    elif not shards:
        raise FileNotFoundError(store_path)
    pending = [p for p in shards if shard_sequence(p) > folded]
    if not _contiguous(pending, folded):
        if strict:
            raise _JournalGap()
        logger.warning(
            "%s: journal shards %s do not follow sequence %d without gaps; run `mmdx store verify`",
            store_path,
            [shard_sequence(p) for p in pending],
            folded,
        )
    for shard in pending:
        for header, group in _iter_shard_sets(shard):
            if wanted is not None and header.name not in wanted:
                continue
            rows = _read_rows(group, with_vectors, str(shard))
            if header.name in builders:
                builders[header.name].apply(header, rows, str(shard))
            else:
                builders[header.name] = _SetBuilder(header, rows)
    return {name: FeatureSet(b.header, b.rows) for name, b in sorted(builders.items())}


def read_root_attrs(store_path: Path) -> dict:
    with _open_h5(store_path) as handle:
        _check_version(handle, store_path)
        return {key: handle.attrs[key] for key in handle.attrs}


def check_readable(store_path: Path) -> None:
    """Raise ``StoreError`` unless ``store_path`` is absent or an mmdx store this version reads."""
    if store_path.is_dir():
        raise StoreError(f"{store_path}: is a folder; --store takes an .h5 file path such as {store_path / 'features.h5'}")
    if not store_path.exists():
        return
    with _open_h5(store_path) as handle:
        _check_version(handle, store_path)


def rebuild_main(store_path: Path, drop: Iterable[str] = (), extra: Iterable[FeatureSet] = ()) -> None:
    """Write a fresh main file from the current one plus the journal, then swap it in.

    ``drop`` names feature sets to leave out. ``extra`` adds whole feature
    sets (as a merge does) after the journal, so their rows win on equal keys.
    The caller holds the writer lock. Sets are copied group by group and
    shards are read one at a time; what grows with the store is one
    key -> row dict per set written, so that each stored key is read once.
    Before that dict, compacting 800 shards of 64 rows took 31 s instead of
    3 s, because every shard re-read every key. The new main file
    records the last folded shard sequence, and the shards are deleted only
    after it is in place: a kill in between leaves shards that readers
    ignore and the next writer deletes. On any error the old main file and
    journal stay as they were.
    """
    drop = set(drop)
    folded = applied_through(store_path)
    shards = list_shards(store_path, after=folded)
    if shards:
        folded = shard_sequence(shards[-1])
    temporary = store_path.with_name(f"{store_path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w", locking=False) as out:
            out.attrs["mmdx_format_version"] = FORMAT_VERSION
            out.attrs["mmdx_version"] = __version__
            out.attrs[APPLIED_ATTR] = folded
            root = out.create_group(ROOT_GROUP)
            if store_path.exists():
                with _open_h5(store_path) as handle:
                    _check_version(handle, store_path)
                    for name, group in handle.get(ROOT_GROUP, {}).items():
                        if name not in drop:
                            handle.copy(group, root, name=name)
            # Key -> row index of each set written so far, kept across shards so
            # that every stored key is read once, not once per shard.
            indexes: dict[str, dict] = {}
            for shard in shards:
                for header, group in _iter_shard_sets(shard):
                    if header.name in drop:
                        continue
                    _merge_group(root, header, _read_rows(group, True, str(shard)), str(shard), indexes)
            for feature_set in extra:
                _merge_group(root, feature_set.header, feature_set.rows, "merge", indexes)
        fsync_path(temporary)
        os.replace(temporary, store_path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(
                f"{store_path}: rewriting the main file failed ({exc}); the store is unchanged, "
                "so free disk space or fix permissions and run again"
            ) from exc
        raise
    fsync_path(store_path.parent)
    for shard in list_shards(store_path):
        if shard_sequence(shard) <= folded:
            shard.unlink(missing_ok=True)


def _merge_group(root: h5py.Group, header: SetHeader, rows: Rows, where: str, indexes: dict[str, dict]) -> None:
    """Add ``rows`` to the set ``header.name`` of ``root``, replacing rows with equal keys.

    ``indexes`` maps set names to their key -> row index dicts; a set's dict
    is built from the file on its first merge and kept up to date here.
    """
    rows = last_wins(rows)
    keys = rows.keys()

    if header.name not in root:
        group = root.create_group(header.name)
        for key, value in header.to_attrs().items():
            group.attrs[key] = value
        _create_row_datasets(group, header.width)
        _append_rows(group, rows)
        indexes[header.name] = {key: i for i, key in enumerate(keys)}
        return
    group = root[header.name]
    current = SetHeader.from_attrs(header.name, group.attrs, where)
    if current.width != header.width or current.config != header.config:
        raise StoreError(
            f"{where}: feature set {header.name!r} exists with a different configuration; "
            "vectors of different configurations never mix"
        )

    index = indexes.get(header.name)
    if index is None:
        patient_ids, items, _hashes, views = _read_keys(group)
        index = {key: i for i, key in enumerate(zip(patient_ids.tolist(), items.tolist(), views.tolist()))}
        indexes[header.name] = index
    append_from, replace_at, replace_from = [], [], []
    for i, key in enumerate(keys):
        j = index.get(key)
        if j is None:
            append_from.append(i)
        else:
            replace_at.append(j)
            replace_from.append(i)
    if replace_at:
        # One read and one write of the whole set, because per-row HDF5 writes
        # take roughly a millisecond each and a merge can replace every row.
        at, src = np.asarray(replace_at), np.asarray(replace_from)
        hashes = np.asarray(group["item_hash"].asstr()[()], dtype=object)
        hashes[at] = rows.hashes[src]
        group["item_hash"][...] = hashes
        vectors = group["vectors"][()]
        vectors[at] = rows.vectors[src]
        group["vectors"][...] = vectors
    if append_from:
        n_old = group["patient_id"].shape[0]
        _append_rows(group, _take(rows, np.asarray(append_from)))
        for offset, i in enumerate(append_from):
            index[keys[i]] = n_old + offset
    group.attrs["updated"] = max(str(group.attrs.get("updated", "")), header.updated)
    if header.info:
        group.attrs["info_json"] = canonical_json(header.info)


def remove_stale_files(store_path: Path) -> list[Path]:
    """Delete what a killed writer left behind; the caller holds the writer lock.

    That is temporary main files, temporary shards, and shards already
    folded into the main file by a compaction killed before it deleted them.
    """
    removed = []
    for path in store_path.parent.glob(f"{glob.escape(store_path.name)}.tmp-*"):
        path.unlink(missing_ok=True)
        removed.append(path)
    folder = journal_dir(store_path)
    if folder.is_dir():
        for path in folder.glob(f"*{SHARD_SUFFIX}.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
        folded = applied_through(store_path)
        for path in list_shards(store_path):
            if shard_sequence(path) <= folded:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
