"""`python -m eval export-weights`: an encoder (encoder.pt, run folder or step-*.pt) -> DIR/model.safetensors and a
timm-style DIR/config.json that timm (ResNets and ViTs) and torchvision (ResNets) load without this project's code.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ingest.errors import one_line
from ingest.files import atomic_write_bytes, atomic_write_text, sha256_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
README_FILE = "README.md"
EXPORT_FORMAT = "cxr-ssl-weights/1"
# How to load DIR elsewhere: written into DIR/README.md, shown in the project README and run by the tests as written
TIMM_SNIPPET = """import timm, json
cfg = json.load(open("DIR/config.json"))
model = timm.create_model(cfg["architecture"], num_classes=0, checkpoint_path="DIR/model.safetensors", \
**cfg["model_args"])"""
TIMM_LOCAL_DIR_SNIPPET = """import timm
model = timm.create_model("local-dir:DIR", pretrained=True)"""
TORCHVISION_SNIPPET = """import json, torch, torchvision
from safetensors.torch import load_file
cfg = json.load(open("DIR/config.json"))["torchvision"]
model = torchvision.models.get_model(cfg["arch"])
model.conv1 = torch.nn.Conv2d(cfg["in_channels"], 64, 7, 2, 3, bias=False)
model.fc = torch.nn.Identity()
model.load_state_dict(load_file("DIR/model.safetensors"))"""


class WeightsError(ValueError):
    """Bad input to `eval export-weights` (one line naming the file)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval export-weights", description=__doc__.splitlines()[0])
    p.add_argument("--encoder", required=True, type=Path, metavar="PATH",
                   help="RUN/encoder.pt, a run folder (its encoder.pt) or a training checkpoint RUN/ckpt/step-*.pt")
    p.add_argument("--arch", default=None, metavar="A",
                   help="the arch the file must hold (a vit_* arch also reads timm / DINOv2 state dicts)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace model.safetensors / config.json already in DIR")
    return p


def timm_name(arch: str) -> tuple[str, dict]:
    """(timm model name, model_args beyond it) that build the same backbone as ``arch``. A ViT whose patch size timm
    registers no name for (e.g. vit_tiny_patch8) takes the size's patch-16 name with patch_size overridden (timm's
    vit factories let keyword arguments win over their defaults)."""
    from trainer.vit import is_vit, parse_arch
    if not is_vit(arch):
        return arch, {}  # timm's ResNets (resnet18 ... wide_resnet50_2) have torchvision's names and layout
    import timm
    size, patch = parse_arch(arch)
    name = f"vit_{size}_patch{patch}_224"
    return (name if timm.is_model(name) else f"vit_{size}_patch16_224"), {"patch_size": patch}


def vit_model_args(model: torch.nn.Module) -> dict:
    """The VisionTransformer arguments trainer.vit.vit_model sets beyond timm's defaults, read off the built model
    (img_size: the grid its position embedding holds, which a forward interpolates to any input size)."""
    grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size
    layer_scale = not isinstance(model.blocks[0].ls1, torch.nn.Identity)
    return {"img_size": [int(grid[0] * patch[0]), int(grid[1] * patch[1])], "global_pool": model.global_pool,
            "dynamic_img_size": bool(model.dynamic_img_size),
            "dynamic_img_pad": bool(model.patch_embed.dynamic_img_pad),
            # LayerScale exists when init_values is set; its trained gammas are loaded over the 1e-5 start
            "init_values": 1e-5 if layer_scale else None, "reg_tokens": int(model.num_reg_tokens)}


def _image_size(meta: dict) -> tuple[int, str]:
    """(training image size, where it came from): the run's data.image_size, else the trainer's default."""
    cfg = meta.get("config")
    size = cfg.get("data", {}).get("image_size") if isinstance(cfg, dict) and isinstance(cfg.get("data"), dict) \
        else None
    if isinstance(size, int) and size > 0:
        return size, "config data.image_size"
    from trainer.config import DataConfig
    return int(DataConfig().image_size), "the trainer's default; the encoder file records no data.image_size"


