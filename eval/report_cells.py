"""Cells, row labels and the per-task AUROC table shared by eval.report and eval.report_analysis: a number with its
95% CI, an encoder's row label, the label-policy / eval-view line and the label counts printed under each table.
"""
from __future__ import annotations


def cell(x, ci=None) -> str:
    if x is None:
        return "–"
    if ci and ci[0] is not None:
        return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{x:.3f}"


# A ViT's frozen-feature choice changes what a row measures, so every table's row label carries it.
VIT_FEATURE_SHORT = {"cls": "CLS token", "mean": "mean patch token", "both": "CLS + mean patch token"}


def encoder_label(doc: dict) -> str:
    e = doc.get("encoder", {})
    feats = e.get("vit_features")
    arch = e.get("arch", "?") + (f", {VIT_FEATURE_SHORT.get(feats, feats)}" if feats else "")
    return f"{e.get('category', '?')}: {e.get('name', '?')} ({arch})"


def policy_text(policy: dict | None) -> str:
    if not policy:
        return "not recorded (results written before label policies were recorded)"
    names = {"zero": "blank = negative", "mask": "blank = masked"}
    blank = names.get(policy.get("blank"), f"blank = {policy.get('blank')}")
    return f"{blank}, uncertain (-1) {policy.get('uncertain', '?')}"


def view_text(doc: dict) -> str:
    t = doc.get("transform") or {}
    view = doc.get("eval_view") or t.get("eval_view")
    size = t.get("image_size", "?")
    if view == "full":
        return f"full (whole film resized to {size} x {size} px)"
    if view == "center":
        return f"center (shorter side {t.get('resize_size', '?')} px, centre crop {size} px)"
    return "not recorded"


def settings_lines(docs: list[dict]) -> list[str]:
    """The label policy and eval view under a table: one line when every row shares them, else one per encoder
    (rows under different policies are not comparable, and the reader must see that)."""
    def one(d):
        return f"label policy: {policy_text(d.get('label_policy'))}; eval view: {view_text(d)}"
    texts = list(dict.fromkeys(one(d) for d in docs))
    if len(texts) == 1:
        return [f"_Setting: {texts[0]}._", ""]
    return ["_Settings differ between rows (not directly comparable):_", ""] + \
        [f"- {d.get('encoder', {}).get('name', '?')}: {one(d)}" for d in docs] + [""]


def auroc_table(docs: list[dict], title: str) -> list[str]:
    tasks = list(dict.fromkeys(t for d in docs for t in d.get("task_names", d["tasks"])))
    lines = [f"## {title}", "", "Test AUROC [95% CI, patient bootstrap]. AUPRC in report.json.", "",
             "| Encoder | " + " | ".join(tasks) + " | Mean AUROC |", "|---" * (len(tasks) + 2) + "|"]
    for d in docs:
        cells = [cell(d["tasks"].get(t, {}).get("auroc"), d["tasks"].get(t, {}).get("auroc_ci")) for t in tasks]
        lines.append(f"| {encoder_label(d)} | " + " | ".join(cells)
                     + f" | {cell(d.get('mean_auroc'), d.get('mean_auroc_ci'))} |")
    notes = [f"- {d['encoder']['name']}: {n}" for d in docs for n in d.get("notes", [])]
    return lines + [""] + settings_lines(docs) + counts_lines(docs, tasks) + (notes + [""] if notes else [])


def counts_lines(docs: list[dict], tasks: list[str]) -> list[str]:
    """Positive / negative images per task and split under the table's label policy (from the first result that
    records them: every row of a table shares its shards and policy, or settings_lines says otherwise)."""
    rows = next((d["tasks"] for d in docs if any("n_train_pos" in r for r in d.get("tasks", {}).values())), None)
    if rows is None:
        return []
    cells = []
    for t in tasks:
        r = rows.get(t, {})
        per_split = [f"{s} {r[f'n_{s}_pos']}/{r[f'n_{s}_neg']}" for s in ("train", "val", "test") if f"n_{s}_pos" in r]
        cells.append(f"{t}: {', '.join(per_split)}")
    return ["_Images positive/negative per task: " + "; ".join(cells) + "._", ""]
