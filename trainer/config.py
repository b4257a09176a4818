"""Typed run configuration: sections data/model/loss/optim/run/augment from a TOML file plus `section.key=value`
overrides.

Unknown keys and values of the wrong type are rejected with a one-line `ConfigError` before any work starts.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ingest.schema import parse_views
from dali_pipes.augment import AugmentConfig
from trainer.augment_section import AugmentSection, resolve_augment_section
from trainer.methods import METHODS
from trainer.vit import VIT_ARCHS


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the source."""


@dataclass
class DataConfig:
    shards: str = ""                 # shard folder (ingest output) or s3://bucket/prefix; ignored when synthetic
    shards_cache: str = ""           # s3:// shards are staged in CACHE/<bucket>/<prefix>; "": ~/.cache/cxr-ssl/shards
    source: str = "shards"           # "shards" (DALI) | "synthetic" (random tensors: tests, model-only benchmarks)
    split: str = "train"
    batch_size: int = 256            # GLOBAL images per optimiser step (summed over ranks)
    image_size: int = 224
    views: str = "frontal"           # "all" | "frontal" (drops LAT, keeps UNKNOWN) | "PA,AP,..." (ingest.schema)
    device: str = "auto"             # "auto" (gpu when the run is on cuda) | "cpu" | "gpu"
    num_threads: int = 2
    prefetch: int = 2
    shuffle_buffer: int = 0          # 0: the loader's default
    synthetic_batches: int = 64      # batches per "epoch" of the synthetic source
    synthetic_patients: int = 0      # >0: synthetic pids drawn from this many patients (multi-positive tests)


@dataclass
class ModelConfig:
    arch: str = "resnet50"           # resnet18/34/50/101/152, wide_resnet50_2, vit_{tiny,small,base}_patch{16,14,8}
    in_channels: int = 1             # 1 (CXR stem) or 3
    init: str = "random"             # "random" | "imagenet" (ResNets, offline hub cache) | encoder.pt / step-*.pt /
    #                                  a timm state dict (ViTs)
    head_layers: int = 2             # projection head depth: 2 or 3 linear layers
    head_hidden_dim: int = 0         # 0: the backbone's feature dim
    proj_dim: int = 128
    head_bn: bool = True             # BatchNorm in the hidden head layers (SimCLR v2); MoCo v2 uses none
    sync_bn: str = "auto"            # global BatchNorm over ranks: "auto" (SimCLR / MICLe on > 1 rank) | "on" | "off"
    channels_last: bool = True
    compile: str = "auto"            # "auto" (on for cuda, off for cpu) | "on" | "off"
    compile_mode: str = "default"    # torch.compile mode: default | reduce-overhead | max-autotune


@dataclass
class LossConfig:
    method: str = "simclr"           # a key of trainer.methods.METHODS: "simclr" | "moco" | "micle" | "dino"
    temperature: float = 0.1
    positives: str = "sample"        # "sample": the two views; "patient": every same-patient view in the global batch
    impl: str = "auto"               # "auto" (fused on a CUDA GPU, else reference) | "reference" | "fused"
    gather: bool = True              # negatives from every rank (with gradient)
    moco_queue: int = 65536
    moco_momentum: float = 0.999
    moco_shuffle_bn: bool = True     # MoCo shuffle-BN: keys on a batch permuted across ranks (one rank: BN chunks)
    moco_bn_splits: int = 8          # one rank with shuffle-BN: BatchNorm over this many chunks (as 8 GPUs)
    # DINO (loss.method = "dino"; crops: augment.local_crops / local_crop_size / local_crop_scale_*)
    dino_out_dim: int = 65536        # K prototypes of the weight-normalised last layer
    dino_hidden_dim: int = 2048      # head MLP width
    dino_bottleneck_dim: int = 256   # head output before the prototypes (L2-normalised)
    dino_head_layers: int = 3        # linear layers before the prototype layer
    dino_norm_last_layer: bool = True  # prototype gains fixed at 1 (weight norm without a learnt g)
    dino_student_temp: float = 0.1
    dino_teacher_temp: float = 0.04  # after the warm-up
    dino_warmup_teacher_temp: float = 0.04
    dino_warmup_teacher_temp_epochs: float = 0.0
    dino_momentum: float = 0.996     # teacher EMA momentum at step 0; cosine to 1 at the last step
    dino_center_momentum: float = 0.9
    dino_centering: str = "center"   # "center" (EMA centre, all-reduced) | "sinkhorn" (Sinkhorn-Knopp targets)
    dino_sinkhorn_iters: int = 3
    dino_freeze_last_layer_epochs: float = 1.0  # the prototype layer gets no update for this long
    dino_weight_decay_end: float = -1.0  # >= 0: weight decay cosine from optim.weight_decay to this; < 0: constant
    dino_koleo_weight: float = 0.0   # KoLeo regulariser on the global crops' features (DINOv2: 0.1)


