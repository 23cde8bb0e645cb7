"""The feature store as used by the embed, train and store commands."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mmdx.errors import StoreError
from mmdx.store import format as fmt
from mmdx.store.lock import WriterLock

__all__ = ["FeatureStore", "FeatureSetInfo", "describe_sets", "set_name_for"]

logger = logging.getLogger(__name__)


@dataclass
class FeatureSetInfo:
    """Summary of one feature set, for listings."""

    name: str
    modality: str
    encoder: str
    width: int
    n_rows: int
    n_patients: int
    n_views: int
    config: dict
    info: dict
    created: str
    updated: str


def set_name_for(modality: str, encoder: str, config: dict) -> str:
    """Name a feature set after its modality, encoder and a hash of its configuration."""
    digest = hashlib.sha256(fmt.canonical_json(config).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", encoder.rstrip("/").split("/")[-1]).strip("-") or "encoder"
    return f"{modality}-{slug}-{digest}"


# Configuration keys added after feature sets without them existed. Such a
# key is left out of the configuration when it has its old value, so older
# sets keep their names, and it is shown with that value ("pillow (implied)").
IMPLIED_CONFIG: dict[tuple[str, str], dict] = {
    ("image", "keras.applications.MobileNetV2"): {"preprocessing": "pillow"},
}


def displayed_config(modality: str, encoder: str, config: dict) -> dict:
    """Return ``config`` with the keys of :data:`IMPLIED_CONFIG` it lacks, marked "(implied)", for display."""
    displayed = dict(config)
    for key, value in IMPLIED_CONFIG.get((modality, encoder), {}).items():
        displayed.setdefault(key, f"{value} (implied)")
    return displayed


def describe_sets(infos: Sequence[FeatureSetInfo], max_keys: int = 4) -> str:
    """Format set names with the configuration values that tell them apart, for error messages.

    Only keys whose values differ between ``infos`` are shown (nested keys
    dotted, top-level keys first, at most ``max_keys`` per set), with hashes
    cut to 12 characters: ``image-a (image_size=224, weights.sha256=3f1c...)``.
    """
    flat = [
        _flatten({"encoder": info.encoder, "width": info.width, **displayed_config(info.modality, info.encoder, info.config)})
        for info in infos
    ]
    # Top-level keys first, led by "preprocessing", the plainest difference
    # between image sets of one network.
    keys = sorted(
        {key for values in flat for key in values}, key=lambda key: (key.count("."), key != "preprocessing", key)
    )
    differing = [key for key in keys if len({_short(values.get(key, "-")) for values in flat}) > 1]
    parts = []
    for info, values in zip(infos, flat):
        shown = [f"{key}={_short(values.get(key, '-'))}" for key in differing[:max_keys]]
        if len(differing) > max_keys:
            shown.append(f"{len(differing) - max_keys} more differences")
        parts.append(f"{info.name} ({', '.join(shown)})" if shown else f"{info.name} (created {info.created})")
    return "; ".join(parts)


def _flatten(value: dict, prefix: str = "") -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _short(value) -> str:
    text = value if isinstance(value, str) else fmt.canonical_json(value)
    if len(text) > 16 and re.fullmatch(r"[0-9a-f]+", text):
        return text[:12]  # A 12-character prefix of a hash is enough to distinguish sets.
    return text if len(text) <= 40 else text[:37] + "..."


class FeatureStore:
    """An mmdx feature store: an HDF5 file of feature sets keyed by patient ID.

    Open with ``mode="r"`` to read (no lock; readers see the last committed
    state while a writer runs) or ``mode="a"`` to write (takes the writer lock;
    ``wait`` as in :class:`~mmdx.store.lock.WriterLock`). Use as a context
    manager: closing a writer folds the journal into the main file.

    Examples
    --------
    >>> with FeatureStore("runs/demo.h5", mode="a") as store:   # doctest: +SKIP
    ...     header = store.ensure_set("text", "bert", config, width=384)
    ...     store.commit(header, ["p1"], ["row 2"], ["ab12..."], vectors)
    """

    def __init__(self, path: str | Path, mode: str = "r", wait: float | None = 0.0):
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._lock: WriterLock | None = None
        self._next_sequence = 0
        self._headers: dict[str, fmt.SetHeader] = {}
        if mode == "r":
            if not fmt.list_shards(self.path) and not self.path.exists():
                raise StoreError(
                    f"{self.path}: store not found; check the store path, or run `mmdx embed` to create it"
                )
            fmt.check_readable(self.path)
        else:
            if not self.path.parent.is_dir():
                raise StoreError(f"{self.path}: folder {self.path.parent} does not exist; create it first")
            fmt.check_readable(self.path)
            if not os.access(self.path.parent, os.W_OK | os.X_OK):
                raise StoreError(
                    f"{self.path}: folder {self.path.parent} is not writable; choose a writable --store path "
                    "(reading a store needs no write access)"
                )
            self._lock = WriterLock(self.path, wait=wait).acquire()
            try:
                removed = fmt.remove_stale_files(self.path)
                self._next_sequence = fmt.next_sequence(self.path)
            except BaseException:
                self._lock.release()
                self._lock = None
                raise
            if removed:
                logger.info("%s: removed %d file(s) left by a killed writer", self.path, len(removed))

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """Fold the journal into the main file (writers) and release the lock."""
        if self._lock is None:
            return
        try:
            self.compact()
        finally:
            self._lock.release()
            self._lock = None

    def compact(self) -> None:
        """Fold the journal into a fresh main file, if there is a journal.

        Readers see the same rows before and after; a kill at any point leaves
        the old main file with its journal or the new one.
        """
        self._require_writer()
        if fmt.list_shards(self.path):
            fmt.rebuild_main(self.path)

    # Reading -------------------------------------------------------------

    def _exists(self) -> bool:
        # Shards before the main file: the first compaction creates one, then deletes the other.
        return bool(fmt.list_shards(self.path)) or self.path.exists()

    def list_sets(self) -> list[FeatureSetInfo]:
        """Summarise every feature set, reading keys but not vectors."""
        infos = []
        if not self._exists():
            return infos
        for name, feature_set in fmt.read_store(self.path, with_vectors=False).items():
            header, rows = feature_set.header, feature_set.rows
            infos.append(
                FeatureSetInfo(
                    name=name,
                    modality=header.modality,
                    encoder=header.encoder,
                    width=header.width,
                    n_rows=len(rows),
                    n_patients=len(set(rows.patient_ids.tolist())),
                    n_views=int(rows.views.max()) + 1 if len(rows) else 0,
                    config=header.config,
                    info=header.info,
                    created=header.created,
                    updated=header.updated,
                )
            )
        return infos

    def read(self, name: str) -> fmt.FeatureSet:
        """Read one feature set with its vectors."""
        sets = fmt.read_store(self.path, names=[name]) if self._exists() else {}
        if name not in sets:
            available = ", ".join(info.name for info in self.list_sets()) or "none"
            raise StoreError(f"{self.path}: no feature set named {name!r}; available: {available}")
        return sets[name]

    def choose_set(self, modality: str, name: str | None = None, option: str = "--set") -> str:
        """Pick the feature set of ``modality``: ``name`` if given, else the only one."""
        candidates = [info for info in self.list_sets() if info.modality == modality]
        if name is not None:
            for info in candidates:
                if info.name == name:
                    return name
            listed = ", ".join(info.name for info in candidates) or "none"
            article = "an" if modality[0] in "aeiou" else "a"
            raise StoreError(
                f"{self.path}: {option} {name!r} is not {article} {modality} feature set; {modality} sets: {listed}"
            )
        if not candidates:
            raise StoreError(
                f"{self.path}: no {modality} feature set; run `mmdx embed {modality}s ... --store {self.path}` first"
            )
        if len(candidates) > 1:
            raise StoreError(
                f"{self.path}: several {modality} feature sets, which differ in: {describe_sets(candidates)}; "
                f"choose one with {option}"
            )
        return candidates[0].name

    # Writing -------------------------------------------------------------

    def _require_writer(self) -> None:
        if self._lock is None:
            raise StoreError(f"{self.path}: opened read-only; open with mode='a' to write")

    def ensure_set(
        self, modality: str, encoder: str, config: dict, width: int, info: dict | None = None
    ) -> fmt.SetHeader:
        """Return the header of the feature set for this configuration, new or existing.

        The set's identity is ``(modality, encoder, config, width)``; ``config``
        must hold everything that changes the vectors (weights identity,
        preprocessing, library versions). The set appears in the store with its
        first committed rows.
        """
        self._require_writer()
        identity = {"modality": modality, "encoder": encoder, "width": int(width), **config}
        name = set_name_for(modality, encoder, identity)
        existing = fmt.read_store(self.path, names=[name], with_vectors=False) if self._exists() else {}
        if name in existing:
            header = existing[name].header
            if header.config != identity:
                raise StoreError(f"{self.path}: feature set name collision for {name!r}; report this as a bug")
            header.info = dict(info or header.info)
        else:
            now = fmt.now_iso()
            header = fmt.SetHeader(name, modality, encoder, int(width), identity, dict(info or {}), now, now)
            self._note_sibling_sets(header)
        self._headers[name] = header
        return header

    def _note_sibling_sets(self, header: fmt.SetHeader) -> None:
        """Warn when a new set joins sets of the same modality and encoder, naming what differs.

        A changed option (or a changed default) then embeds everything again
        into a new set, and train-head later requires ``--image-set`` or
        ``--text-set``. The warning comes while the run can still be stopped.
        """
        siblings = [info for info in self.list_sets() if (info.modality, info.encoder) == (header.modality, header.encoder)]
        if not siblings:
            return
        new = FeatureSetInfo(
            header.name, header.modality, header.encoder, header.width, 0, 0, 0, header.config, {}, header.created, header.updated
        )
        logger.warning(
            "%s: starting a new %s feature set, because the configuration differs from the %d stored one(s): %s. "
            "To add to a stored set instead, repeat the options it was made with",
            self.path, header.modality, len(siblings), describe_sets([new, *siblings]),
        )

    def item_hashes(self, name: str) -> dict[tuple[str, str, int], str]:
        """Map (patient ID, item, view) to the stored content hash, for skipping done work."""
        if not self._exists():
            return {}
        sets = fmt.read_store(self.path, names=[name], with_vectors=False)
        if name not in sets:
            return {}
        rows = sets[name].rows
        return dict(zip(rows.keys(), rows.hashes.tolist()))

    def commit(
        self,
        header: fmt.SetHeader,
        patient_ids: Sequence[str],
        items: Sequence[str],
        hashes: Sequence[str],
        vectors: np.ndarray,
        views: Sequence[int] | None = None,
    ) -> None:
        """Commit one batch of rows atomically (a new journal shard)."""
        self._require_writer()
        vectors = np.asarray(vectors, dtype=np.float32)
        n = len(patient_ids)
        if views is None:
            views = [0] * n
        if not (len(items) == len(hashes) == len(views) == n == vectors.shape[0]):
            raise ValueError("patient_ids, items, hashes, views and vectors must have one entry per row")
        if vectors.ndim != 2 or vectors.shape[1] != header.width:
            raise StoreError(
                f"{self.path}: vectors of width {vectors.shape[-1]} do not fit feature set "
                f"{header.name!r} (width {header.width})"
            )
        if not np.isfinite(vectors).all():
            bad = [patient_ids[i] for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1))[:5]]
            raise StoreError(f"{self.path}: encoder returned NaN or inf vectors for patient(s) {bad}; nothing was stored")
        keys = list(zip(patient_ids, items, views))
        if len(set(keys)) != n:
            seen: set = set()
            repeated = next(key for key in keys if key in seen or seen.add(key))
            raise ValueError(f"a batch must not repeat a (patient ID, item, view) key; {repeated} appears twice")
        header.updated = fmt.now_iso()
        rows = fmt.Rows(
            np.asarray(list(patient_ids), dtype=object),
            np.asarray(list(items), dtype=object),
            np.asarray(list(hashes), dtype=object),
            np.asarray(list(views), dtype=np.int32),
            vectors,
        )
        fmt.write_shard(self.path, header, rows, self._next_sequence)
        self._next_sequence += 1

    def remove_set(self, name: str) -> None:
        """Delete one feature set (rewrites the main file atomically)."""
        self._require_writer()
        if name not in {info.name for info in self.list_sets()}:
            self.read(name)  # raises, listing the sets there are
        fmt.rebuild_main(self.path, drop=[name])

    def add_sets(self, feature_sets: Sequence[fmt.FeatureSet]) -> None:
        """Merge whole feature sets (from another store) into this one atomically."""
        self._require_writer()
        fmt.rebuild_main(self.path, extra=feature_sets)
