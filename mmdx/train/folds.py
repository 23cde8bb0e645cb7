"""Patient-level stratified folds, shared by train-head, compare and per-fold fine-tuning.

The folds depend only on the labelled patients (sorted IDs and their labels),
the number of folds and the seed, never on which modalities a patient has.
So image, text and hybrid runs with the same seed use the same folds, and a
per-fold text encoder is trained on exactly the patients of that fold's
training part.

Patients whose images are byte-identical (the same content hash) can be
bound into one group with :func:`duplicate_groups`; given such groups,
:func:`patient_folds` keeps each group inside one fold. Without groups the
folds stay exactly those of a plain stratified split.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from mmdx.errors import InputError

__all__ = ["duplicate_groups", "patient_folds"]


def duplicate_groups(
    patient_ids: Sequence[str], hashes: Sequence[str], keep: Iterable[str] | None = None
) -> list[list[str]]:
    """Group the patients that share content, directly or through a chain of shared hashes.

    Parameters
    ----------
    patient_ids, hashes
        One entry per stored item: the patient and the item's content hash.
    keep
        If given, only these patients (e.g. the labelled ones) are kept in
        the groups; the links run through every patient all the same.

    Returns
    -------
    list of list of str
        Each group with at least two kept patients, as sorted IDs; groups
        sorted by their first ID.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        root = node
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    owner: dict[str, str] = {}
    for patient_id, digest in zip(patient_ids, hashes):
        patient_id = str(patient_id)
        first = owner.setdefault(str(digest), patient_id)
        a, b = find(first), find(patient_id)
        if a != b:
            parent[max(a, b)] = min(a, b)
    kept = None if keep is None else set(keep)
    members: dict[str, list[str]] = {}
    for patient_id in parent:
        if kept is None or patient_id in kept:
            members.setdefault(find(patient_id), []).append(patient_id)
    return sorted((sorted(group) for group in members.values() if len(group) > 1), key=lambda group: group[0])


def patient_folds(
    labels: Mapping[str, int], n_folds: int, seed: int, groups: Sequence[Sequence[str]] | None = None
) -> list[tuple[list[str], list[str]]]:
    """Split labelled patients into stratified folds.

    Parameters
    ----------
    labels
        Patient ID to 0/1 label, for every labelled patient.
    n_folds
        Number of folds (at least 2).
    seed
        Seed of the shuffle; one seed gives one fixed split.
    groups
        Patients that must share a fold (from :func:`duplicate_groups`).
        With none, the split is a stratified k-fold; with some, a stratified
        group k-fold over the groups and the remaining single patients.

    Returns
    -------
    list of (train_ids, test_ids)
        One pair per fold; each patient is in exactly one test part.
    """
    ids = sorted(labels)
    y = np.asarray([labels[i] for i in ids], dtype=int)
    if n_folds < 2:
        raise InputError(f"--folds must be at least 2, got {n_folds}")
    smallest = int(min(np.sum(y == 0), np.sum(y == 1)))
    if smallest < n_folds:
        raise InputError(
            f"--folds {n_folds} needs at least {n_folds} patients of each class, "
            f"but the smaller class has {smallest}; lower --folds"
        )
    ids_array = np.asarray(ids, dtype=object)
    groups = [[patient_id for patient_id in group if patient_id in labels] for group in groups or ()]
    groups = [group for group in groups if len(group) > 1]
    if not groups:
        fold_of = stratified_fold_numbers(y, n_folds, seed)
        return [
            (ids_array[fold_of != k].tolist(), ids_array[fold_of == k].tolist()) for k in range(n_folds)
        ]
    return _grouped_folds(ids_array, y, n_folds, seed, groups)


def stratified_fold_numbers(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Return the test fold of each sample, as scikit-learn's ``StratifiedKFold(shuffle=True)`` assigns them.

    The assignment is the same as scikit-learn's (tested against it), so
    folds made before this function existed stay the same, but importing
    scikit-learn is not needed: that import took 0.8 s of a 1.6 s
    ``train-head`` run on medpix-mr.

    Classes are numbered in order of first appearance in ``y``. Fold ``i``
    tests as many samples of each class as positions ``i, i + n_folds,
    i + 2 n_folds, ...`` of the class numbers sorted. Each class's list of
    fold numbers is shuffled by ``numpy.random.RandomState(seed)``, one
    class after the other, and dealt to that class's samples in order.
    """
    y = np.asarray(y)
    _, first_index, inverse = np.unique(y, return_index=True, return_inverse=True)
    order_of_appearance = np.argsort(np.argsort(first_index))
    classes = order_of_appearance[inverse.ravel()]
    n_classes = len(first_index)
    ordered = np.sort(classes)
    per_fold = np.stack([np.bincount(ordered[k::n_folds], minlength=n_classes) for k in range(n_folds)])
    generator = np.random.RandomState(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for class_number in range(n_classes):
        folds = np.repeat(np.arange(n_folds), per_fold[:, class_number])
        generator.shuffle(folds)
        fold_of[classes == class_number] = folds
    return fold_of


def _grouped_folds(ids_array: np.ndarray, y: np.ndarray, n_folds: int, seed: int, groups) -> list:
    """Stratified group k-fold: every group in one test part, singles as groups of one."""
    from sklearn.model_selection import StratifiedGroupKFold

    position = {patient_id: i for i, patient_id in enumerate(ids_array.tolist())}
    group_of = np.arange(len(ids_array))
    for group in groups:
        indices = [position[patient_id] for patient_id in group]
        group_of[indices] = min(indices)
    n_groups = len(np.unique(group_of))
    if n_groups < n_folds:
        raise InputError(
            f"--folds {n_folds} needs at least {n_folds} patient groups, but duplicate images leave "
            f"{n_groups}; lower --folds or pass --duplicates ignore"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [
        (ids_array[train].tolist(), ids_array[test].tolist())
        for train, test in splitter.split(np.zeros(len(ids_array)), y, group_of)
    ]
