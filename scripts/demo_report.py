"""The demo's verdict and report: SSL encoder vs random init on the phantom findings, from the eval folder's results.

python scripts/demo_report.py DEMO_DIR SSL_NAME RANDOM_NAME
Writes DEMO_DIR/report/README.md (phantoms, augmented views, loss curve, the online monitor's kNN AUROC against steps,
health metrics, per-task table, paired-bootstrap verdict), prints the table, and exits 1 unless the SSL encoder
beats random init with the 95% CI of the difference above 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    return [r for r in (json.loads(line) for line in metrics.read_text().splitlines() if line.strip()) if "step" in r]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# loss.method -> (display name, what its loss is)
METHOD_TEXT = {"simclr": ("SimCLR", "NT-Xent loss"), "micle": ("MICLe", "NT-Xent loss"),
               "moco": ("MoCo v2", "InfoNCE loss"), "dino": ("DINO", "prototype cross-entropy")}


def _loss_curve(rows: list[dict], out: Path, method: str) -> Path | None:
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    name, loss_text = METHOD_TEXT[method]
    ax.set_ylabel(loss_text)
    ax.set_title(f"{name} pretraining on phantoms", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _knn_curve(rows: list[dict], out: Path) -> Path | None:
    """The online monitor's kNN AUROC on the val subset against steps: per task (thin) and their mean (thick)."""
    rows = [r for r in rows if "knn_auroc_mean" in r]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    steps = [r["step"] for r in rows]
    tasks = sorted({k for r in rows for k in r if k.startswith("knn_auroc/")})
    for k in tasks:
        ax.plot(steps, [r.get(k, float("nan")) for r in rows], lw=0.8, alpha=0.5, label=k.split("/", 1)[1])
    ax.plot(steps, [r["knn_auroc_mean"] for r in rows], "k-o", lw=2.2, ms=3, label="mean")
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("kNN AUROC (val subset)")
    ax.set_title("online kNN monitor: the frozen backbone during pretraining", fontsize=10)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, off the curves
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


HEALTH_PANELS = (("health/emb_std", "embedding std (collapse -> 0)"), ("health/top1", "contrastive top-1"),
                 ("health/align", "alignment (lower: views closer)"), ("health/uniform", "uniformity (lower: spread)"),
                 ("health/grad_norm", "gradient norm"), ("lr", "learning rate"))
# DINO's own collapse signals (trainer.dino_loss.teacher_stats) in place of the contrastive ones
DINO_PANELS = (("health/teacher_entropy", "teacher entropy (uniform collapse -> log K)"),
               ("health/proto_perplexity", "prototypes in use (one-prototype collapse -> 1)"),
               ("health/student_teacher_kl", "student-teacher KL"), ("health/emb_std", "backbone feature std"),
               ("health/grad_norm", "gradient norm"), ("lr", "learning rate"))


