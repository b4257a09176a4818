"""Trainer: SimCLR, MoCo v2 and MICLe pretraining (`torchrun trainer/pretrain.py CONFIG.toml key=value ...`)."""
