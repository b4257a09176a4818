"""MICLe (Azizi et al. 2021): SimCLR's loss on two different images of one patient when the patient has several."""
from __future__ import annotations

from trainer.methods.simclr import SimCLR


class MICLe(SimCLR):
    name = "micle"
    micle_pairs = True

    def log_fields(self, loader) -> dict:
        # the share of samples that found a second image of their patient (the rest pair two views of one image)
        return {"micle_multi_instance": float(getattr(loader, "multi_instance_fraction", float("nan")))}