def _health_curves(rows: list[dict], out: Path, config: dict) -> Path | None:
    rows = [r for r in rows if "health/emb_std" in r]
    if not rows:
        return None
    dino = config.get("loss", {}).get("method") == "dino"
    panels = DINO_PANELS if dino else HEALTH_PANELS
    proj_dim = config.get("model", {}).get("proj_dim")
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(10, 5))
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if key == "health/emb_std" and proj_dim and not dino:
            ax.axhline(int(proj_dim) ** -0.5, color="gray", ls=":", lw=1, label="1/sqrt(D)")
            ax.legend(fontsize=7)
        if key == "health/teacher_entropy" and config.get("loss", {}).get("dino_out_dim"):
            import math
            ax.axhline(math.log(int(config["loss"]["dino_out_dim"])), color="gray", ls=":", lw=1, label="log K")
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _config(run: Path) -> dict:
    """The run's resolved config.toml ({} when unreadable: the report then uses the SimCLR wording)."""
    import tomllib
    try:
        return tomllib.loads((run / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _ci(pair) -> str:
    return "n/a" if not pair or pair[0] is None else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    demo, ssl, rnd = Path(argv[0]), argv[1], argv[2]
    ev = demo / "eval"
    try:
        a = json.loads((ev / "linear" / f"{ssl}.json").read_text())
        b = json.loads((ev / "linear" / f"{rnd}.json").read_text())
        cmp_ = json.loads((ev / "compare" / f"{ssl}-vs-{rnd}-linear.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"demo_report: cannot read the eval results in {ev} ({e})", file=sys.stderr)
        return 2
    report = demo / "report"
    report.mkdir(parents=True, exist_ok=True)
    rows = _rows(demo / "run" / "metrics.jsonl")
    config = _config(demo / "run")
    method = config.get("loss", {}).get("method", "simclr")
    name = METHOD_TEXT.get(method, (method, "loss"))[0]
    method = method if method in METHOD_TEXT else "simclr"
    curve = _loss_curve(rows, report / "pretrain_loss.png", method)
    knn = _knn_curve(rows, report / "knn_auroc.png")
    health = _health_curves(rows, report / "health.png", config)
    tasks = cmp_.get("task_names") or list(a["tasks"])
    header = f"| task | SSL ({name}) AUROC [95% CI] | random init AUROC [95% CI] | difference [95% CI] |"
    lines = [header, "|---|---|---|---|"]
    for t in tasks:
        ra, rb, rc = a["tasks"].get(t, {}), b["tasks"].get(t, {}), cmp_["tasks"].get(t, {})
        lines.append(f"| {t} | {_num(ra.get('auroc'))} {_ci(ra.get('auroc_ci'))} | {_num(rb.get('auroc'))} "
                     f"{_ci(rb.get('auroc_ci'))} | {_num(rc.get('diff'))} {_ci(rc.get('ci'))} |")
    m = cmp_["mean_auroc"]
    lines.append(f"| **mean** | **{_num(a.get('mean_auroc'))}** {_ci(a.get('mean_auroc_ci'))} | "
                 f"**{_num(b.get('mean_auroc'))}** {_ci(b.get('mean_auroc_ci'))} | "
                 f"**{_num(m['diff'])}** {_ci(m['ci'])} |")
    table = "\n".join(lines)
    passed = m["diff"] is not None and m["ci"][0] is not None and m["diff"] > 0 and m["ci"][0] > 0
    verdict = (f"PASS: the {name} encoder beats random init on mean AUROC by {m['diff']:.3f} "
               f"(paired patient bootstrap 95% CI {_ci(m['ci'])}, p = {_num(m.get('p_value'))})" if passed else
               f"FAIL: the {name} encoder does not beat random init with the CI above 0 "
               f"(difference {_num(m['diff'])}, 95% CI {_ci(m['ci'])})")
    script = "`scripts/demo_dino.sh`" if method == "dino" else "`make demo`"
    md = [f"# Demo: {name} on procedural chest X-ray phantoms", "",
          f"Everything below was produced by {script} from generated data: `ingest synth` -> `ingest build-shards "
          f"--source chexpert` -> `trainer/pretrain.py` ({name}) -> `python -m eval linear` (frozen features, "
          "logistic-regression probe per task, test set = the radiologist-style `valid.csv` patients) -> "
          "`python -m eval compare` (paired patient bootstrap).", "",
          f"**{verdict}**", "", table, "",
          "## What the data look like", "", "![phantoms](phantoms.png)", "",
          "## What the encoder sees (two augmented views per image)", "", "![views](views.png)", ""]
    if curve:
        md += ["## Pretraining loss", "", f"![loss]({curve.name})", ""]
    if knn:
        last = [r for r in rows if "knn_auroc_mean" in r][-1]
        md += ["## The run learning: online kNN monitor", "",
               "Every `run.monitor_every` steps the frozen backbone (eval mode) embeds a fixed labelled subset of "
               "the val split and a weighted kNN, each patient fold against the other, scores each finding "
               "(AUROC; 0.5 = chance). "
               f"Last: mean kNN AUROC {last['knn_auroc_mean']:.3f} at step {last['step']}.", "",
               f"![kNN AUROC]({knn.name})", ""]
    if health:
        text = ("Per log step, averaged since the previous one: the teacher targets' mean entropy (log K when every "
                "target is uniform), the prototypes in use (perplexity of the batch-mean target; 1 when one "
                "prototype takes everything), the student-teacher KL, the std of the L2-normalised backbone "
                "features, gradient norm, learning rate." if method == "dino" else
                "Per log step, averaged since the previous one: std of the L2-normalised projections (a collapse "
                "drives it to 0; spread embeddings sit near 1/sqrt(D)), contrastive top-1 in the batch, alignment "
                "and uniformity (Wang & Isola 2020), gradient norm, learning rate.")
        md += ["## Health metrics", "", text, "", f"![health]({health.name})", ""]
    eval_md = ev / "report.md"
    if eval_md.is_file():
        md += ["Full evaluation report (ROC curves, all numbers): [eval/report.md](../eval/report.md)", ""]
    (report / "README.md").write_text("\n".join(md) + "\n")
    print(table)
    print(verdict)
    print(f"report: {report / 'README.md'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
