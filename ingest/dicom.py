"""DICOM through pydicom: header scan (only the tags ingest needs), pixel decoding to 8 bit.

Pixels: decompress (pylibjpeg plugins for JPEG / JPEG-LS / JPEG 2000 / RLE), modality LUT, then the first VOI LUT
or window when present (else the real value range), to 8 bit; MONOCHROME1 is inverted exactly once, at the end.
No header field other than those returned here leaves this module.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from ingest.errors import one_line
from ingest.pixels import map_to_u8, range_to_u8  # noqa: F401  (range_to_u8 kept importable from here)
from ingest.pseudonym import pseudonymise  # noqa: F401  (kept importable from here for callers and tests)

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
# The only tags the scan reads; identifiers are hashed by the source before they are stored.
HEADER_TAGS = ("SOPClassUID", "Modality", "PatientID", "StudyInstanceUID", "ViewPosition", "ViewCodeSequence",
               "PatientSex", "PatientAge", "BodyPartExamined", "BurnedInAnnotation", "NumberOfFrames",
               "PhotometricInterpretation", "SamplesPerPixel", "Rows", "Columns", "BitsStored", "PixelData")
DEFER_BYTES = 1024  # values above this (the pixel data) are never loaded by a header read
MEDIA_DIRECTORY_SOP = "1.2.840.10008.1.3.10"
# CharLS (pyjpegls) decodes JPEG-LS ~3x faster than libjpeg on a 2048x2500 12-bit radiograph (bench ingest);
# left alone, pydicom may pick libjpeg. Other syntaxes use pydicom's own choice.
PREFERRED_PLUGINS = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}
# JPEG (ISO 10918) transfer syntaxes: their frames get ingest.jpeg_check's strict checks, because pylibjpeg, like
# every libjpeg, decodes a frame cut short (end marker appended) into a film without a word.
JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                           "1.2.840.10008.1.2.4.70"})


class DicomReject(ValueError):
    """A DICOM that cannot become a sample; the message is the reject reason."""


@dataclass(frozen=True)
class DicomHeader:
    """The tags ingest uses, as stripped strings ('' when absent); view_code is (scheme, value) or None."""
    transfer_syntax: str
    sop_class: str
    modality: str
    patient_id: str
    study_uid: str
    view_position: str
    view_code: tuple[str, str] | None
    sex: str
    age: str
    body_part: str
    burned_in: str
    frames: int
    photometric: str
    samples_per_pixel: int  # 0 when absent
    rows: int
    columns: int
    bits_stored: int
    has_pixels: bool
    forced: bool           # read without the 128-byte preamble / DICM prefix


def _dcmread(src, **kw):
    """dcmread, retried with force=True for files without preamble / DICM prefix; (dataset, forced)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    # Lenient reads of other vendors' files warn per odd value; the reject reasons are what users see.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    try:
        return pydicom.dcmread(src, **kw), False
    except InvalidDicomError:
        if hasattr(src, "seek"):
            src.seek(0)
    except Exception as e:  # truncated or garbled headers raise a variety of errors
        raise DicomReject(f"unreadable DICOM header ({type(e).__name__}: {one_line(e)[:200]})") from None
    try:
        ds = pydicom.dcmread(src, force=True, **kw)
    except Exception as e:
        raise DicomReject(f"not a DICOM file (no DICM prefix; forced read failed: {one_line(e)[:200]})") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomReject("not a DICOM file (no DICM prefix and no image object in a forced read)")
    _set_transfer_syntax(ds)
    return ds, True


def _set_transfer_syntax(ds) -> None:
    """A forced read has no file meta: the encoding pydicom detected is the (uncompressed) transfer syntax."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _str(ds, tag: str) -> str:
    v = ds.get(tag, "")
    return str(v if v is not None else "").strip()


def _int(ds, tag: str, default: int) -> int:
    try:
        return int(ds.get(tag, default) or default)
    except (TypeError, ValueError):
        return default


def _view_code(ds) -> tuple[str, str] | None:
    seq = ds.get("ViewCodeSequence")
    if not seq:
        return None
    item = seq[0]
    return str(item.get("CodingSchemeDesignator", "")).strip().upper(), str(item.get("CodeValue", "")).strip()


def read_header(path) -> DicomHeader:
    """The HEADER_TAGS of one file (a path or a binary file object) without loading pixel data; raises
    DicomReject for a non-DICOM."""
    ds, forced = _dcmread(path, specific_tags=list(HEADER_TAGS), defer_size=DEFER_BYTES)
    media_sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    if len(ds) == 0 and media_sop != MEDIA_DIRECTORY_SOP:  # a DICOMDIR holds none of the tags read here
        raise DicomReject("unreadable DICOM header (no data set after the file meta: truncated?)")
    try:
        return DicomHeader(
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "") or ""),
            sop_class=_str(ds, "SOPClassUID") or media_sop,
            modality=_str(ds, "Modality").upper(), patient_id=_str(ds, "PatientID"),
            study_uid=_str(ds, "StudyInstanceUID"), view_position=_str(ds, "ViewPosition"), view_code=_view_code(ds),
            sex=_str(ds, "PatientSex"), age=_str(ds, "PatientAge"), body_part=_str(ds, "BodyPartExamined").upper(),
            burned_in=_str(ds, "BurnedInAnnotation").upper(), frames=_int(ds, "NumberOfFrames", 1),
            photometric=_str(ds, "PhotometricInterpretation"), samples_per_pixel=_int(ds, "SamplesPerPixel", 0),
            rows=_int(ds, "Rows", 0),
            columns=_int(ds, "Columns", 0), bits_stored=_int(ds, "BitsStored", 0),
            has_pixels="PixelData" in ds, forced=forced)
    except Exception as e:  # a garbled value deep in the header
        raise DicomReject(f"unreadable DICOM header ({type(e).__name__}: {one_line(e)[:200]})") from None


def _first(value):
    # WindowCenter / WindowWidth may be multi-valued: the first is the default presentation.
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window_to_u8(x, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing with output range 0..255, through ingest.pixels (a table over the stored
    values, or float64 stripes): bounded memory, the same bytes as the formula over the whole film."""
    if function == "SIGMOID":
        def fn(v):
            return np.clip(np.rint(255.0 / (1.0 + np.exp(-4.0 * (v - center) / width))), 0, 255).astype(np.uint8)
    elif function == "LINEAR_EXACT":
        def fn(v):
            return np.clip(np.rint(((v - center) / width + 0.5) * 255.0), 0, 255).astype(np.uint8)
    else:  # LINEAR
        if width < 1:
            raise DicomReject(f"window width {width} < 1")

        def fn(v):
            return np.clip(np.rint(((v - (center - 0.5)) / (width - 1) + 0.5) * 255.0), 0, 255).astype(np.uint8)
    return map_to_u8(x, fn)


