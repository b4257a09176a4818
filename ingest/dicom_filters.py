"""Which DICOM objects become chest radiograph samples, decided from the header alone, always with a reason:
Modality and image content (`radiograph_verdict`, also applied by `eval predict` and `serve`), then burned-in
annotation, body part, view and the patient key. Shared by `build-shards --source dicom` and `ingest scan`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ingest.dicom import SUPPORTED_PHOTOMETRIC, DicomHeader
from ingest.records import normalise_view

DEFAULT_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
FRAMES_CHOICES = ("reject", "first")
PATIENT_FROM_CHOICES = ("study", "file")
# SOP class families that hold no image (UID prefixes, matched on whole components). Secondary Capture is not one:
# public CR exports (RSNA Pneumonia, SIIM-ACR) wrap real radiographs in it, so Modality and the pixels decide.
NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.88": "structured report / key object selection",
    "1.2.840.10008.5.1.4.1.1.481": "radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.66": "segmentation / registration / raw data",
    "1.2.840.10008.5.1.4.1.1.11": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9": "waveform",
    "1.2.840.10008.1.3.10": "media directory (DICOMDIR)",
}
# ViewCodeSequence (CID 4010 "DX View"): SNOMED CT codes and their legacy SNOMED-RT (SRT) equivalents.
VIEW_CODES = {
    "272479007": "PA", "R-10214": "PA", "R-40888": "PA",            # postero-anterior
    "399348003": "AP", "R-10206": "AP",                             # antero-posterior
    "399173006": "LAT", "R-10236": "LAT",                           # left lateral
    "399198007": "LAT", "R-10232": "LAT",                           # right lateral
    "49370004": "LAT", "G-A104": "LAT",                             # lateral
}
VIEW_SCHEMES = ("SCT", "SRT", "SNM3", "99SDM", "DCM")
# --sop-classes: "images" (default: every SOP class but the NON_IMAGE_SOP families), "all", or a comma list of
# exact UIDs and these names.
SOP_CLASS_NAMES = {
    "CR": ("1.2.840.10008.5.1.4.1.1.1",),                                               # CR Image Storage
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"),  # DX for presentation / processing
    "SC": ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
           "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"),              # secondary capture (all kinds)
}
DEFAULT_SOP_CLASSES = "images"
# A radiograph's shape: smaller images are icons or thumbnails, longer strips are not films (a chest film is ~1:1.25).
MIN_SIDE_PX = 16
MAX_ASPECT = 8
POLICY_OPTIONS = ("modalities", "sop_classes", "body_parts", "allow_burned_in", "frames",
                  "patient_from")  # argparse dests


@dataclass(frozen=True)
class DicomPolicy:
    """The header filters of the dicom source (the CLI options --modalities, --body-parts, ...)."""
    modalities: frozenset[str] | None = frozenset(DEFAULT_MODALITIES)   # None: every modality
    sop_classes: frozenset[str] | str = DEFAULT_SOP_CLASSES   # "images" | "all" | exact UIDs
    body_parts: frozenset[str] | None = None    # None: keep all, flag those that are not chest
    allow_burned_in: bool = False
    frames: str = "reject"                      # multi-frame: reject | first
    patient_from: str | None = None             # empty PatientID: None (reject) | study | file


@dataclass
class Verdict:
    status: str                 # "ok" | "filtered" | "rejected"
    reason: str = ""
    flags: dict = field(default_factory=dict)


def parse_list_option(text: str, option: str) -> frozenset[str] | None:
    """'all' -> None; 'CR,DX' -> {'CR', 'DX'}."""
    t = text.strip()
    if t.lower() == "all":
        return None
    items = frozenset(v.strip().upper() for v in t.split(",") if v.strip())
    if not items:
        raise ValueError(f"{option} {text!r}: give 'all' or a comma list")
    return items


def sop_family(uid: str) -> str | None:
    """The name of the non-image family ``uid`` belongs to, or None."""
    for prefix, name in NON_IMAGE_SOP.items():
        if uid == prefix or uid.startswith(prefix + "."):
            return name
    return None


def parse_sop_classes(text: str) -> frozenset[str] | str:
    """'images' | 'all' | 'CR,DX,1.2.3' -> the accepted UIDs; ValueError with a one-line reason."""
    t = text.strip()
    if t.lower() in ("images", "all"):
        return t.lower()
    uids = set()
    for item in (v.strip() for v in t.split(",")):
        if item.upper() in SOP_CLASS_NAMES:
            uids.update(SOP_CLASS_NAMES[item.upper()])
        elif item and all(part.isdigit() for part in item.split(".")):
            uids.add(item)
        elif item:
            raise ValueError(f"--sop-classes {text!r}: {item!r} is neither a UID nor one of "
                             f"{', '.join(SOP_CLASS_NAMES)}")
    if not uids:
        raise ValueError(f"--sop-classes {text!r}: give images, all, or a comma list")
    return frozenset(uids)


def _sop_verdict(h: DicomHeader, policy: DicomPolicy) -> Verdict | None:
    if policy.sop_classes == "all":
        return None
    if policy.sop_classes == "images":
        family = sop_family(h.sop_class)
        return None if family is None else Verdict("filtered", f"SOP class {h.sop_class} is a {family}, not a "
                                                               "radiograph")
    if h.sop_class not in policy.sop_classes:
        return Verdict("filtered", f"SOP class {h.sop_class or '(missing)'} not selected by --sop-classes")
    return None


def view_of(h: DicomHeader) -> tuple[str, str]:
    """(PA | AP | LAT | UNKNOWN, where it came from): ViewPosition, else ViewCodeSequence, else UNKNOWN."""
    view = normalise_view(h.view_position or None)
    if view != "UNKNOWN":
        return view, "ViewPosition"
    if h.view_code is not None:
        scheme, value = h.view_code
        if scheme in VIEW_SCHEMES and value in VIEW_CODES:
            return VIEW_CODES[value], "ViewCodeSequence"
    return "UNKNOWN", "none"


def radiograph_verdict(h: DicomHeader, policy: DicomPolicy) -> Verdict:
    """Is this object a radiograph we can use? Judged by Modality and the image's content (one grayscale 2-D
    frame of a film's size and shape, MONOCHROME1/2), never by SOP class alone (--sop-classes only narrows).
    The one acceptance rule of ingest (via `judge`), `eval predict` and `serve`."""
    sop = _sop_verdict(h, policy)
    if sop is not None:
        return sop
    if not h.sop_class and not h.has_pixels:
        return Verdict("rejected", "DICOM without SOP class and without pixel data (not an image object)")
    if not h.has_pixels:
        return Verdict("rejected", "DICOM without pixel data")
    if policy.modalities is not None and h.modality not in policy.modalities:
        return Verdict("filtered", f"modality {h.modality or '(missing)'} not selected by --modalities "
                                   f"{','.join(sorted(policy.modalities))}")
    if h.photometric not in SUPPORTED_PHOTOMETRIC:
        return Verdict("rejected", f"unsupported photometric interpretation {h.photometric or '(missing)'!r} "
                                   f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC)})")
    if h.samples_per_pixel not in (0, 1):  # 0: tag absent (MONOCHROME implies one sample)
        return Verdict("rejected", f"{h.samples_per_pixel} samples per pixel; a grayscale image has 1")
    if min(h.rows, h.columns) < MIN_SIDE_PX or max(h.rows, h.columns) > MAX_ASPECT * min(h.rows, h.columns):
        return Verdict("rejected", f"image of {h.columns} x {h.rows} pixels is not a radiograph's size or shape "
                                   f"(at least {MIN_SIDE_PX} px a side, at most {MAX_ASPECT}:1)")
    flags = {}
    if h.frames > 1:
        if policy.frames != "first":
            return Verdict("rejected", f"multi-frame DICOM ({h.frames} frames); --frames first keeps the first")
        flags["multiframe_first_of"] = h.frames
    return Verdict("ok", flags=flags)


def judge(h: DicomHeader, policy: DicomPolicy) -> Verdict:
    """ok, filtered (a policy choice: listed in filtered.tsv) or rejected (unusable or unsafe: rejects.tsv):
    `radiograph_verdict`, then what only a dataset build checks (burned-in text, body part)."""
    verdict = radiograph_verdict(h, policy)
    if verdict.status != "ok":
        return verdict
    flags = verdict.flags
    if h.burned_in == "YES" and not policy.allow_burned_in:
        return Verdict("rejected", "BurnedInAnnotation is YES (text in the pixels may identify the patient; "
                                   "--allow-burned-in to keep)")
    if h.body_part and h.body_part not in CHEST_BODY_PARTS:
        if policy.body_parts is not None and h.body_part not in policy.body_parts:
            return Verdict("filtered", f"BodyPartExamined {h.body_part} not selected by --body-parts "
                                       f"{','.join(sorted(policy.body_parts))}")
        flags["body_part_not_chest"] = h.body_part
    if h.burned_in == "YES":
        flags["burned_in_annotation"] = True
    return Verdict("ok", flags=flags)


def patient_key(h: DicomHeader, policy: DicomPolicy, rel_path: str) -> tuple[str, str] | str:
    """(identifier to pseudonymise, what it is) or the reject reason when there is none."""
    if h.patient_id:
        return h.patient_id, "PatientID"
    if policy.patient_from == "study" and h.study_uid:
        return "study:" + h.study_uid, "StudyInstanceUID"
    if policy.patient_from == "file":
        return "file:" + rel_path, "file"
    if policy.patient_from == "study":
        return "DICOM without PatientID and StudyInstanceUID (--patient-from file: each file its own patient)"
    return ("DICOM without PatientID: choose --patient-from study (one patient per StudyInstanceUID) or "
            "--patient-from file (each file its own patient)")


def add_policy_options(p: argparse.ArgumentParser) -> None:
    """The dicom filter options, shared by build-shards and scan."""
    p.add_argument("--modalities", default=",".join(DEFAULT_MODALITIES),
                   help="dicom: comma list of Modality values to keep, or all")
    p.add_argument("--sop-classes", default=DEFAULT_SOP_CLASSES,
                   help="dicom: SOP classes to keep: images (every class that can hold an image, Secondary "
                        "Capture included: Modality and the pixels decide), all, or a comma list of UIDs and "
                        f"the names {', '.join(SOP_CLASS_NAMES)} (e.g. CR,DX leaves out secondary captures)")
    p.add_argument("--body-parts", default="any", help="dicom: any (keep all, flag non-chest BodyPartExamined) or "
                                                      "a comma list to keep (others filtered; an empty tag is kept)")
    p.add_argument("--allow-burned-in", action="store_true", help="dicom: keep BurnedInAnnotation=YES (flagged)")
    p.add_argument("--frames", choices=FRAMES_CHOICES, default="reject", help="dicom: multi-frame files")
    p.add_argument("--patient-from", choices=PATIENT_FROM_CHOICES, default=None,
                   help="dicom: patient key when PatientID is empty (StudyInstanceUID, or each file its own "
                        "patient); without it such files are rejected")


def policy_from_args(a: argparse.Namespace) -> DicomPolicy:
    """ValueError with a one-line reason for a bad list option."""
    modalities = parse_list_option(a.modalities, "--modalities")
    body_parts = None if a.body_parts.strip().lower() == "any" else parse_list_option(a.body_parts, "--body-parts")
    return DicomPolicy(modalities, parse_sop_classes(a.sop_classes), body_parts, a.allow_burned_in, a.frames,
                       a.patient_from)
