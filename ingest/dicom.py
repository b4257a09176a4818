"""DICOM through pydicom: header scan (only the tags ingest needs), pixel decoding to 8 bit, pseudonymisation.

Pixels: decompress, modality LUT, then the first VOI LUT or window when present (else the real value range),
to 8 bit; MONOCHROME1 is inverted exactly once, at the end. No header field other than those returned here
leaves this module.
"""
from __future__ import annotations

import hashlib
import hmac
import io

import numpy as np

SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
# The only tags the scan reads; PatientID and StudyInstanceUID are hashed before they are stored.
HEADER_TAGS = ("PatientID", "StudyInstanceUID", "ViewPosition", "PatientSex", "PatientAge")


class DicomReject(ValueError):
    """A DICOM that cannot become a sample; the message is the reject reason."""


def pseudonymise(value: str, salt: bytes, prefix: str = "") -> str:
    """Salted HMAC-SHA256 of an identifier, 64 bits hex: stable for one salt, unlinkable without it."""
    return prefix + hmac.new(salt, value.strip().encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def read_header(path) -> dict:
    """The HEADER_TAGS of one file as strings (missing -> ''); raises DicomReject for a non-DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except InvalidDicomError as e:
        raise DicomReject(f"not a DICOM file ({_first_line(e)})") from None
    except Exception as e:  # truncated or garbled headers raise a variety of errors
        raise DicomReject(f"unreadable DICOM header ({type(e).__name__}: {_first_line(e)})") from None
    return {t: str(ds.get(t, "") or "") for t in HEADER_TAGS}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _first(value):
    # WindowCenter / WindowWidth may be multi-valued: the first is the default presentation.
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window_to_u8(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing with output range 0..255."""
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    else:  # LINEAR
        if width < 1:
            raise DicomReject(f"window width {width} < 1")
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def range_to_u8(x: np.ndarray) -> np.ndarray:
    """Linear map of the image's real [min, max] to 0..255 (a constant image becomes 0)."""
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def decode_dicom(data: bytes) -> tuple[np.ndarray, dict]:
    """DICOM bytes -> (uint8 HxW array, info with original size / bit depth / photometric / steps)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as e:
        raise DicomReject(f"not a DICOM file ({_first_line(e)})") from None
    except Exception as e:
        raise DicomReject(f"unreadable DICOM ({type(e).__name__}: {_first_line(e)})") from None
    if "PixelData" not in ds:
        raise DicomReject("DICOM without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise DicomReject(f"unsupported photometric interpretation {photometric or '(missing)'!r} "
                          f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC)})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomReject(f"multi-frame DICOM ({frames} frames); one radiograph per file expected")
    try:
        raw = ds.pixel_array
    except Exception as e:  # missing decompression plugin, truncated pixel data, ...
        raise DicomReject(f"cannot decode DICOM pixel data ({type(e).__name__}: {_first_line(e)})") from None
    if raw.ndim != 2:
        raise DicomReject(f"DICOM pixel array of shape {raw.shape}; a single 2-D frame expected")
    steps = []
    x = apply_modality_lut(raw, ds)
    if x is not raw:
        steps.append("modality_lut")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        lut_max = float(np.max(ds.VOILUTSequence[0].LUTData)) or 1.0
        y = apply_voi_lut(x, ds, index=0, prefer_lut=True).astype(np.float64)
        out = np.clip(np.rint(y * (255.0 / lut_max)), 0, 255).astype(np.uint8)
        steps.append("voi_lut[0]")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        out = _window_to_u8(x.astype(np.float64), _first(ds.WindowCenter), _first(ds.WindowWidth), fn)
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
