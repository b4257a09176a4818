"""`python -m eval report`: gather every result in an eval folder into report.md (tables like the published
studies': Scratch / ImageNet / SSL x tasks with 95% CIs), fractions.png, roc-<protocol>.png and report.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from eval.report_analysis import analysis_sections
from eval.report_cells import VIT_FEATURE_SHORT, auroc_table, cell, encoder_label, settings_lines

CATEGORY_ORDER = {"Scratch": 0, "ImageNet": 1, "SSL": 2}
_PROTOCOL_TITLES = {"linear": "linear probe (frozen features)", "finetune": "end-to-end fine-tuning"}


def _load(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        doc = json.loads(path.read_text())
        doc["_file"] = str(path)
        out.append(doc)
    return sorted(out, key=lambda d: (CATEGORY_ORDER.get(d.get("encoder", {}).get("category"), 9),
                                      d.get("encoder", {}).get("name", "")))


def _fewshot_table(docs: list[dict]) -> list[str]:
    tasks = list(dict.fromkeys(t for d in docs for t in d["tasks"]))
    lines = ["## k-shot linear probe", "",
             "Every labelled test image (not balanced); AUROC mean ± sd over seeds, [95% CI of the mean over seeds]; "
             "balanced accuracy at p = 0.5 beside it. Features standardised with the whole (unlabelled) training "
             "split. "
             "The probe's C is fixed, not tuned: a k-shot budget has no validation labels to choose it on.", "",
             "| Encoder | k | seeds | C | " + " | ".join(tasks) + " | Mean AUROC | Mean balanced accuracy |",
             "|---" * (len(tasks) + 6) + "|"]
    for d in docs:
        cells = [f"{d['tasks'][t]['auroc']:.3f} ± {d['tasks'][t]['auroc_std']:.3f}" if t in d["tasks"] else "–"
                 for t in tasks]
        m = d.get("mean_auroc")
        a = d.get("mean_balanced_accuracy") or d.get("mean_accuracy")
        mean = "–" if not m else _spread_cell(m, "auroc")
        acc = "–" if not a else _spread_cell(a, "balanced_accuracy" if "balanced_accuracy" in a else "accuracy")
        lines.append(f"| {encoder_label(d)} | {d['k']} | {d['num_seeds']} | {_num_or_q(d.get('C'))} | "
                     + " | ".join(cells)
                     + f" | {mean} | {acc} |")
    return lines + [""] + settings_lines(docs)


def _spread_cell(m: dict, name: str) -> str:
    ci = m.get(f"{name}_ci95")
    text = f"{m[name]:.3f} ± {m[f'{name}_std']:.3f}"
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _num_or_q(x) -> str:
    return "?" if x is None else f"{x:g}"


def _fractions_table(docs: list[dict]) -> list[str]:
    fracs = sorted({c["fraction"] for d in docs for c in d["curve"]})
    lines = ["## Label fractions", "",
             "Mean AUROC over sampling seeds [95% CI of the seed-averaged model, patient bootstrap].", "",
             "| Encoder | Mode | " + " | ".join(f"{100 * f:g}%" for f in fracs) + " |", "|---" * (len(fracs) + 2) + "|"]
    for d in docs:
        by = {c["fraction"]: c for c in d["curve"]}
        cells = [cell(by[f]["mean_auroc"], by[f].get("mean_auroc_ci")) if f in by else "–" for f in fracs]
        lines.append(f"| {encoder_label(d)} | {d['mode']} | " + " | ".join(cells) + " |")
    unknown = "whole validation split (not recorded)"
    selection = list(dict.fromkeys((d.get("val_policy") or {}).get("description", unknown) for d in docs))
    return lines + [""] + settings_lines(docs) + [f"_Model selection: {t}._" for t in selection] + [""]


def _compare_table(docs: list[dict]) -> list[str]:
    lines = ["## Paired comparisons", "",
             "AUROC(a) − AUROC(b) on the same test images; paired patient bootstrap.", "",
             "| a | b | protocol | mean AUROC diff [95% CI] | p |", "|---|---|---|---|---|"]
    for d in docs:
        m = d["mean_auroc"]
        p = "–" if m["p_value"] is None else f"{m['p_value']:.3g}"
        a, b = (d[s] + (f" ({VIT_FEATURE_SHORT[d[f'{s}_vit_features']]})" if d.get(f"{s}_vit_features") else "")
                for s in ("a", "b"))
        lines.append(f"| {a} | {b} | {d['protocol']} | {cell(m['diff'], m['ci'])} | {p} |")
    return lines + [""]


def plot_fractions(docs: list[dict], path: Path) -> list[tuple[str, str, str]]:
    """Mean AUROC vs label fraction with 95% CI bands: one colour per encoder, solid = linear, dashed = fine-tuned.
    Returns (legend label, colour, line style) per curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    names = list(dict.fromkeys(d["encoder"]["name"] for d in docs))
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    drawn = []
    for d in docs:
        curve = sorted(d["curve"], key=lambda c: c["fraction"])
        x = [100 * c["fraction"] for c in curve]
        y = [c["mean_auroc"] for c in curve]
        lo = [c["mean_auroc_ci"][0] if c["mean_auroc_ci"][0] is not None else np.nan for c in curve]
        hi = [c["mean_auroc_ci"][1] if c["mean_auroc_ci"][1] is not None else np.nan for c in curve]
        colour, style = colours[d["encoder"]["name"]], "--" if d["mode"] == "finetune" else "-"
        label = f"{encoder_label(d)}, {'fine-tuned' if d['mode'] == 'finetune' else 'linear'}"
        ax.plot(x, y, color=colour, ls=style, marker="o" if style == "-" else "s", label=label)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15 if style == "-" else 0.08,
                        hatch=None if style == "-" else "//")
        drawn.append((label, colour, style))
    ax.set_xscale("log")
    fracs = sorted({100 * c["fraction"] for d in docs for c in d["curve"]})
    ax.set_xticks(fracs, [f"{f:g}%" for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel("labelled training patients (%)")
    ax.set_ylabel("mean test AUROC")
    ax.set_title("Label-fraction curve (bands: 95% CI, patient bootstrap)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_roc(folder: Path, docs: list[dict], path: Path, title: str = "") -> bool:
    """ROC curves per task, one line per encoder with stored test predictions; False when none are stored."""
    from sklearn.metrics import roc_curve
    preds = []
    for d in docs:
        npz = Path(d["_file"]).with_suffix(".npz")
        if npz.is_file():
            with np.load(npz) as z:
                preds.append((d, {k: z[k] for k in z.files}))
    if not preds:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [str(t) for t in preds[0][1]["tasks"]]
    cols = min(3, len(tasks))
    rows = int(np.ceil(len(tasks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    for j, task in enumerate(tasks):
        ax = axes[j // cols][j % cols]
        for i, (d, p) in enumerate(preds):
            names = [str(t) for t in p["tasks"]]
            if task not in names:
                continue
            k = names.index(task)
            y, s = p["targets"][:, k], p["scores"][:, k]
            keep = ~np.isnan(y) & np.isfinite(s)
            if len(np.unique(y[keep])) < 2:
                continue
            fpr, tpr, _ = roc_curve(y[keep], s[keep])
            au = d["tasks"].get(task, {}).get("auroc")
            ax.plot(fpr, tpr, color=f"C{i % 10}",
                    label="{}, AUROC {}".format(encoder_label(d), "–" if au is None else f"{au:.3f}"))
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="lower right")
    for j in range(len(tasks), rows * cols):
        axes[j // cols][j % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Write OUT/report.md, OUT/report.json and the figures from the results under OUT; returns the paths."""
    out = Path(out)
    md_path, json_path = out / "report.md", out / "report.json"
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: eval folder does not exist")
    if md_path.exists() and not overwrite:
        raise FileExistsError(f"{md_path}: finished output exists; pass --overwrite to replace it")
    results = {p: _load(out / p) for p in ("linear", "finetune", "fewshot", "fractions", "compare", "knn", "transfer")}
    if not any(results.values()):
        raise FileNotFoundError(f"{out}: no results to report (run linear / fewshot / fractions / finetune first)")
    lines = ["# Evaluation report", ""]
    shards = sorted({d.get("shards") for docs in results.values() for d in docs if d.get("shards")})
    if shards:
        lines += [f"Shards: {', '.join(shards)}", ""]
    written = [md_path, json_path]
    if results["linear"]:
        lines += auroc_table(results["linear"], "Linear probe (frozen features)")
    if results["finetune"]:
        lines += auroc_table(results["finetune"], "End-to-end fine-tuning")
    if results["fewshot"]:
        lines += _fewshot_table(results["fewshot"])
    if results["fractions"]:
        lines += _fractions_table(results["fractions"])
        plot_fractions(results["fractions"], out / "fractions.png")
        lines += ["![label-fraction curve](fractions.png)", ""]
        written.append(out / "fractions.png")
    for protocol in ("linear", "finetune"):
        if results[protocol] and plot_roc(out / protocol, results[protocol], out / f"roc-{protocol}.png",
                                             f"ROC curves on the test split: {_PROTOCOL_TITLES[protocol]}"):
            lines += [f"![ROC curves, {protocol}](roc-{protocol}.png)", ""]
            written.append(out / f"roc-{protocol}.png")
    if results["compare"]:
        lines += _compare_table(results["compare"])
    lines += analysis_sections(out, results)  # knn, transfer, neighbour / map figures: eval.report_analysis
    md_path.write_text("\n".join(lines))
    json_path.write_text(json.dumps({k: [{kk: vv for kk, vv in d.items() if kk != "_file"} for d in v]
                                     for k, v in results.items()}, indent=2))
    return written