def export_weights(source: str | Path, out_dir: str | Path, *, arch: str | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``out_dir``/model.safetensors (the backbone's state dict) and config.json (written last; it records the
    weights' sha256) for the encoder at ``source``; returns the config's path. WeightsError / EncoderError on bad
    input, FileExistsError for an earlier export without ``overwrite``."""
    from safetensors.torch import save

    import dali_pipes
    from trainer.encoder_io import read_encoder
    from trainer.vit import is_vit

    enc = read_encoder(source, arch=arch)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"{out_dir}: exists and is not a folder")
    if not overwrite:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if (out_dir / name).exists():
                raise FileExistsError(f"{out_dir / name}: already exists (pass --overwrite to replace it)")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in enc.model.state_dict().items()}
    c = int(enc.in_channels)
    meta = {"format": "pt", "arch": enc.arch, "in_channels": str(c), "feature_dim": str(enc.feature_dim),
            "exported_by": EXPORT_FORMAT}
    blob = save(state, metadata=meta)  # bytes in memory, so nothing is written before the config below is ready
    name, model_args = timm_name(enc.arch)
    model_args["in_chans"] = c  # here too, so timm's local-dir: loader builds the stem the weights have
    if is_vit(enc.arch):
        model_args.update(vit_model_args(enc.model))
    size, size_from = _image_size(enc.meta)
    config = {
        "architecture": name, "num_classes": 0, "num_features": int(enc.feature_dim), "in_chans": c,
        "global_pool": model_args.get("global_pool", "avg"), "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [c, size, size], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
            # the loaders' normalisation: 8-bit gray / 255, then (x - mean) / std on every channel
            "mean": [float(dali_pipes.CXR_MEAN)] * c, "std": [float(dali_pipes.CXR_STD)] * c,
            "num_classes": 0, "first_conv": "patch_embed.proj" if is_vit(enc.arch) else "conv1",
            "classifier": "head" if is_vit(enc.arch) else "fc", "fixed_input_size": False,
        },
        "torchvision": None if is_vit(enc.arch) else {"arch": enc.arch, "in_channels": c},
        "source": {"file": str(enc.path), "sha256": sha256_file(enc.path), "format": _source_format(enc),
                   "step": enc.meta.get("step"), "arch": enc.arch, "input_size_from": size_from},
        "files": {WEIGHTS_FILE: {"sha256": _sha256_bytes(blob)}},
        "format": EXPORT_FORMAT,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / WEIGHTS_FILE, blob)
    atomic_write_text(out_dir / README_FILE, _readme(config))
    return atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _sha256_bytes(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def _source_format(enc) -> str:
    if enc.kind == "training":
        return "training checkpoint"
    return str(enc.meta.get("format") or "state dict")  # a timm / DINOv2 file read with --arch vit_*


def _readme(config: dict) -> str:
    src = config["source"]
    lines = [f"# {src['arch']} encoder, {config['in_chans']} input channel(s)", "",
             f"Exported from `{src['file']}` (sha256 {src['sha256']}). The model returns pooled features (no "
             f"classifier). Input: {config['pretrained_cfg']['input_size']} ({src['input_size_from']}), 8-bit gray "
             f"/ 255, then (x - mean) / std with config.json's pretrained_cfg mean and std. DIR is this folder.", "",
             "timm:", "", "```python", TIMM_SNIPPET, "```", "", "or, with a timm that reads `local-dir:` folders:", "",
             "```python", TIMM_LOCAL_DIR_SNIPPET, "```"]
    if config["torchvision"]:
        lines += ["", "torchvision:", "", "```python", TORCHVISION_SNIPPET, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from trainer.encoder_io import EncoderError
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:  # --help (0) or a one-line argument error (2), already printed
        return int(e.code or 0)
    try:
        path = export_weights(args.encoder, args.out, arch=args.arch, overwrite=args.overwrite)
    except (WeightsError, EncoderError, FileExistsError, OSError) as e:
        print(f"eval export-weights: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"eval export-weights: {path.parent / WEIGHTS_FILE} + {path.name}", file=sys.stderr)
    return 0