def pixels_of(ds) -> np.ndarray:
    """The stored values of the first frame (all frames of a single-frame file); DicomReject with the reason."""
    if "PixelData" not in ds:
        raise DicomReject("DICOM without pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        from pydicom.pixels import get_decoder
        decoder = get_decoder(syntax) if syntax is not None else None
    except NotImplementedError:
        raise DicomReject(f"no pixel decoder for transfer syntax {syntax} ({syntax.name})") from None
    if decoder is not None and not decoder.is_available:
        raise DicomReject(f"no decoder installed for {syntax.name} (install pylibjpeg, pylibjpeg-libjpeg, "
                          "pylibjpeg-openjpeg, pylibjpeg-rle)")
    if str(syntax) in JPEG_SYNTAXES:
        _check_jpeg_frame(ds)
    plugin = PREFERRED_PLUGINS.get(str(syntax), "")
    if decoder is None or plugin not in decoder.available_plugins:
        plugin = ""
    try:
        from pydicom.pixels import pixel_array
        raw = pixel_array(ds, index=0 if _int(ds, "NumberOfFrames", 1) > 1 else None, decoding_plugin=plugin)
    except Exception as e:  # truncated pixel data, corrupt codestream, ...
        raise DicomReject(f"cannot decode DICOM pixel data ({type(e).__name__}: {one_line(e)[:200]})") from None
    if raw.ndim != 2:
        raise DicomReject(f"DICOM pixel array of shape {raw.shape}; a single 2-D frame expected")
    return raw


def _check_jpeg_frame(ds) -> None:
    """DicomReject when the first frame's JPEG codestream is cut short or claims more pixels than it holds."""
    from pydicom.encaps import generate_frames

    from ingest.jpeg_check import check_codestream
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=_int(ds, "NumberOfFrames", 1)))
    except Exception:  # noqa: BLE001 - a broken encapsulation: the decoder reports it with its own reason
        return
    problem = check_codestream(frame)
    if problem is not None:
        raise DicomReject(f"cannot decode DICOM pixel data ({problem})")


def decode_dicom(data: bytes) -> tuple[np.ndarray, dict]:
    """DICOM bytes -> (uint8 HxW array, info with original size / bit depth / photometric / steps). A
    multi-frame file gives its first frame (the source decides whether such files get here)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    ds, forced = _dcmread(io.BytesIO(data))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if "PixelData" in ds and photometric not in SUPPORTED_PHOTOMETRIC:
        raise DicomReject(f"unsupported photometric interpretation {photometric or '(missing)'!r} "
                          f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC)})")
    raw = pixels_of(ds)
    frames = _int(ds, "NumberOfFrames", 1)
    steps = ["forced_read"] if forced else []
    if frames > 1:
        steps.append(f"first_frame_of:{frames}")
    x = apply_modality_lut(raw, ds)
    if x is not raw:
        steps.append("modality_lut")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        lut_max = float(np.max(ds.VOILUTSequence[0].LUTData)) or 1.0
        scale = 255.0 / lut_max
        out = map_to_u8(apply_voi_lut(x, ds, index=0, prefer_lut=True),
                        lambda v: np.clip(np.rint(v * scale), 0, 255).astype(np.uint8))
        steps.append("voi_lut[0]")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = _window_to_u8(x, _first(ds.WindowCenter), _first(ds.WindowWidth), fn)
        steps.append(f"voi_window[0]:{fn.lower()}")
    elif x.dtype == np.uint8:
        out = x  # already 8-bit with no transform: keep the stored values
        steps.append("stored_8bit")
    else:
        out = range_to_u8(x)
        steps.append("range_to_8bit")
    if photometric == "MONOCHROME1":
        out = 255 - out  # MONOCHROME1: low values are white; invert once, after all LUTs
        steps.append("invert_monochrome1")
    info = {
        "original_width": int(ds.Columns), "original_height": int(ds.Rows),
        "original_bit_depth": int(ds.get("BitsStored", raw.dtype.itemsize * 8)),
        "photometric_interpretation": photometric, "steps": steps,
    }
    return np.ascontiguousarray(out, dtype=np.uint8), info
