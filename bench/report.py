"""`python -m bench all` summary: headline numbers from each stage's JSON, a Markdown page and a plot.

Images/s per stage (a SimCLR image = two augmented views), pipeline efficiency = end-to-end / model-only on the
same step, and the share of wall time the trainer spent waiting for data.
"""
from __future__ import annotations

from pathlib import Path


def _best(rows: list[dict], key: str, **match) -> dict | None:
    ok = [r for r in rows if isinstance(r.get(key), (int, float)) and all(r.get(k) == v for k, v in match.items())]
    return max(ok, key=lambda r: r[key]) if ok else None


def headline(stages: dict) -> dict:
    """The numbers a reader wants first, from whichever stages produced results (missing ones are absent)."""
    out: dict = {"images_per_s": {}}
    ips = out["images_per_s"]

    def rows(name):
        res = stages.get(name, {}).get("result") or {}
        return res.get("rows", [])

    ingest = rows("ingest")
    r = _best(ingest, "images_per_s", stage="build-shards end to end")
    if r:
        ips[f"ingest build-shards ({r['input']}, {r['workers']} workers)"] = r["images_per_s"]
    r = _best([x for x in ingest if str(x.get("stage", "")).startswith("decode+resize+encode")], "images_per_s")
    if r:
        ips[f"ingest decode+resize+encode per core ({r['input']})"] = r["images_per_s_per_worker"]
    for r in rows("data"):
        if isinstance(r.get("samples_per_s"), (int, float)):
            ips[f"data: {r['loader']} ({r.get('workers_or_threads')} threads)"] = r["samples_per_s"]
    r = _best(rows("model"), "views_per_s")
    if r:
        ips[f"model-only step ({r['arch']} {r['image_size']}px, {r['compile']} {r['precision']} "
            f"{r['memory_format']})"] = r["views_per_s"] / 2
    e2e = rows("e2e")
    r = _best(e2e, "e2e_views_per_s")
    if r:
        ips[f"end-to-end shards->DALI->step ({r['arch']} {r['image_size']}px, {r['data_device']} data)"] = \
            r["e2e_views_per_s"] / 2
        ips[f"model-only, same step as e2e"] = r["model_only_views_per_s"] / 2
        out["pipeline_efficiency"] = r["pipeline_efficiency"]
        out["data_wait_pct"] = r["data_wait_pct"]
    loss = [x for x in rows("loss") if x.get("status") == "ok"]
    if loss:
        n_max = max(x["n_views"] for x in loss)
        out["loss_ms_at_max_n"] = {"n_views": n_max,
                                   **{x["impl"]: x["median_ms"] for x in loss if x["n_views"] == n_max}}
    return out


def plot(summary: dict, path: Path, title: str) -> Path | None:
    """Two panels: images/s per stage (log scale) and pipeline efficiency / data-wait %."""
    ips = summary.get("images_per_s", {})
    if not ips:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(ips) + 2.2), gridspec_kw={"width_ratios": [3, 1]})
    names = list(ips)[::-1]
    values = [ips[n] for n in names]
    colors = ["tab:green" if n.startswith("end-to-end") else "tab:blue" if n.startswith("model") else
              "tab:orange" if n.startswith("data") else "tab:gray" for n in names]
    ax1.barh(range(len(names)), values, color=colors)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("images / s (a pretraining image = 2 views)")
    for i, v in enumerate(values):
        ax1.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax1.set_title(title, fontsize=10)
    eff, wait = summary.get("pipeline_efficiency"), summary.get("data_wait_pct")
    if eff is not None:
        bars = ax2.bar(["pipeline\nefficiency", "data wait"], [100 * eff, wait], color=["tab:green", "tab:red"])
        for b, v in zip(bars, [100 * eff, wait]):
            ax2.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}%", ha="center", va="bottom", fontsize=9)
        ax2.set_ylim(0, max(105, 100 * eff + 10))
        ax2.set_ylabel("%")
        ax2.set_title("e2e / model-only", fontsize=10)
    else:
        ax2.text(0.5, 0.5, "no e2e result", ha="center", va="center")
        ax2.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict, plot_name: str | None) -> str:
    """The readable page: environment, stage status, headline numbers, the plot, then every stage's table."""
    env, summary = doc["env"], doc["summary"]
    gpus = env.get("gpus") or []
    lines = [f"# Benchmark: {', '.join(gpus) if gpus else 'CPU only (' + str(env.get('cpu')) + ')'}", "",
             f"`{doc['command']}` on {env.get('date')}, {doc['mode']} mode, {doc['wall_s']:.0f} s in all.", ""]
    versions = env.get("versions", {})
    lines += ["| | |", "|---|---|",
              f"| GPU | {', '.join(gpus) or 'none'} |",
              f"| driver / CUDA | {env.get('driver')} / {env.get('cuda_runtime')} |",
              f"| CPU | {env.get('cpu')} ({env.get('cpu_cores_available')} cores available) |",
              "| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + " |",
              f"| commit | {env.get('git_commit')} |", ""]
    if not gpus:
        lines += ["> No GPU: every stage ran at tiny CPU sizes. These rows show the suite works; they characterise "
                  "nothing about training throughput.", ""]
    lines += ["## Stages", "", markdown_table([{"stage": k, "status": v["status"], "seconds": v.get("seconds"),
                                        "detail": v.get("error", "")} for k, v in doc["stages"].items()]), ""]
    lines += ["## Headline", ""]
    for name, v in summary.get("images_per_s", {}).items():
        lines.append(f"- {name}: **{v:,.0f} images/s**")
    if "pipeline_efficiency" in summary:
        lines.append("- pipeline efficiency (end-to-end / model-only): "
                     f"**{100 * summary['pipeline_efficiency']:.1f}%**, "
                     f"data wait **{summary['data_wait_pct']:.1f}%** of wall time")
    if "loss_ms_at_max_n" in summary:
        l_ = summary["loss_ms_at_max_n"]
        lines.append(f"- NT-Xent forward+backward at N={l_['n_views']}: " +
                     ", ".join(f"{k} {v:.3g} ms" for k, v in l_.items() if k != "n_views"))
    lines.append("")
    if plot_name:
        lines += [f"![throughput]({plot_name})", ""]
    for name, st in doc["stages"].items():
        res = st.get("result")
        if not res:
            continue
        lines += [f"## {name}", "", f"`{res.get('command', '')}`", "", markdown_table(res.get("rows", [])), ""]
        lines += [f"- {n}" for n in res.get("notes", [])] + [""]
    return "\n".join(lines)
