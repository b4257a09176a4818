"""Which DICOM objects become chest radiograph samples, decided from the header alone, always with a reason:
modality, SOP class family, burned-in annotation, multi-frame, body part, view (ViewPosition, else the
ViewCodeSequence code) and the patient key. Shared by `build-shards --source dicom` and `ingest scan`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ingest.dicom import SUPPORTED_PHOTOMETRIC, DicomHeader
from ingest.records import normalise_view

DEFAULT_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
FRAMES_CHOICES = ("reject", "first")
PATIENT_FROM_CHOICES = ("study", "file")
# SOP class families that hold no radiograph (UID prefixes, matched on whole components).
NON_RADIOGRAPH_SOP = {
    "1.2.840.10008.5.1.4.1.1.7": "secondary capture",
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
POLICY_OPTIONS = ("modalities", "body_parts", "allow_burned_in", "frames", "patient_from")  # argparse dests


@dataclass(frozen=True)
class DicomPolicy:
    """The header filters of the dicom source (the CLI options --modalities, --body-parts, ...)."""
    modalities: frozenset[str] | None = frozenset(DEFAULT_MODALITIES)   # None: every modality
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
    for prefix, name in NON_RADIOGRAPH_SOP.items():
        if uid == prefix or uid.startswith(prefix + "."):
            return name
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


def judge(h: DicomHeader, policy: DicomPolicy) -> Verdict:
    """ok, filtered (a policy choice: listed in filtered.tsv) or rejected (unusable or unsafe: rejects.tsv)."""
    family = sop_family(h.sop_class)
    if family is not None:
        return Verdict("filtered", f"SOP class {h.sop_class} is a {family}, not a radiograph")
    if not h.sop_class and not h.has_pixels:
        return Verdict("rejected", "DICOM without SOP class and without pixel data (not an image object)")
    if not h.has_pixels:
        return Verdict("rejected", "DICOM without pixel data")
    if policy.modalities is not None and h.modality not in policy.modalities:
        return Verdict("filtered", f"modality {h.modality or '(missing)'} not selected by --modalities "
                                   f"{','.join(sorted(policy.modalities))}")
    if h.burned_in == "YES" and not policy.allow_burned_in:
        return Verdict("rejected", "BurnedInAnnotation is YES (text in the pixels may identify the patient; "
                                   "--allow-burned-in to keep)")
    if h.photometric not in SUPPORTED_PHOTOMETRIC:
        return Verdict("rejected", f"unsupported photometric interpretation {h.photometric or '(missing)'!r} "
                                   f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC)})")
    flags = {}
    if h.frames > 1:
        if policy.frames != "first":
            return Verdict("rejected", f"multi-frame DICOM ({h.frames} frames); --frames first keeps the first")
        flags["multiframe_first_of"] = h.frames
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
    return DicomPolicy(modalities, body_parts, a.allow_burned_in, a.frames, a.patient_from)