@dataclass
class OptimConfig:
    name: str = "lars"               # "lars" | "sgd" | "adamw"
    base_lr: float = 0.3             # lr at batch 256 (see lr_scaling)
    lr_scaling: str = "linear"       # "linear": lr = base_lr * batch / 256 | "sqrt": base_lr * sqrt(batch) | "none"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    trust_coefficient: float = 0.001  # LARS eta
    epochs: float = 100.0
    total_steps: int = 0             # >0 overrides epochs * steps_per_epoch (schedule length)
    warmup_epochs: float = 10.0
    warmup_steps: int = -1           # >=0 overrides warmup_epochs
    min_lr_ratio: float = 0.0        # cosine floor as a fraction of the peak lr
    micro_batch: int = 0             # >0: GradCache, per-rank micro-batch of samples (every negative kept)
    grad_clip_norm: float = 0.0      # 0: off


@dataclass
class RunConfig:
    out: str = "runs/default"        # run folder
    seed: int = 0
    device: str = "auto"             # "auto" | "cpu" | "cuda"
    precision: str = "auto"          # "auto" (bf16 on cuda, fp32 on cpu) | "bf16" | "fp16" (GradScaler) | "fp32"
    deterministic: bool = False      # deterministic algorithms (exact resume on CPU)
    # >0 pins torch's intra-op threads; CPU sums depend on it, so exact resume needs the same count
    cpu_threads: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    resume: str = "auto"             # "auto" (latest in RUN/ckpt) | "force" (auto, changed config) | "none" | path
    max_steps: int = 0               # >0: stop (with a checkpoint) after this step, schedule unchanged
    signal_check_every: int = 0      # ranks agree on SIGTERM/SIGUSR1 at log steps; >0: also every N (host sync)
    # a collective waits at most this long for a peer: a dead or hung rank ends the others with one line (exit 4)
    dist_timeout_s: float = 600.0
    tensorboard: bool = True
    progress: bool = True
    overwrite: bool = False          # allow a fresh run in a folder holding a finished run
    monitor_every: int = 500         # online kNN monitor on the val split every N steps and at the end; 0: off
    monitor_images: int = 1024       # the monitor's fixed labelled val subset (decoded once, kept on the device)
    monitor_k: int = 20              # neighbours of the weighted kNN
    collapse_std_ratio: float = 0.25  # warn when std of normalised embeddings < ratio / sqrt(proj_dim)
    mlflow_uri: str = ""             # MLflow tracking URI (http://host:5000, sqlite:///mlflow.db); "": off
    mlflow_experiment: str = "cxr-ssl"
    mlflow_run_name: str = ""        # "": the run folder's name


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    augment: AugmentSection = field(default_factory=AugmentSection)


