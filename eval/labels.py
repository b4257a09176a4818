"""Task sets and the uncertainty policy, applied when labels are loaded: raw shard labels (1 / 0 / -1 / NaN)
become training / test targets (1 / 0 / NaN = masked). Blank labels are always masked, never negatives.
"""
from __future__ import annotations

import numpy as np

from ingest.schema import CHEXPERT_COMPETITION_TASKS

UNCERTAINTY_POLICIES = ("u-ignore", "u-zeros", "u-ones")
# Named task sets; "all" (the default) means every label the shards carry.
TASK_SETS = {"chexpert5": CHEXPERT_COMPETITION_TASKS}


class TaskError(ValueError):
    """A task name that does not exist, or shards without labels for a requested task."""


def resolve_tasks(spec: str | None, label_names: list[str], *, source: str = "shards") -> list[str]:
    """Task names for ``spec``: None / "all" = every label in ``label_names``; a set name (``chexpert5``); or a
    comma-separated list of names and set names. Raises TaskError (one line, naming the task) when a name is
    neither a label nor a set, or the shards (``source``) carry no such label."""
    if not label_names:
        raise TaskError(f"{source}: shards carry no labels (ingested without a label source); nothing to evaluate")
    if spec is None or spec.strip() in ("", "all"):
        return list(label_names)
    tasks: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names = list(TASK_SETS[part]) if part in TASK_SETS else [part]
        for name in names:
            if name not in label_names:
                if part in TASK_SETS:
                    raise TaskError(f"{source}: no labels for task '{name}' (needed by task set '{part}'); shards have: {', '.join(label_names)}")
                raise TaskError(f"unknown task '{name}': not a label of {source} ({', '.join(label_names)}) "
                                f"nor a task set ({', '.join(TASK_SETS)})")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise TaskError(f"--tasks '{spec}' names no task")
    return tasks


def apply_uncertainty(raw: np.ndarray, policy: str = "u-ignore") -> np.ndarray:
    """Targets (N, T) float32 from raw labels (N, T): 1 -> 1, 0 -> 0, NaN (blank) -> NaN (masked);
    -1 (uncertain) -> NaN under ``u-ignore``, 0 under ``u-zeros``, 1 under ``u-ones`` (Irvin et al. 2019)."""
    if policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"unknown uncertainty policy '{policy}' (choose from {', '.join(UNCERTAINTY_POLICIES)})")
    raw = np.asarray(raw, dtype=np.float32)
    out = np.full(raw.shape, np.nan, dtype=np.float32)
    out[raw == 1] = 1.0
    out[raw == 0] = 0.0
    uncertain = raw == -1
    if policy == "u-zeros":
        out[uncertain] = 0.0
    elif policy == "u-ones":
        out[uncertain] = 1.0
    unexpected = ~(np.isnan(raw) | (raw == 1) | (raw == 0) | uncertain)
    if unexpected.any():
        raise ValueError(f"label values must be 1, 0, -1 or NaN; found {sorted(set(raw[unexpected].tolist()))[:5]}")
    return out


def select_targets(raw: np.ndarray, label_names: list[str], tasks: list[str], policy: str = "u-ignore") -> np.ndarray:
    """Targets (N, len(tasks)) for the named tasks, uncertainty policy applied."""
    idx = [label_names.index(t) for t in tasks]
    return apply_uncertainty(np.asarray(raw)[:, idx], policy)


def check_labelled(targets: np.ndarray, tasks: list[str], split: str, source: str) -> None:
    """Raise TaskError when a requested task has no usable (non-masked) label at all in ``split``."""
    empty = [t for j, t in enumerate(tasks) if np.isnan(targets[:, j]).all()]
    if empty:
        raise TaskError(f"{source}: split '{split}' has no labels for task '{empty[0]}' (all blank or masked)")
