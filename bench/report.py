"""Summarise bench/results/*.json as markdown: every result in bench/README.md between its bench
markers, and the results summary in README.md between its summary markers.

Every number comes from the JSON files. ``cross_domain.json`` (the full profile) is preferred; when
only ``cross_domain_quick.json`` exists it is used and the tables say so.

Run from the repository root: ``python bench/report.py`` (``--print`` only prints).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, RESULTS, fold_means
from bench.report_calibration import render_calibration
from bench.report_encoder import render_encoder, render_summary
from bench.report_federated_encoder import render_federated_encoder_summary
from bench.report_federation import render_federation
from bench.report_levers import render_levers

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
FEDERATED_START, FEDERATED_END = "<!-- federated:start -->", "<!-- federated:end -->"
README = REPO / "README.md"
BENCH_README = REPO / "bench" / "README.md"


def _pct(value: float | None, ci: float | None = None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _order(methods: list[str]) -> list[str]:
    """Meta-learners first (the project's own), then the baselines, in first-seen order."""
    baselines = ("pixel", "random", "supervised")
    return [m for m in methods if not m.startswith(baselines)] + [
        m for m in methods if m.startswith(baselines)
    ]


def cross_domain_section(payload: dict[str, Any], source: str) -> list[str]:
    """Markdown of the cross-domain results: per-fold 5-shot tables, shot means, within-source."""
    rows = payload["results"]["rows"]
    config = payload["config"]
    env = payload["environment"]
    ok = [r for r in rows if r.get("error") is None]
    means = fold_means(rows)
    out = [
        "### Cross-domain few-shot (leave one modality out)",
        "",
        f"From `bench/results/{source}` (profile `{config['profile']}`, {env['device_name']}, "
        f"torch {env['torch']}, {env['date']}). Accuracy % with 95% CI; {config['note']}; "
        f"{config['queries']} queries per class; training steps {config['steps']}.",
    ]
    if config["profile"] != "full":
        out.append(
            "**Quick profile: a smoke test with tiny training budgets, not the real numbers.**"
        )
    shots = 5 if 5 in config["shots"] else config["shots"][0]
    for ways in config["ways"]:
        sel = [r for r in ok if r["variant"] == "all" and r["ways"] == ways and r["shots"] == shots]
        folds = list(dict.fromkeys(r["fold"] for r in sel))
        methods = _order(list(dict.fromkeys(r["method"] for r in sel)))
        table = []
        for method in methods:
            by_fold = {r["fold"]: r for r in sel if r["method"] == method}
            cells = [
                _pct(by_fold[f]["accuracy"], by_fold[f]["ci95"]) if f in by_fold else "-"
                for f in folds
            ]
            mean = [
                m
                for m in means
                if (m["method"], m["variant"], m["ways"], m["shots"])
                == (method, "all", ways, shots)
            ]
            table.append([method, *cells, _pct(mean[0]["accuracy"]) if mean else "-"])
        out += ["", f"**{ways}-way {shots}-shot**, held-out modality:", ""]
        out += _table(["method", *folds, "mean"], table)
    shapes = " / ".join(f"{w}-way" for w in config["ways"])
    out += ["", f"**Mean over held-out modalities by shots** ({shapes}):", ""]
    methods = _order(list(dict.fromkeys(m["method"] for m in means)))
    table = []
    for method in methods:
        cells = []
        for s in config["shots"]:
            vals = []
            for ways in config["ways"]:
                hit = [
                    m
                    for m in means
                    if (m["method"], m["variant"], m["ways"], m["shots"])
                    == (method, "all", ways, s)
                ]
                vals.append(_pct(hit[0]["accuracy"]) if hit else "-")
            cells.append(" / ".join(vals))
        table.append([method, *cells])
    out += _table(["method", *(f"{s}-shot" for s in config["shots"])], table)
    within = [r for r in ok if r["variant"] == "within_source" and r["shots"] == shots]
    if within:
        out += [
            "",
            f"**Within-source rows, {shots}-shot** (classes that share an acquisition source only: "
            "brain_mri without `notumor`, skin_dermoscopy_isic without `melanoma`/`nevus`):",
            "",
        ]
        out += _table(
            ["dataset", "method", "ways", "shots", "accuracy %"],
            [
                [
                    r["dataset"],
                    r["method"],
                    str(r["ways"]),
                    str(r["shots"]),
                    _pct(r["accuracy"], r["ci95"]),
                ]
                for r in within
            ],
        )
    failed = [r for r in rows if r.get("error") is not None]
    if failed:
        out += ["", f"{len(failed)} configurations could not be sampled (see the JSON)."]
    png = source.replace(".json", ".png")
    if (RESULTS / png).is_file():
        out += ["", f"![cross-domain accuracy](bench/results/{png})"]
    return out


def throughput_section(payload: dict[str, Any], source: str) -> list[str]:
    """Markdown of training throughput and adaptation latency."""
    res = payload["results"]
    env = payload["environment"]
    out = [
        "### Throughput and adaptation latency",
        "",
        f"From `bench/results/{source}` ({env['device_name']}, {env['cpu_count']} CPUs, "
        f"{env['date']}); synthetic 64x64 images, Conv-4.",
        "",
    ]
    out += _table(
        ["meta-learner", f"episodes/s on {res['device']} (5-way 5-shot 10-query)", "s/step"],
        [
            [r["learner"], f"{r['episodes_per_s']:.2f}", f"{r['seconds_per_step']:.3f}"]
            for r in res["training"]
        ],
    )
    lat = res["latency"]
    out += [
        "",
        f"Adaptation latency (prototypes on {lat['support']} support images + predicting "
        f"{lat['predicted']}, {lat['threads']} CPU threads, {lat['repeats']} runs): "
        f"p50 {lat['p50_s']:.3f} s, p90 {lat['p90_s']:.3f} s.",
    ]
    png = source.replace(".json", ".png")
    if (RESULTS / png).is_file():
        out += ["", f"![throughput and latency](bench/results/{png})"]
    return out


def dp_epsilon_section(payload: dict[str, Any], source: str) -> list[str]:
    """Markdown of accuracy vs epsilon (mean over held-out folds, and per fold)."""
    rows, config, env = payload["results"]["rows"], payload["config"], payload["environment"]
    labels = list(dict.fromkeys(r["epsilon"] for r in rows))
    folds = config["folds"]
    out = [
        "### Accuracy vs epsilon (DP episodic ProtoNet)",
        "",
        f"From `bench/results/{source}` ({env['device_name']}, {env['date']}). One site holds the "
        f"four other modalities; {config['steps']} DP steps, q = {config['sample_rate']}, "
        f"E = {config['episodes']} episodes per step, delta = {config['delta']:g} "
        f"({config['accountant']}); 5-shot accuracy % on the held-out modality, prototype "
        f"adaptation, {config['eval_episodes']} episodes. Folds: {', '.join(folds)}.",
        "",
    ]
    table = []
    for label in labels:
        cells = []
        for ways in (2, 3):
            accs = [r["accuracy"] for r in rows if r["epsilon"] == label and r["ways"] == ways]
            cells.append(_pct(sum(accs) / len(accs)) if accs else "-")
        table.append([label, *cells])
    out += _table(["epsilon", "2-way 5-shot (mean)", "3-way 5-shot (mean)"], table)
    png = source.replace(".json", ".png")
    if (RESULTS / png).is_file():
        out += ["", f"![accuracy vs epsilon](bench/results/{png})"]
    needed = payload["results"].get("records_needed")
    if needed:
        out += [
            "",
            "Noise multiplier epsilon 1 needs as the site grows k-fold (q / k keeps the "
            "patients per step): "
            + ", ".join(f"k={r['patients_factor']}: {r['sigma_eps1']:.2f}" for r in needed)
            + f" (epsilon 8 at k=1: {needed[0]['sigma_eps8_at_1x']:.2f}).",
        ]
    return out


def dp_cost_section(payload: dict[str, Any], source: str) -> list[str]:
    """Markdown of the DP step's time and memory over the non-private step."""
    env = payload["environment"]
    out = [
        "### DP cost per meta-training step",
        "",
        f"From `bench/results/{source}` ({env['device_name']}, {env['torch_threads']} threads, "
        f"{env['date']}): 8 episodes of 3-way 5-shot 5-query, Conv-4 on 64x64, same episodes.",
        "",
    ]
    out += _table(
        [
            "meta-learner",
            "non-private s",
            "DP s",
            "time ratio",
            "non-private MiB",
            "DP MiB",
            "memory ratio",
        ],
        [
            [
                r["learner"],
                f"{r['non-private_seconds']:.3f}",
                f"{r['dp_seconds']:.3f}",
                f"{r['time_ratio']:.2f}x",
                f"{r['non-private_peak_extra_mib']:.0f}",
                f"{r['dp_peak_extra_mib']:.0f}",
                f"{r['memory_ratio']:.2f}x",
            ]
            for r in payload["results"]["rows"]
        ],
    )
    return out


def mia_section(payload: dict[str, Any], source: str) -> list[str]:
    """Markdown of the membership-inference audit."""
    config, env = payload["config"], payload["environment"]
    out = [
        "### Membership-inference audit",
        "",
        f"From `bench/results/{source}` ({env['device_name']}, {env['date']}): synthetic pool of "
        f"{config['pool']} records (half members), {config['steps']} training steps, "
        f"{config['shadows']} shadow models for LiRA. TPR is at the lowest reachable FPR "
        "(<= 1%; with this pool that is FPR 0).",
        "",
    ]
    out += _table(
        ["epsilon", "attack", "AUC", "TPR at low FPR"],
        [
            [str(r["epsilon"]), r["attack"], f"{r['auc']:.3f}", f"{r['tpr_at_low_fpr']:.3f}"]
            for r in payload["results"]["rows"]
        ],
    )
    return out


def steps_section(folder: Path) -> list[str]:
    """Markdown of ProtoNet accuracy against training length (cross_domain.json runs)."""
    runs: dict[int, list[dict[str, Any]]] = {}
    sources = [folder / "cross_domain.json", *sorted((folder / "protonet_steps").glob("*.json"))]
    for path in sources:
        if path.is_file():
            payload = json.loads(path.read_text())
            steps = payload["config"]["steps"]["protonet"]
            runs.setdefault(steps, []).extend(payload["results"]["rows"])
    if len(runs) < 2:
        return []
    baseline = runs[min(runs)]
    folds = sorted({r["fold"] for r in baseline})
    out = [
        "### ProtoNet against training length",
        "",
        "3-way 5-shot accuracy % on each held-out modality (prototype adaptation, 600 episodes), "
        "from `cross_domain.json` and `protonet_steps/*.json` (runs cut off by their time limit "
        "before writing their JSON are missing, `-`):",
        "",
    ]

    def cell(rows: list[dict[str, Any]], method: str, fold: str) -> str:
        hit = [
            r
            for r in rows
            if r["method"] == method
            and r["fold"] == fold
            and r["variant"] == "all"
            and r["ways"] == 3
            and r["shots"] == 5
        ]
        return _pct(hit[0]["accuracy"], hit[0]["ci95"]) if hit else "-"

    table = [["pixel-centroid", *(cell(baseline, "pixel-centroid", f) for f in folds)]]
    for steps in sorted(runs):
        for method in ("protonet+prototype", "protonet+finetune"):
            table.append(
                [f"{method}, {steps} steps", *(cell(runs[steps], method, f) for f in folds)]
            )
    return out + _table(["method", *folds], table)


def render(folder: Path = RESULTS) -> str:
    """The markdown of every result present in ``folder``."""
    parts: list[str] = [*render_encoder(folder), "", *render_levers(folder)]
    for source in ("cross_domain.json", "cross_domain_quick.json"):
        if (folder / source).is_file():
            parts += cross_domain_section(json.loads((folder / source).read_text()), source)
            break
    parts += ["", *steps_section(folder)]
    for path in sorted(folder.glob("throughput*.json")):  # one per machine measured
        parts += ["", *throughput_section(json.loads(path.read_text()), path.name)]
    if (folder / "dp_epsilon.json").is_file():
        payload = json.loads((folder / "dp_epsilon.json").read_text())
        parts += ["", *dp_epsilon_section(payload, "dp_epsilon.json")]
    if (folder / "mia_audit.json").is_file():
        parts += [
            "",
            *mia_section(json.loads((folder / "mia_audit.json").read_text()), "mia_audit.json"),
        ]
    if (folder / "dp_cost.json").is_file():
        parts += [
            "",
            *dp_cost_section(json.loads((folder / "dp_cost.json").read_text()), "dp_cost.json"),
        ]
    parts += render_federation(folder)
    parts += render_calibration(folder)
    if not parts:
        parts = ["No benchmark results yet: run the scripts in bench/ (see bench/README.md)."]
    return "\n".join(parts).strip() + "\n"


def _replace_between(path: Path, start: str, end: str, markdown: str) -> bool:
    """Put ``markdown`` between the markers of ``path``; False when it has none."""
    text = path.read_text() if path.is_file() else ""
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{markdown}{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> None:
    """Rewrite bench/README.md's results and README.md's summary, or print them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--print", action="store_true", help="print the markdown, change nothing")
    args = p.parse_args(argv)
    full = render()
    summary = "\n".join(render_summary(RESULTS)) + "\n"
    federated = "\n".join(render_federated_encoder_summary(RESULTS)) + "\n"
    if args.print:
        print(summary + "\n" + full)
        return
    for path, start, end, markdown in (
        (BENCH_README, START, END, full),
        (README, SUMMARY_START, SUMMARY_END, summary),
        (README, FEDERATED_START, FEDERATED_END, federated),
    ):
        done = _replace_between(path, start, end, markdown)
        name = path.relative_to(REPO)
        print(f"rewrote {name}" if done else f"{name} has no {start} markers")


if __name__ == "__main__":
    main()
