"""The shard format contract (DESIGN.md "Shard format"): names, versions and the manifest reader.

Everything downstream (dali_pipes, trainer, eval, bench) reads shards through this module only.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.tsv"
SPLITS = ("train", "val", "test")
VIEWS = ("PA", "AP", "LAT", "UNKNOWN")
# "frontal" everywhere (ingest --views, the trainer's data.views): every view but the lateral. UNKNOWN stays, so
# folder archives and DICOM without ViewPosition (all UNKNOWN) keep their images.
FRONTAL_VIEWS = frozenset(v for v in VIEWS if v != "LAT")
VIEW_CHOICES = "all | frontal (drops LAT, keeps PA / AP / UNKNOWN) | comma list of " + ",".join(VIEWS)

# Components of every sample, in the order they are written into the tar.
COMPONENTS = ("jpg", "json", "lbl", "pid")
SHARD_PATTERN = "shard-{index:06d}.tar"
INDEX_SUFFIX = ".idx"
# OUT/views-cache/SPLIT/: DALI indexes derived from the shards' for a view selection (dali_pipes.view_index);
# not part of the format, safe to delete, removed by `ingest build-shards --overwrite`.
VIEWS_CACHE_DIR = "views-cache"
DALI_INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes and fn.readers.webdataset reads

# The 14 CheXpert / MIMIC-CXR (CheXpert labeler) observations, in the CSV's column order.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
    "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
# The five CheXpert competition tasks (Irvin et al. 2019).
CHEXPERT_COMPETITION_TASKS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
)
# The 14 NIH ChestX-ray14 findings (Wang et al. 2017), alphabetical as in the official release.
NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
    "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
    "Pneumonia", "Pneumothorax",
)


class ShardFormatError(ValueError):
    """A shard folder that cannot be read: missing, empty, wrong version, missing index."""


def parse_views(text: str) -> frozenset[str]:
    """A view selection: 'all', 'frontal' (= FRONTAL_VIEWS) or a comma list such as 'PA,AP'; ValueError otherwise."""
    t = text.strip()
    if t.lower() == "all":
        return frozenset(VIEWS)
    if t.lower() == "frontal":
        return FRONTAL_VIEWS
    wanted = {v.strip().upper() for v in t.split(",") if v.strip()}
    if not wanted or wanted - set(VIEWS):
        raise ValueError(f"views {text!r}: use {VIEW_CHOICES}")
    return frozenset(wanted)


def views_label(views: frozenset[str]) -> str:
    """The short name of a selection: 'all', 'frontal' or 'AP,PA' (sorted), for messages and cache keys."""
    if views == frozenset(VIEWS):
        return "all"
    return "frontal" if views == FRONTAL_VIEWS else ",".join(sorted(views))


_KEY_UNSAFE = re.compile(r"[^\w-]")


def sample_key(dataset: str, patient: str, study: str, view_index: int | str) -> str:
    """Stable, unique, tar-safe key, e.g. ``chexpert-p00001-s001-v1``. No dots (webdataset splits on them)."""
    # \w is exactly str.isalnum() plus "_" (both use the same Unicode table): one regex pass, not a loop per char
    return _KEY_UNSAFE.sub("_", f"{dataset}-{patient}-{study}-v{view_index}")


@dataclass(frozen=True)
class ShardInfo:
    path: Path          # the .tar
    index_path: Path    # the DALI .idx beside it
    num_samples: int
    sha256: str
    num_bytes: int


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    @property
    def label_names(self) -> list[str]:
        return list(self.data["label_names"])

    @property
    def num_patients(self) -> int:
        return int(self.data["num_patients"])

    def splits(self) -> list[str]:
        return [s for s in SPLITS if self.data["splits"].get(s, {}).get("num_samples", 0) > 0]

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise ShardFormatError(f"{self.root / MANIFEST_NAME}: no split '{split}' "
                                   f"(has {sorted(self.data['splits'])})")
        out = []
        for s in self.data["splits"][split]["shards"]:
            tar = self.root / split / s["name"]
            out.append(ShardInfo(tar, tar.with_suffix(INDEX_SUFFIX), int(s["num_samples"]), s["sha256"],
                                 int(s["num_bytes"])))
        return out

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))


def load_manifest(root: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate ``ROOT/manifest.json``; raise ShardFormatError with a one-line reason."""
    root = Path(root)
    if not root.is_dir():
        raise ShardFormatError(f"{root}: shard folder does not exist")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ShardFormatError(f"{mpath}: no manifest (not an ingest output folder, or ingest did not finish)")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardFormatError(f"{mpath}: unreadable manifest ({e})") from e
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardFormatError(f"{mpath}: shard format version {version!r}, this code reads version "
                               f"{FORMAT_VERSION}; re-run ingest")
    m = Manifest(root, data)
    if check_files:
        for split in data.get("splits", {}):
            for sh in m.shards(split):
                if not sh.path.is_file():
                    raise ShardFormatError(f"{sh.path}: shard listed in the manifest is missing")
                if not sh.index_path.is_file():
                    raise ShardFormatError(f"{sh.index_path}: DALI index missing for {sh.path.name}")
    return m


@dataclass(frozen=True)
class Member:
    """One member of a sample: where its payload lies in the tar (after its 512-byte header)."""
    ext: str
    offset: int
    size: int
    name: str  # the tar member's name, ``key.ext``


@dataclass(frozen=True)
class IndexedSample:
    """One sample as its index line lists it; members keep the line's order."""
    members: tuple[Member, ...]

    @property
    def key(self) -> str:
        name, ext = self.members[0].name, self.members[0].ext
        return name[: -len(ext) - 1] if name.endswith("." + ext) else name

    def member(self, ext: str) -> Member | None:
        return next((m for m in self.members if m.ext == ext), None)

    def index_line(self) -> str:
        return " ".join(f"{m.ext} {m.offset} {m.size} {m.name}" for m in self.members)


def read_index(index_path: str | Path, *, num_samples: int | None = None) -> list[IndexedSample]:
    """The samples of one ``.idx`` in order; ShardFormatError (file and reason) on a bad file or, with
    ``num_samples``, a count that differs from the manifest's."""
    try:
        lines = Path(index_path).read_text().splitlines()
        version, count = lines[0].split()
        if version != DALI_INDEX_VERSION:
            raise ShardFormatError(f"{index_path}: DALI index version {version}, expected {DALI_INDEX_VERSION}")
        out = []
        for line in lines[1 : 1 + int(count)]:
            f = line.split()
            if len(f) % 4:
                raise ValueError(f"a line has {len(f)} fields, not 4 per member")
            out.append(IndexedSample(tuple(Member(f[i], int(f[i + 1]), int(f[i + 2]), f[i + 3])
                                           for i in range(0, len(f), 4))))
    except ShardFormatError:
        raise
    except (OSError, ValueError, IndexError) as e:
        raise ShardFormatError(f"{index_path}: unreadable DALI index ({e})") from e
    if len(out) != int(count):
        raise ShardFormatError(f"{index_path}: index announces {count} samples but lists {len(out)}")
    if num_samples is not None and len(out) != num_samples:
        raise ShardFormatError(f"{index_path}: {len(out)} samples indexed, manifest says {num_samples}")
    return out


def read_dali_index(idx_path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """``[{ext: (offset, size)}]`` per sample of a DALI v1.2 index (the typed form: ``read_index``)."""
    return [{m.ext: (m.offset, m.size) for m in s.members} for s in read_index(idx_path)]