CHOICES = {
    ("data", "source"): {"shards", "synthetic"},
    ("data", "device"): {"auto", "cpu", "gpu"},
    ("augment", "preset"): set(AugmentConfig.PRESETS),
    ("model", "arch"): {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", *VIT_ARCHS},
    ("model", "in_channels"): {1, 3},
    ("model", "head_layers"): {2, 3},
    ("model", "compile"): {"auto", "on", "off"},
    ("model", "sync_bn"): {"auto", "on", "off"},
    ("model", "compile_mode"): {"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"},
    ("loss", "method"): set(METHODS),
    ("loss", "positives"): {"sample", "patient"},
    ("loss", "impl"): {"reference", "fused", "auto"},
    ("loss", "dino_centering"): {"center", "sinkhorn"},
    ("optim", "name"): {"lars", "sgd", "adamw"},
    ("optim", "lr_scaling"): {"linear", "sqrt", "none"},
    ("run", "device"): {"auto", "cpu", "cuda"},
    ("run", "precision"): {"auto", "bf16", "fp16", "fp32"},
}


def _field_types(section_cls) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _convert(value, typ, where: str, from_text: bool):
    """Check a TOML value, or convert an override's text, to ``typ`` (an int may widen to float, nothing else)."""
    origin = typing.get_origin(typ) or typ
    if from_text and origin is not str:
        text = value.strip()
        try:
            if origin is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return text.lower() in ("true", "1", "yes", "on")
            if origin is int:
                return int(text)
            if origin is float:
                return float(text)
            if origin is list:
                value = tomllib.loads(f"v = {text}")["v"]
        except (ValueError, tomllib.TOMLDecodeError):
            raise ConfigError(f"{where}: cannot read {value!r} as {origin.__name__}") from None
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is bool and not isinstance(value, bool) or origin is not bool and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {origin.__name__}, got {type(value).__name__} {value!r}")
    if not isinstance(value, origin):
        raise ConfigError(f"{where}: expected {origin.__name__}, got {type(value).__name__} {value!r}")
    return value


def _set(cfg: Config, section: str, key: str, value, source: str, explicit: set, from_text: bool = False) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (sections: {', '.join(sections)})")
    sec = getattr(cfg, section)
    types_ = _field_types(type(sec))
    if (section, key) == ("data", "augment"):
        raise ConfigError(f"{source}: data.augment moved to the [augment] section: use augment.preset")
    if key not in types_:
        raise ConfigError(f"{source}: unknown key {section}.{key} (keys: {', '.join(types_)})")
    where = f"{source}: {section}.{key}"
    value = _convert(value, types_[key], where, from_text)
    allowed = CHOICES.get((section, key))
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{where} = {value!r} is not one of {sorted(allowed, key=str)}")
    setattr(sec, key, value)
    explicit.add((section, key))


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults < TOML file < ``section.key=value`` overrides (in order); then cross-field checks."""
    cfg = Config()
    explicit: set[tuple[str, str]] = set()  # (section, key) given by the file or an override
    if path is not None:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _set(cfg, section, key, value, str(path), explicit)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        _set(cfg, section, key, value, f"override {item!r}", explicit, from_text=True)
    try:
        resolve_augment_section(cfg.augment, {k for s, k in explicit if s == "augment"})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field rules that a single key's type cannot express."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(cfg.data.batch_size > 0, "data.batch_size must be > 0")
    need(cfg.data.image_size >= 16, "data.image_size must be >= 16")
    need(cfg.data.source == "synthetic" or bool(cfg.data.shards), "data.shards is required when data.source = 'shards'")
    try:
        parse_views(cfg.data.views)
    except ValueError as e:
        raise ConfigError(f"data.{e}") from None
    need(cfg.loss.temperature > 0, "loss.temperature must be > 0")
    need(0.0 <= cfg.loss.moco_momentum < 1.0, "loss.moco_momentum must be in [0, 1)")
    need(cfg.optim.base_lr > 0, "optim.base_lr must be > 0")
    need(cfg.optim.epochs > 0 or cfg.optim.total_steps > 0, "optim.epochs or optim.total_steps must be > 0")
    need(cfg.optim.micro_batch >= 0, "optim.micro_batch must be >= 0")
    need(len(cfg.optim.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and 0 <= b < 1 for b in cfg.optim.betas),
         f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    need(cfg.loss.moco_bn_splits >= 1, "loss.moco_bn_splits must be >= 1")
    try:
        METHODS[cfg.loss.method].check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    need(cfg.run.signal_check_every >= 0, "run.signal_check_every must be >= 0")
    need(cfg.run.dist_timeout_s > 0, "run.dist_timeout_s must be > 0")
    need(cfg.run.log_every > 0 and cfg.run.ckpt_every > 0 and cfg.run.keep_last > 0,
         "run.log_every, run.ckpt_every and run.keep_last must be > 0")
    need(cfg.run.monitor_every >= 0 and cfg.run.monitor_images >= 0 and cfg.run.monitor_k > 0,
         "run.monitor_every and run.monitor_images must be >= 0, run.monitor_k > 0")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (round-trips through load_config)."""
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"[{sec.name}]")
        for k, v in dataclasses.asdict(getattr(cfg, sec.name)).items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def split_argv(argv: typing.Sequence[str]) -> tuple[str | None, list[str]]:
    """``CONFIG.toml key=value ...`` -> (config path or None, overrides)."""
    path, overrides = None, []
    for a in argv:
        if "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one CONFIG.toml and section.key=value overrides")
    return path, overrides




# Keys a resumed run may change: they steer when the run stops, logs, checkpoints and what it shows, never what it
# computes. Every other difference from the checkpoint's config stops a resume (run.resume=force overrides).
SAFE_ON_RESUME = frozenset({
    "run.max_steps", "run.log_every", "run.ckpt_every", "run.keep_last", "run.signal_check_every", "run.dist_timeout_s",
    "run.progress", "run.tensorboard", "run.resume", "run.out", "run.overwrite",
    # the monitor and the collapse warning only observe (eval mode, BatchNorm statistics untouched)
    "run.monitor_every", "run.monitor_images", "run.monitor_k", "run.collapse_std_ratio",
    "run.mlflow_uri", "run.mlflow_experiment", "run.mlflow_run_name",  # where the rows are also sent
    "data.shards_cache",  # where s3:// shards are staged: the same verified bytes wherever they lie
})


def flat_keys(config: dict) -> dict:
    """A `to_dict` config -> {"section.key": value}."""
    return {f"{s}.{k}": v for s, table in config.items() if isinstance(table, dict) for k, v in table.items()}


def changed_keys(saved: dict, current: dict) -> list[str]:
    """``section.key: old -> new`` for every key outside SAFE_ON_RESUME whose value differs between two `to_dict`
    configs; a key only one of them has (written by another version of this code) counts as changed."""
    old, new = flat_keys(saved), flat_keys(current)
    missing = object()
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, missing), new.get(key, missing)
        if key not in SAFE_ON_RESUME and a != b:
            out.append(f"{key}: {'(absent)' if a is missing else repr(a)} -> {'(absent)' if b is missing else repr(b)}")
    return out
