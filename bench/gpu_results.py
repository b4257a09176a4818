"""The GPU check's results: one JSON record per line in ``results.jsonl`` (appended and fsynced as each figure is
measured, so a killed run keeps what it did) and the ``summary.md`` rendered from them, by scripts/gpu_check.py on
the lent machine and by `python -m bench render DIR` on any machine. Standard library only."""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path

RESULTS_NAME, SUMMARY_NAME, ENV_NAME = "results.jsonl", "summary.md", "env.json"
# a planned row (a "plan" record) that no figure answers, by how its step ended
NOT_MEASURED = {"timeout": "not measured (cap)", "skipped": "not measured (stage deadline)",
                "failed": "not measured (step failed)", "stopped": "not measured (stopped)"}


def append_record(path: Path, record: dict) -> dict:
    """Append one record (stamped with the UTC time) and force it to disk before returning."""
    record = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **record}
    line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return record


def read_records(path: Path) -> tuple[list[dict], int]:
    """(records, unreadable lines): a line cut short by a kill is counted, never fatal."""
    records, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return "" if value is None else str(value)


def _cell(text) -> str:
    return _fmt(text).replace("|", "/").replace("\n", " ")


def render(records: list[dict], env: dict | None = None, unreadable: int = 0) -> str:
    """summary.md: the environment, every measured figure (metric, value, unit, conditions, goal), each planned row
    that was not measured and why (e.g. "not measured (cap)"), each step's outcome and the tests' tally."""
    lines = ["# GPU check summary", ""]
    env = env or {}
    if env:
        v = env.get("versions", {})
        lines += [f"- GPU: {', '.join(env.get('gpus') or []) or 'none'}; driver {env.get('driver')}; "
                  f"CUDA runtime {env.get('cuda_runtime')}",
                  f"- torch {v.get('torch')}, Triton {v.get('triton')}, torchvision {v.get('torchvision')}, "
                  f"DALI {v.get('nvidia.dali')}, Python {env.get('python')}; commit {env.get('git_commit')}", ""]
    figures = [r for r in records if r.get("kind") == "figure"]
    measured = {(r.get("stage"), r.get("step"), r.get("metric")) for r in figures}
    pending: dict[tuple, dict[str, dict]] = {}  # (stage, step) -> planned rows no figure answers, in plan order
    for r in records:
        if r.get("kind") == "plan" and (r.get("stage"), r.get("step"), r.get("metric")) not in measured:
            pending.setdefault((r.get("stage"), r.get("step")), {})[r.get("metric")] = r

    def row(stage, metric, value, unit, conditions, goal) -> str:
        return "| " + " | ".join(_cell(x) for x in (stage, metric, value, unit, conditions, goal)) + " |"

    def unmeasured(key, status: str, detail: str) -> list[str]:
        why = NOT_MEASURED.get(status, "not measured")
        return [row(p.get("stage"), p.get("metric"), why, p.get("unit"), f"step {p.get('step')}: {detail}", "")
                for p in pending.pop(key, {}).values()]

    lines += ["| stage | metric | value | unit | conditions | goal |", "|---|---|---|---|---|---|"]
    table = []
    for r in records:
        if r.get("kind") == "figure":
            value = r.get("value") if r.get("status", "ok") == "ok" else r.get("status")
            table.append(row(r.get("stage"), r.get("metric"), value, r.get("unit"), r.get("conditions"),
                             r.get("goal")))
        elif r.get("kind") == "step":
            table += unmeasured((r.get("stage"), r.get("step")), r.get("status"),
                                r.get("detail") or f"the step ended {r.get('status')} without this row")
    for key in list(pending):
        table += unmeasured(key, "stopped", "the stage ended before this step did")
    lines += table
    if not table:
        lines.append("| | (no figures recorded) | | | | |")
    steps = [r for r in records if r.get("kind") == "step"]
    if steps:
        lines += ["", "## Steps", "", "| stage | step | status | seconds | cap s | detail |",
                  "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in ("stage", "step", "status", "seconds", "cap_s", "detail"))
                  + " |" for r in steps]
    tests = [r for r in records if r.get("kind") == "test"]
    if tests:
        tally: dict[str, int] = {}
        for r in tests:
            tally[r.get("outcome", "?")] = tally.get(r.get("outcome", "?"), 0) + 1
        lines += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))]
        lines += [f"- {r.get('outcome')}: `{r.get('nodeid')}` {_cell(r.get('detail'))}" for r in tests
                  if r.get("outcome") not in ("passed", "skipped")]
    notes = [r for r in records if r.get("kind") == "note"]
    if notes or unreadable:
        lines += ["", "## Notes", ""] + [f"- [{r.get('stage')}] {r.get('text')}" for r in notes]
        if unreadable:
            lines.append(f"- {unreadable} unreadable line(s) of {RESULTS_NAME} left out (a write cut short)")
    return "\n".join(lines) + "\n"


def write_summary(folder: Path) -> Path:
    """Render ``folder/summary.md`` from ``folder/results.jsonl`` (and ``env.json`` if present), atomically."""
    folder = Path(folder)
    records, bad = read_records(folder / RESULTS_NAME)
    env = {}
    if (folder / ENV_NAME).is_file():
        try:
            env = json.loads((folder / ENV_NAME).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            env = {}
    out = folder / SUMMARY_NAME
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(records, env, bad), encoding="utf-8")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench render DIR`: re-render DIR/summary.md from DIR/results.jsonl (e.g. a GPU check's results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m bench render DIR   (DIR holds a GPU check's results.jsonl; writes DIR/summary.md)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    folder = Path(argv[0])
    if not (folder / RESULTS_NAME).is_file():
        print(f"bench render: {folder / RESULTS_NAME}: not found (a GPU check's output folder is expected)",
              file=sys.stderr)
        return 2
    print(write_summary(folder))
    return 0
