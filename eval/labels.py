"""Task sets and the label policy, applied when labels are loaded: raw shard labels (1 / 0 / -1 / NaN) become
training / test targets (1 / 0 / NaN = masked). Blank (not mentioned) is negative by default, CheXpert's convention.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.schema import CHEXPERT_COMPETITION_TASKS

UNCERTAINTY_POLICIES = ("u-ignore", "u-zeros", "u-ones")
BLANK_POLICIES = ("zero", "mask")
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
                    raise TaskError(f"{source}: no labels for task '{name}' (needed by task set '{part}'); "
                                    f"shards have: {', '.join(label_names)}")
                raise TaskError(f"unknown task '{name}': not a label of {source} ({', '.join(label_names)}) "
                                f"nor a task set ({', '.join(TASK_SETS)})")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise TaskError(f"--tasks '{spec}' names no task")
    return tasks


@dataclass(frozen=True)
class LabelPolicy:
    """How raw labels become targets. ``blank``: NaN (not mentioned) -> 0 (``zero``, the CheXpert convention)
    or masked (``mask``). ``uncertain``: -1 -> masked (``u-ignore``), 0 (``u-zeros``) or 1 (``u-ones``)."""
    blank: str = "zero"
    uncertain: str = "u-ignore"

    def __post_init__(self):
        if self.blank not in BLANK_POLICIES:
            raise ValueError(f"unknown blank-label policy '{self.blank}' (choose from {', '.join(BLANK_POLICIES)})")
        if self.uncertain not in UNCERTAINTY_POLICIES:
            raise ValueError(f"unknown uncertainty policy '{self.uncertain}' "
                             f"(choose from {', '.join(UNCERTAINTY_POLICIES)})")

    def to_json(self) -> dict:
        return {"blank": self.blank, "uncertain": self.uncertain}

    def describe(self) -> str:
        blank = "blank = negative" if self.blank == "zero" else "blank = masked"
        return f"label policy: {blank}, uncertain (-1) {self.uncertain}"


def as_policy(policy: LabelPolicy | str) -> LabelPolicy:
    """A LabelPolicy; a bare string names the uncertainty policy under the default blank policy. An explicit
    conversion for callers holding only an uncertainty name: the functions below take a LabelPolicy only, so a
    forgotten blank policy is an error, not a silent default."""
    return policy if isinstance(policy, LabelPolicy) else LabelPolicy(uncertain=policy)


def _require_policy(policy) -> LabelPolicy:
    if not isinstance(policy, LabelPolicy):
        raise TypeError(f"expected a LabelPolicy (blank + uncertain), got {type(policy).__name__} {policy!r}; "
                        f"build one with LabelPolicy(blank=..., uncertain=...) or as_policy()")
    return policy


def apply_policy(raw: np.ndarray, policy: LabelPolicy) -> np.ndarray:
    """Targets (N, T) float32 from raw labels (N, T): 1 -> 1, 0 -> 0, NaN (blank) -> 0 or NaN by ``policy.blank``;
    -1 (uncertain) -> NaN under ``u-ignore``, 0 under ``u-zeros``, 1 under ``u-ones`` (Irvin et al. 2019)."""
    policy = _require_policy(policy)
    raw = np.asarray(raw, dtype=np.float32)
    out = np.full(raw.shape, np.nan, dtype=np.float32)
    out[raw == 1] = 1.0
    out[raw == 0] = 0.0
    if policy.blank == "zero":
        out[np.isnan(raw)] = 0.0
    uncertain = raw == -1
    if policy.uncertain == "u-zeros":
        out[uncertain] = 0.0
    elif policy.uncertain == "u-ones":
        out[uncertain] = 1.0
    unexpected = ~(np.isnan(raw) | (raw == 1) | (raw == 0) | uncertain)
    if unexpected.any():
        raise ValueError(f"label values must be 1, 0, -1 or NaN; found {sorted(set(raw[unexpected].tolist()))[:5]}")
    return out


def apply_uncertainty(raw: np.ndarray, policy: str = "u-ignore") -> np.ndarray:
    """``apply_policy`` with blanks masked: only the -1 policy applies."""
    return apply_policy(raw, LabelPolicy(blank="mask", uncertain=policy))


def select_targets(raw: np.ndarray, label_names: list[str], tasks: list[str],
                   policy: LabelPolicy) -> np.ndarray:
    """Targets (N, len(tasks)) for the named tasks, label policy applied."""
    idx = [label_names.index(t) for t in tasks]
    return apply_policy(np.asarray(raw)[:, idx], policy)


def check_labelled(targets: np.ndarray, tasks: list[str], split: str, source: str) -> None:
    """Raise TaskError when a requested task has no usable (non-masked) label at all in ``split``."""
    empty = [t for j, t in enumerate(tasks) if np.isnan(targets[:, j]).all()]
    if empty:
        raise TaskError(f"{source}: split '{split}' has no labels for task '{empty[0]}' (all blank or masked)")


def label_counts(targets: np.ndarray, tasks: list[str]) -> dict[str, dict[str, int]]:
    """Per task ``{"pos", "neg", "masked"}`` image counts of policy-applied ``targets`` (N, T) (1 / 0 / NaN)."""
    targets = np.asarray(targets, dtype=np.float64)
    if targets.ndim != 2 or targets.shape[1] != len(tasks):
        raise ValueError(f"targets {targets.shape} and {len(tasks)} task names disagree")
    masked = np.isnan(targets)
    pos = np.sum(~masked & (targets > 0.5), axis=0)
    neg = np.sum(~masked, axis=0) - pos
    return {t: {"pos": int(pos[j]), "neg": int(neg[j]), "masked": int(masked[:, j].sum())} for j, t in enumerate(tasks)}


def split_counts(targets_by_split: dict[str, np.ndarray], tasks: list[str]) -> dict[str, dict[str, int]]:
    """Per task ``{"n_<split>_pos", "n_<split>_neg", ...}`` for each split's policy-applied targets: the fields a
    result JSON carries beside its test metrics, so a reader sees what each probe learnt from."""
    out: dict[str, dict[str, int]] = {t: {} for t in tasks}
    for split, targets in targets_by_split.items():
        for t, c in label_counts(targets, tasks).items():
            out[t].update({f"n_{split}_pos": c["pos"], f"n_{split}_neg": c["neg"]})
    return out
