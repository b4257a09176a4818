"""The bundle's model card (README.md), generated from bundle.json so the two never disagree."""
from __future__ import annotations

from eval.bundle import SALIENCY_TEXT, saliency_of

VIT_FEATURE_TEXT = {"cls": "the CLS token", "mean": "the mean of the patch tokens",
                    "both": "the CLS token and the mean patch token, concatenated"}


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def model_card(meta: dict) -> str:
    e, v, p = meta["encoder"], meta["view"], meta["provenance"]
    view = (f"shorter side -> {v['resize_size']} px, centre crop {v['image_size']} px" if v["mode"] == "center"
            else f"whole film resized to {v['image_size']} x {v['image_size']} px")
    lines = [
        f"# Model card: {e['name']} ({meta['protocol']})", "",
        "**Research software, not a medical device.** The outputs are a model's scores on one image, not a diagnosis;",
        "they were validated only on the test split named below and must not guide patient care.", "",
        "## Model",
        f"- encoder: `{e['name']}` ({e['category']}, {e['arch']}, {e['in_channels']} input channel(s)), "
        f"sha256 `{e['sha256'][:16]}...`",
        "- heads: " + ("linear probes on standardised frozen features" if meta["protocol"] == "linear"
                       else "fine-tuned network, linear head"),
        *([f"- ViT features: {VIT_FEATURE_TEXT[e['vit_features']]}; saliency shown: "
           f"{SALIENCY_TEXT[saliency_of(e['vit_features'])]}"] if e.get("vit_features") else []),
        "- input: 8-bit gray decoded like ingest (DICOM LUTs, MONOCHROME1 inverted), "
        f"shorter side {meta['ingest']['size']} px; "
        f"eval view `{v['mode']}` ({view}); "
        f"(x / 255 - {meta['normalisation']['mean']}) / {meta['normalisation']['std']}",
        f"- label policy: {p['label_policy']}", "",
        "## Findings", "",
        f"Threshold rule: {meta['threshold_rule']}. Sensitivity / specificity at that threshold on the test split.", "",
        "| finding | test AUROC | 95% CI | val AUROC | threshold | test sens. | test spec. |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in meta["tasks"]:
        m, th = meta["metrics"][t], meta["thresholds"][t]
        lines.append(f"| {t} | {_f(m['test_auroc'])} | {_ci(m['test_auroc_ci'])} | {_f(m['val_auroc'])} | "
                     f"{_f(th['threshold'], 4) if th.get('validated') else 'not validated'} | "
                     f"{_f(th.get('test_sensitivity'))} | "
                     f"{_f(th.get('test_specificity'))} |")
    notes = [f"- {t}: {meta['thresholds'][t]['note']}" for t in meta["tasks"] if meta["thresholds"][t].get("note")]
    lines += ["", f"Mean test AUROC {_f(meta.get('mean_test_auroc'))}, 95% CI {_ci(meta.get('mean_test_auroc_ci'))} "
              "(patient bootstrap).", *([""] + notes if notes else []), "",
              "## Provenance",
              f"- shard manifest sha256: `{p['manifest_sha256']}`",
              f"- images (train / val / test): {p.get('num_images')}",
              f"- evaluated {p['evaluated']}, exported {p['exported']}",
              "- calibration: none (the probabilities are the heads' raw outputs)", ""]
    return "\n".join(lines)
