"""DALI pipelines: decode (nvJPEG) and augment CXR shards on the GPU, with the same graph runnable on the CPU."""
from dali_pipes.augment import CXR_MEAN, CXR_STD, AugmentConfig
from dali_pipes.loaders import (EvalLoader, EvalOptions, PretrainLoader, PretrainOptions, build_eval_loader,
                                build_pretrain_loader)

__all__ = ["AugmentConfig", "CXR_MEAN", "CXR_STD", "EvalLoader", "EvalOptions", "PretrainLoader", "PretrainOptions",
           "build_eval_loader", "build_pretrain_loader"]
