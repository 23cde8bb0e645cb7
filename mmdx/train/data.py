"""Join labels and stored vectors per patient: the inputs of every head.

:func:`load_patient_data` reads the chosen feature sets, aggregates each
patient's vectors (mean or max over the patient's images, and over the
patient's text rows) and keeps the labelled patients that have vectors for
every modality in use. Every patient left out is recorded with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mmdx.errors import InputError, StoreError
from mmdx.store.api import FeatureStore, describe_sets
from mmdx.train.folds import duplicate_groups
from mmdx.train.labels import DROP_NO_LABEL, DROP_UNRECOGNIZED, LabelTable

__all__ = [
    "AGGREGATES",
    "DROP_NO_IMAGE",
    "DROP_NO_TEXT",
    "MODALITIES",
    "PatientData",
    "SetChoice",
    "aggregate_rows",
    "choose_sets",
    "load_patient_data",
    "store_duplicate_groups",
]

logger = logging.getLogger(__name__)

MODALITIES = {"image": ("image",), "text": ("text",), "hybrid": ("image", "text")}
AGGREGATES = ("mean", "max")
DROP_NO_IMAGE = "no image vectors"
DROP_NO_TEXT = "no text vectors"
_DROP_NO_VECTORS = {"image": DROP_NO_IMAGE, "text": DROP_NO_TEXT}


@dataclass
class SetChoice:
    """The feature set(s) used for one modality.

    ``names`` contains one set name. For a per-fold fine-tuned text encoder
    it contains one name per fold (``names[k]`` is fold k's set), and
    ``group`` is the group they share.
    """

    modality: str
    names: list[str]
    configs: list[dict]
    group: str | None = None

    @property
    def per_fold(self) -> bool:
        return self.group is not None

    def encoder_training(self) -> list[dict | None]:
        """Return ``config["encoder_training"]`` of each set (None where absent)."""
        return [config.get("encoder_training") for config in self.configs]

    def to_json(self) -> dict:
        return {"modality": self.modality, "names": self.names, "group": self.group, "configs": self.configs}


@dataclass
class PatientData:
    """Per-patient inputs of one train-head run, sorted by patient ID.

    Attributes
    ----------
    modality
        ``"image"``, ``"text"`` or ``"hybrid"``.
    modalities
        The inputs in use, e.g. ``("image", "text")``.
    patient_ids
        Object array of the kept patients' IDs, sorted.
    y
        0/1 labels, int64, aligned with ``patient_ids``.
    x
        Modality to a float32 ``(n_patients, width)`` matrix of aggregated
        plain (view 0) vectors. For a per-fold text encoder, ``x["text"]`` is
        absent and ``fold_x["text"][k]`` is fold k's matrix.
    labels
        Every labelled patient (also those without vectors), which fixes the folds.
    augmented_index, augmented_x
        With ``augmented``: for each (patient, augmented view) one row, giving
        the patient's index in ``patient_ids`` and the aggregated image vector
        of that view. Text inputs of these rows are the patient's text vector.
    dropped
        Reason to the sorted IDs of the patients left out for it (a patient
        may be listed under several reasons).
    augmented_views
        With ``augmented``: the highest augmented view used (views 1 to it).
    fold_groups
        Labelled patients that must share a fold (duplicate images); empty
        for a plain stratified split.
    """

    modality: str
    modalities: tuple[str, ...]
    patient_ids: np.ndarray
    y: np.ndarray
    x: dict[str, np.ndarray]
    labels: LabelTable
    sets: dict[str, SetChoice]
    aggregate: str = "mean"
    fold_x: dict[str, list[np.ndarray]] = field(default_factory=dict)
    augmented_index: np.ndarray | None = None
    augmented_x: dict[str, np.ndarray] | None = None
    dropped: dict[str, list[str]] = field(default_factory=dict)
    augmented_views: int | None = None
    fold_groups: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.patient_ids)

    @property
    def widths(self) -> dict[str, int]:
        """Input width per modality, e.g. ``{"image": 1280, "text": 768}``."""
        return {name: self.inputs(0)[name].shape[1] for name in self.modalities}

    def dropped_counts(self) -> dict[str, int]:
        """Return the number of dropped patients per reason."""
        return {reason: len(ids) for reason, ids in self.dropped.items()}

    def inputs(self, fold: int | None = None) -> dict[str, np.ndarray]:
        """Return the per-patient matrices; ``fold`` picks fold k's matrix of a per-fold encoder."""
        inputs = dict(self.x)
        for name, per_fold in self.fold_x.items():
            if fold is None:
                raise ValueError(f"{name} vectors differ per fold; pass the fold")
            inputs[name] = per_fold[fold]
        return inputs

    def index_of(self, patient_ids: Sequence[str]) -> np.ndarray:
        """Return the positions of ``patient_ids`` in :attr:`patient_ids`."""
        position = {patient_id: i for i, patient_id in enumerate(self.patient_ids.tolist())}
        return np.asarray([position[patient_id] for patient_id in patient_ids], dtype=np.int64)

    def training_rows(self, index: np.ndarray, fold: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return the training inputs and labels of the patients at ``index``.

        With augmented views loaded, each training patient also contributes
        one row per augmented view. Only the views of the patients at
        ``index`` are added, so an augmented view of a test patient never
        reaches training.
        """
        inputs = self.inputs(fold)
        x = {name: matrix[index] for name, matrix in inputs.items()}
        y = self.y[index]
        if self.augmented_index is None:
            return x, y
        keep = np.isin(self.augmented_index, index)
        rows = self.augmented_index[keep]
        for name in self.modalities:
            extra = self.augmented_x[name][keep] if name in self.augmented_x else inputs[name][rows]
            x[name] = np.concatenate([x[name], extra])
        return x, np.concatenate([y, self.y[rows]])

    def test_rows(self, index: np.ndarray, fold: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return the plain (view 0) inputs and labels of the patients at ``index``."""
        return {name: matrix[index] for name, matrix in self.inputs(fold).items()}, self.y[index]


def aggregate_rows(keys: np.ndarray, vectors: np.ndarray, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Reduce the rows of ``vectors`` that share a key to one row (mean or element-wise max).

    Returns the sorted unique keys and a float32 matrix with one row per key.
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if len(keys) == 0:
        return np.asarray(keys)[:0], np.zeros((0, vectors.shape[1]), dtype=np.float32)
    order = np.argsort(keys, kind="stable")
    sorted_keys = np.asarray(keys)[order]
    starts = np.concatenate([[0], np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1])
    grouped = vectors[order]
    if how == "max":
        reduced = np.maximum.reduceat(grouped, starts, axis=0)
    else:
        counts = np.diff(np.concatenate([starts, [len(keys)]]))
        reduced = np.add.reduceat(grouped, starts, axis=0, dtype=np.float64) / counts[:, None]
    return sorted_keys[starts], reduced.astype(np.float32, copy=False)


def choose_sets(
    store: FeatureStore, modality: str, image_set: str | None = None, text_set: str | None = None
) -> dict[str, SetChoice]:
    """Pick the feature set(s) of each modality in use.

    A store with one set of a modality uses it; with several, ``image_set`` /
    ``text_set`` names one. Text sets of one per-fold fine-tuning group
    (``config["encoder_training"]["fold"]`` set, one set per fold) count as
    one choice: name the group or any of its sets.
    """
    if modality not in MODALITIES:
        raise InputError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    infos = store.list_sets()
    choices = {}
    for name in MODALITIES[modality]:
        if name == "image":
            chosen = store.choose_set("image", image_set, option="--image-set")
            choices[name] = SetChoice("image", [chosen], [_config_of(infos, chosen)])
        else:
            choices[name] = _choose_text(store, infos, text_set)
    return choices


def _config_of(infos, name: str) -> dict:
    return next(info.config for info in infos if info.name == name)


def _choose_text(store: FeatureStore, infos, requested: str | None) -> SetChoice:
    """Pick a text set, treating each per-fold group as one candidate."""
    groups: dict[str, list] = {}
    singles = []
    for info in infos:
        if info.modality != "text":
            continue
        training = info.config.get("encoder_training") or {}
        if training.get("fold") is not None:
            groups.setdefault(str(training.get("group")), []).append(info)
        else:
            singles.append(info)
    if not groups:
        name = store.choose_set("text", requested, option="--text-set")
        return SetChoice("text", [name], [_config_of(infos, name)])

    group = None
    if requested is not None:
        for group_name, members in groups.items():
            if requested == group_name or requested in [info.name for info in members]:
                group = group_name
        if group is None:
            if requested not in [info.name for info in singles]:
                listed = ", ".join([info.name for info in singles] + [f"{g} (per-fold group)" for g in groups])
                raise StoreError(f"{store.path}: --text-set {requested!r} is not a text feature set; text sets: {listed}")
            return SetChoice("text", [requested], [_config_of(infos, requested)])
    elif len(groups) == 1 and not singles:
        group = next(iter(groups))
    else:
        # A group is described by its first member's config.
        candidates = singles + [replace(members[0], name=f"{g} (per-fold group)") for g, members in groups.items()]
        raise StoreError(
            f"{store.path}: several text feature sets, which differ in: {describe_sets(candidates)}; "
            "choose one with --text-set"
        )

    members = groups[group]
    trainings = [info.config["encoder_training"] for info in members]
    n_folds = trainings[0].get("n_folds")
    folds = sorted(int(training["fold"]) for training in trainings)
    if folds != list(range(n_folds or 0)) or any(t.get("n_folds") != n_folds for t in trainings):
        raise StoreError(
            f"{store.path}: per-fold text group {group!r} has sets for folds {folds} but needs one set for "
            f"each of folds 0..{(n_folds or 0) - 1}; embed the missing folds"
        )
    members = sorted(members, key=lambda info: int(info.config["encoder_training"]["fold"]))
    return SetChoice("text", [info.name for info in members], [info.config for info in members], group=group)


def load_patient_data(
    store_path: str | Path,
    labels: LabelTable | Mapping[str, int],
    modality: str = "hybrid",
    image_set: str | None = None,
    text_set: str | None = None,
    aggregate: str = "mean",
    augmented: bool = False,
    views: int | None = None,
) -> PatientData:
    """Read the chosen feature sets and join them with the labels per patient.

    Parameters
    ----------
    store_path
        The feature store.
    labels
        Patient ID to 0/1 label, as returned by :func:`~mmdx.train.labels.load_labels`
        (a plain dict works too; its dropped patients are then unknown).
    modality
        ``"image"``, ``"text"`` or ``"hybrid"`` (both).
    image_set, text_set
        Feature set names where the store has several of one modality.
    aggregate
        ``"mean"`` or ``"max"`` over a patient's vectors of one view.
    augmented
        Also load the augmented image views (``views > 0``) for training.
    views
        With ``augmented``: use only augmented views 1 to ``views``; None
        uses every stored view.

    Returns
    -------
    PatientData
        The labelled patients with vectors for every modality in use.
    """
    if aggregate not in AGGREGATES:
        raise InputError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if augmented and modality == "text":
        raise InputError("--augmented uses augmented image views; use it with --modality image or hybrid")
    if views is not None and not augmented:
        raise InputError(f"--views {views} selects augmented views; add --augmented or drop --views")
    if views is not None and views < 1:
        raise InputError(f"--views must be at least 1, got {views}")
    if not isinstance(labels, LabelTable):
        labels = LabelTable(dict(labels), {}, {}, None, "")

    store = FeatureStore(store_path)
    choices = choose_sets(store, modality, image_set, text_set)
    modalities = MODALITIES[modality]

    per_patient: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    augmented_rows = None
    for name in modalities:
        per_patient[name] = []
        for set_name in choices[name].names:
            rows = store.read(set_name).rows
            plain = rows.views == 0
            per_patient[name].append(aggregate_rows(rows.patient_ids[plain], rows.vectors[plain], aggregate))
            if augmented and name == "image":
                augmented_rows = (rows.patient_ids[~plain], rows.views[~plain], rows.vectors[~plain])
            elif name == "text" and (rows.views > 0).any():
                # NOTE: augmented text views are not used; only the plain text rows are read.
                logger.info("%s: text set %s has augmented views; they are ignored", store_path, set_name)

    store_ids = set()
    for name in modalities:
        for ids, _ in per_patient[name]:
            store_ids.update(ids.tolist())
    dropped = {reason: set(ids) for reason, ids in labels.dropped.items()}
    unrecognized = dropped.get(DROP_UNRECOGNIZED, set())
    dropped.setdefault(DROP_NO_LABEL, set()).update(store_ids - set(labels) - unrecognized)

    kept = set(labels)
    for name in modalities:
        present = set.intersection(*(set(ids.tolist()) for ids, _ in per_patient[name]))
        dropped[_DROP_NO_VECTORS[name]] = set(labels) - present
        kept &= present
    patient_ids = np.asarray(sorted(kept), dtype=object)
    if len(patient_ids) == 0:
        raise InputError(
            f"{store_path}: no labelled patient has {' and '.join(modalities)} vectors; check that the "
            "patient IDs of the labels file match those in the store (`mmdx store info`)"
        )

    x: dict[str, np.ndarray] = {}
    fold_x: dict[str, list[np.ndarray]] = {}
    for name in modalities:
        matrices = [_select(ids, matrix, patient_ids) for ids, matrix in per_patient[name]]
        if choices[name].per_fold:
            fold_x[name] = matrices
        else:
            x[name] = matrices[0]

    data = PatientData(
        modality=modality,
        modalities=modalities,
        patient_ids=patient_ids,
        y=np.asarray([labels[patient_id] for patient_id in patient_ids.tolist()], dtype=np.int64),
        x=x,
        labels=labels,
        sets=choices,
        aggregate=aggregate,
        fold_x=fold_x,
        dropped={reason: sorted(ids) for reason, ids in dropped.items()},
    )
    if augmented:
        _attach_augmented(data, augmented_rows, aggregate, store_path, views)
    return data


def _select(ids: np.ndarray, matrix: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Return the rows of ``matrix`` (keyed by sorted unique ``ids``) for ``wanted`` IDs, in order."""
    positions = np.searchsorted(ids, wanted)
    return np.ascontiguousarray(matrix[positions])


def _attach_augmented(data: PatientData, rows, aggregate: str, store_path, max_view: int | None) -> None:
    """Aggregate augmented image views 1..``max_view`` per (patient, view) for the kept patients."""
    patient_ids, views, vectors = rows
    stored = int(views.max()) if len(views) else 0
    if max_view is not None and stored and max_view > stored:
        raise InputError(
            f"{store_path}: --views {max_view} asks for more augmented views than the image set "
            f"{data.sets['image'].names[0]} contains ({stored}); lower --views or embed with --augment-views {max_view}"
        )
    if max_view is not None:
        chosen = views <= max_view
        patient_ids, views, vectors = patient_ids[chosen], views[chosen], vectors[chosen]
    position = {patient_id: i for i, patient_id in enumerate(data.patient_ids.tolist())}
    index = np.asarray([position.get(patient_id, -1) for patient_id in patient_ids.tolist()], dtype=np.int64)
    keep = index >= 0
    if not keep.any():
        raise InputError(
            f"{store_path}: --augmented given, but the image set {data.sets['image'].names[0]} has no "
            "augmented views (views > 0) of the kept patients; embed with augmentation first"
        )
    index, views, vectors = index[keep], views[keep].astype(np.int64), vectors[keep]
    keys, matrix = aggregate_rows(index * (int(views.max()) + 1) + views, vectors, aggregate)
    data.augmented_index = keys // (int(views.max()) + 1)
    data.augmented_x = {"image": matrix}
    data.augmented_views = int(views.max())


def store_duplicate_groups(store_path: str | Path, patients, image_set: str | None = None) -> list[list[str]]:
    """Return the groups of ``patients`` whose plain images share a content hash in the store.

    The hashes come from ``image_set`` if given, else from every image set of
    the store, so that image, text and hybrid runs of one store get the same
    groups. A store without image sets gives no groups.
    """
    store = FeatureStore(store_path)
    names = [image_set] if image_set is not None else [i.name for i in store.list_sets() if i.modality == "image"]
    patient_ids: list[str] = []
    hashes: list[str] = []
    for name in names:
        for (patient_id, _item, view), digest in store.item_hashes(name).items():
            if view == 0:
                patient_ids.append(patient_id)
                hashes.append(digest)
    return duplicate_groups(patient_ids, hashes, keep=patients)
