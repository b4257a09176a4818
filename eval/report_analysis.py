"""Report sections for kNN, distribution-shift transfer and the neighbour / map figures (called by eval.report),
each table followed by the label policy and eval view its numbers were made under.
"""
from __future__ import annotations

import json
from pathlib import Path

from eval.report_cells import auroc_table, cell, encoder_label, settings_lines


def knn_section(docs: list[dict]) -> list[str]:
    lines = auroc_table(docs, "Weighted kNN (frozen features, cosine similarity)")
    params = sorted({(d.get("k"), d.get("temperature")) for d in docs}, key=str)
    return lines + [", ".join(f"k = {k}, T = {t}" for k, t in params) + "; training split = bank; nothing tuned.", ""]


def _transfer_label(doc: dict) -> str:
    return encoder_label(doc) + (", fine-tuned" if doc.get("probe") == "finetuned" else ", linear probe")


def transfer_section(docs: list[dict], paired: list[dict]) -> list[str]:
    targets = sorted({d.get("target_shards", "?") for d in docs})
    lines = ["## Distribution shift (fitted and selected on the source, not refitted)", "",
             f"Source: {', '.join(sorted({d.get('shards', '?') for d in docs}))}; target: {', '.join(targets)}. "
             "Drop = in-domain − shifted AUROC; CIs from independent patient bootstraps of the two test sets.", "",
             "| Encoder | Task (source → target) | In-domain AUROC | Shifted AUROC | Drop |", "|---|---|---|---|---|"]
    for d in docs:
        for task, target in d["task_map"].items():
            i, s = d["in_domain"]["tasks"].get(task, {}), d["shifted"]["tasks"].get(task, {})
            dr = d["drop"]["tasks"].get(task, {})
            name = task if task == target else f"{task} → {target}"
            lines.append(f"| {_transfer_label(d)} | {name} | {cell(i.get('auroc'), i.get('auroc_ci'))} | "
                         f"{cell(s.get('auroc'), s.get('auroc_ci'))} | {cell(dr.get('drop'), dr.get('drop_ci'))} |")
        m = d["drop"]["mean"]
        i, s = d["in_domain"], d["shifted"]
        lines.append(f"| {_transfer_label(d)} | **mean** | {cell(i.get('mean_auroc'), i.get('mean_auroc_ci'))} | "
                     f"{cell(s.get('mean_auroc'), s.get('mean_auroc_ci'))} | {cell(m['drop'], m['drop_ci'])} |")
    notes = [f"- {d['encoder']['name']}: {n}" for d in docs for n in d.get("notes", [])]
    lines += ([""] + notes if notes else []) + [""] + settings_lines(docs)
    if paired:
        lines += ["Encoders compared on the shifted (target) set: AUROC(a) − AUROC(b) on the same images, "
                  "paired patient bootstrap.",
                  "", "| a − b | mean AUROC diff [95% CI] | p |", "|---|---|---|"]
        for p in paired:
            m = p["mean_auroc"]
            pv = "–" if m["p_value"] is None else f"{m['p_value']:.3g}"
            lines.append(f"| {p['a']} − {p['b']} | {cell(m['diff'], m['ci'])} | {pv} |")
        lines.append("")
    return lines


def figure_links(out: Path) -> list[str]:
    lines = []
    for folder, title in (("neighbours", "Nearest training images of test images"), ("map", "Feature maps")):
        pngs = sorted((out / folder).glob("*.png")) if (out / folder).is_dir() else []
        if pngs:
            lines += [f"## {title}", ""]
            for p in pngs:
                rel = p.relative_to(out).as_posix()
                lines += [f"[{rel}]({rel}) (coordinates / captions: {Path(rel).with_suffix('.csv').as_posix()})", "",
                          f"![{p.stem}]({rel})", ""]
    return lines


_SUMMARY_PROTOCOLS = (("linear", "Linear probe"), ("finetune", "Fine-tuned"), ("knn", "kNN"))


def summary_table(results: dict) -> list[str]:
    """Mean test AUROC [95% CI] per encoder (rows) and frozen / fine-tuned protocol (columns), kNN beside the
    probes, so the protocols of one encoder read along a row."""
    present = [(p, title) for p, title in _SUMMARY_PROTOCOLS if results.get(p)]
    if len(present) < 2 or not results.get("knn"):
        return []
    rows: dict[str, dict] = {}
    for p, _ in present:
        for d in results[p]:
            rows.setdefault(encoder_label(d), {"_order": (d.get("encoder", {}).get("category", ""), len(rows))})[p] = d
    order = {"Scratch": 0, "ImageNet": 1, "SSL": 2}
    lines = ["## Mean AUROC by protocol", "",
             "Mean test AUROC over each protocol's tasks [95% CI, patient bootstrap].", "",
             "| Encoder | " + " | ".join(t for _, t in present) + " |", "|---" * (len(present) + 1) + "|"]
    for label, by in sorted(rows.items(), key=lambda kv: (order.get(kv[1]["_order"][0], 9), kv[1]["_order"][1])):
        cells = [cell(by[p].get("mean_auroc"), by[p].get("mean_auroc_ci")) if p in by else "–" for p, _ in present]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""] + settings_lines([d for p, _ in present for d in results[p]])


def analysis_sections(out: Path, results: dict) -> list[str]:
    """Markdown for the knn / transfer results in ``results`` and the figures under ``out``."""
    lines = summary_table(results)
    if results.get("knn"):
        lines += knn_section(results["knn"])
    if results.get("transfer"):
        folder = out / "transfer" / "paired"
        paired = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        lines += transfer_section(results["transfer"], paired)
    return lines + figure_links(out)
