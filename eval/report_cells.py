"""Cell and row-label formatting shared by eval.report and eval.report_analysis: a number with its 95% CI, an
encoder's row label, and the label-policy / eval-view line printed under each table.
"""
from __future__ import annotations


def cell(x, ci=None) -> str:
    if x is None:
        return "–"
    if ci and ci[0] is not None:
        return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{x:.3f}"


def encoder_label(doc: dict) -> str:
    e = doc.get("encoder", {})
    return f"{e.get('category', '?')}: {e.get('name', '?')} ({e.get('arch', '?')})"


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
