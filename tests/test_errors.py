"""One-line errors: `ingest.errors.one_line` on empty, multi-line and broken messages, and the inputs that used to
end in a traceback: a zero-byte checkpoint (encoder and resume) and a binary salt file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingest.errors import one_line

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "trainer" / "configs" / "debug_cpu.toml")


class _BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("no text")


def test_one_line_never_fails_and_keeps_one_line():
    assert one_line(EOFError()) == "EOFError"  # what torch.load raises on a zero-byte file
    assert one_line(KeyError()) == "KeyError" and one_line(ValueError("\n \n")) == "ValueError"
    assert one_line(ValueError("\n  first  \nsecond")) == "first"
    assert one_line(ValueError("x" * 50), limit_chars=10) == "xxxxxxx..."
    assert one_line(OSError("disk full"), with_type=True) == "OSError: disk full"
    assert one_line(EOFError(), with_type=True) == "EOFError"  # the type is not repeated
    assert one_line(_BrokenStr()) == "_BrokenStr"


def test_zero_byte_encoder_file_is_one_line(tmp_path):
    from eval.features import EncoderError, encoder_spec
    from trainer.encoder_io import read_encoder
    empty = tmp_path / "encoder.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"encoder.pt: not a readable checkpoint \(EOFError\)$"):
        read_encoder(empty)
    with pytest.raises(EncoderError, match=r"encoder.pt: not a readable checkpoint \(EOFError\)$"):
        encoder_spec(tmp_path)  # a run folder: its encoder.pt, through the same reader and message


def test_zero_byte_checkpoint_resume_exits_2_with_one_line(tmp_path, capsys):
    from trainer.pretrain import main
    empty = tmp_path / "step-000002.pt"
    empty.write_bytes(b"")
    code = main([DEBUG, "data.source=synthetic", "data.synthetic_batches=2", "optim.total_steps=2",
                 "optim.warmup_steps=1",  # shorter than the run: no fit warning beside the error line
                 "run.tensorboard=false", "run.progress=false", f"run.out={tmp_path / 'run'}",
                 f"run.resume={empty}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert err.endswith(f"{empty}: not a readable checkpoint (EOFError)"), err
    assert empty.is_file()  # an explicit run.resume file is reported, never renamed or replaced


def test_binary_salt_file_is_one_line(tmp_path):
    from ingest.pseudonym import PrivacyError, load_or_create_salt
    salt = tmp_path / "salt"
    salt.write_bytes(bytes(range(256)))
    salt.chmod(0o600)
    with pytest.raises(PrivacyError, match=r"--salt-file is not text \(byte 128 is not UTF-8\)") as info:
        load_or_create_salt(salt)
    assert "\n" not in str(info.value)
    salt.write_text("  " + "ab" * 16 + "\n")  # text salts still load, stripped
    assert load_or_create_salt(salt) == (b"ab" * 16, False)


def test_binary_salt_file_stops_build_shards_with_exit_2(tmp_path, capsys):
    from ingest import build
    salt = tmp_path / "salt"
    salt.write_bytes(os.urandom(31) + b"\xff")
    salt.chmod(0o600)
    root = tmp_path / "dicoms"
    root.mkdir()
    code = build.main(["--source", "dicom", "--root", str(root), "--out", str(tmp_path / "out"), "--no-progress",
                       "--salt-file", str(salt)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--salt-file is not text" in err[-1], err
    assert not any("Traceback" in line for line in err)
