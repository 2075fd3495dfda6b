"""Markdown sections of the federation benchmarks (used by bench/report.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.report_federated_encoder import federated_encoder_section
from models.calibration import wilson_interval
from privacy.accounting import epsilon_for
from privacy.mechanisms import EPISODIC, SUPERVISED, get_mechanism


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# Earlier federation-cost runs kept beside the current one (bench/federation_cost.py plots them).
_COST_RUNS = {
    "federation_cost_3s_poll.json": (
        " (the demo's settings, before the server pulled replies every 0.25 s: Flower's 3 s poll)"
    ),
    "federation_cost_240_per_class.json": (
        " (the demo's settings before its hospitals grew: 32 episodes per step of up to 5 "
        "records per class and role, 240 images per class)"
    ),
    "federation_cost_before.json": (
        " (before the lazy imports; the demo's settings then: 8 episodes per step, q 0.1, "
        "40 images per class, random start, DP on all parameters)"
    ),
    "federation_cost_old_settings.json": (
        " (after the lazy imports, the demo's settings before its DP recipe changed: "
        "8 episodes per step, q 0.1, 40 images per class; random start, DP on norm-affine)"
    ),
}


def federation_cost_section(payload: dict[str, Any], source: str) -> list[str]:
    """Round time split into node compute and framework overhead, bytes per node."""
    env, results = payload["environment"], payload["results"]
    imports = ", ".join(f"{t:.1f}" for t in results["cold_import_s"])
    when = _COST_RUNS.get(source, "")
    out = [
        f"### Federation cost (real SuperLink and 3 SuperNodes over TLS){when}",
        "",
        f"From `bench/results/{source}` ({env['cpu_count']} CPU cores, one torch thread per node, "
        f"{env['date']}). Overhead = round time minus the slowest node's own compute (a fresh "
        f"`flwr-clientapp` process per message importing torch, Opacus and MONAI: {imports} s "
        "cold here; serialisation; transport).",
        "",
    ]
    rows = []
    for r in results["rounds"]:
        sent = r["bytes_sent_per_node"] / 2**20
        received = sum(r["bytes_received"].values()) / len(r["bytes_received"]) / 2**20
        rows.append(
            [
                r["setting"],
                str(r["round"]),
                f"{r['round_s']:.1f}",
                f"{r['slowest_node_s']:.1f}",
                f"{r['overhead_s']:.1f}",
                f"{100 * r['overhead_fraction']:.0f}%",
                f"{sent:.2f} / {received:.2f}",
            ]
        )
    header = ["setting", "round", "round s", "slowest node s", "overhead s", "overhead",
              "MiB per node down / up"]  # fmt: skip
    return [
        *out,
        *_table(header, rows),
        "",
        *([] if when else ["", "![federation cost](bench/results/federation_cost.png)"]),
    ]


def federated_accuracy_section(payload: dict[str, Any], source: str) -> list[str]:
    """Federated DP accuracy vs epsilon against central training on pooled data."""
    config, env = payload["config"], payload["environment"]
    rows = payload["results"]
    keys = sorted(k for k in rows[0] if k.startswith("accuracy-"))
    out = [
        "### Federated DP accuracy vs epsilon, against central training",
        "",
        f"From `bench/results/{source}` ({env['date']}): 3 hospitals (synthetic, different class "
        f"mixes), {config['rounds']} rounds x {config['local_steps']} DP steps per site, Conv-4 "
        f"width {config['width']}; central = the same data pooled, as many steps as all sites "
        f"together. Accuracy on 8 unseen classes, {config['eval_episodes']} episodes, 95% CI.",
        "",
    ]
    table = []
    for r in rows:
        eps = "inf" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        if r["method"] == "random-init":
            eps = "-"
        cells = [f"{100 * r[k]:.1f} ± {100 * r[k.replace('accuracy-', 'ci95-')]:.1f}" for k in keys]
        table.append([r["method"], eps, *cells])
    header = ["model", "epsilon", *(k.removeprefix("accuracy-") for k in keys)]
    plot = "![federated accuracy](bench/results/federated_accuracy.png)"
    return [*out, *_table(header, table), "", plot]


def simulation_section(payload: dict[str, Any], source: str) -> list[str]:
    """Virtual hospitals per machine with Flower's simulation engine."""
    r, env = payload["results"], payload["environment"]
    return [
        "### Simulation scale (Flower simulation engine, Ray)",
        "",
        f"From `bench/results/{source}` ({env['date']}): {r['hospitals']} virtual hospitals on "
        f"{r['cpu_count']} CPU cores, {r['rounds']} rounds of the production ServerApp and "
        f"ClientApp handler: {r['wall_s']:.0f} s wall ({r['wall_per_round_s']:.0f} s per round), "
        f"peak resident memory of the whole process tree {r['peak_rss_mib']:.0f} MiB, "
        f"{r['ledgers_written']} site ledgers charged.",
        "",
        "![simulation scale](bench/results/simulation_scale.png)",
    ]


def reply_latency_section(payload: dict[str, Any], source: str) -> list[str]:
    """Seconds per exchange through Flower's grid and through the ServerApp's PollingGrid."""
    config, env, summary = payload["config"], payload["environment"], payload["results"]["summary"]
    names = {"flower": "Flower's grid (pulls every 3 s)", "polling": "PollingGrid (every 0.25 s)"}
    table = [
        [names[g], str(summary[g]["n"]), f"{summary[g]['mean']:.2f} ± {summary[g]['ci95']:.2f}",
         f"{summary[g]['median']:.2f}"]
        for g in ("flower", "polling")
    ]  # fmt: skip
    saved = summary["saved"]
    return [
        "### Reply latency: Flower's grid against PollingGrid",
        "",
        f"From `bench/results/{source}` ({env['cpu_count']} CPU cores, {env['date']}): a real "
        f"SuperLink and {config['nodes']} SuperNodes over TLS; every node answers a query at "
        "once, so an exchange's seconds are the framework's (the SuperNode's pull, a fresh "
        "ClientApp process, the reply's push, the server's pull). The two grids alternate in the "
        f"same run, {config['exchanges']} exchanges each. Mean ± 95% CI.",
        "",
        *_table(["grid", "exchanges", "seconds (mean)", "median"], table),
        "",
        f"Saved per exchange (paired): {saved['mean']:.2f} ± {saved['ci95']:.2f} s.",
        "",
        "![reply latency](bench/results/reply_latency.png)",
    ]


def startup_section(payload: dict[str, Any], source: str) -> list[str]:
    """Start-up seconds of the CLI and of a ClientApp, before and after the lazy imports."""
    results, env = payload["results"], payload["environment"]
    labels = [label for label in ("before", "after") if label in results]
    cases = {label: {c["case"]: c for c in results[label]["cases"]} for label in labels}
    table = []
    for name in cases[labels[-1]]:
        cells = []
        for label in labels:
            case = cases[label].get(name)
            if case is None or (label == "before" and name == "client_app_message_imports"):
                cells.append("-" if case is None else "(in the start)")
            else:
                cells.append(f"{case['median_s']:.2f}")
        latest = cases[labels[-1]][name]
        heavy = ", ".join(latest["imports"]) or "none"
        table.append([f"`{' '.join(latest['argv'][:4])}`" if name != "client_app_message_imports"
                      else "imports a message needs (node, mechanisms, DP trainer)",
                      *cells, heavy])  # fmt: skip
    commits = ", ".join(f"{label} {results[label]['commit']}" for label in labels)
    return [
        "### Start-up cost of the CLI and of a ClientApp",
        "",
        f"From `bench/results/{source}` ({env['date']}; {commits}): median seconds of "
        f"{results[labels[-1]]['repeats']} fresh processes on this 2-core machine while other "
        "jobs loaded it. Flower starts one `flwr-clientapp` process per message, so the "
        "ClientApp's start is paid every round.",
        "",
        *_table(["what", *(f"{label} (s)" for label in labels), "heavy modules loaded"], table),
        "",
        "![start-up cost](bench/results/startup_cost.png)",
    ]


def _recipe_epsilon(row: dict[str, Any], rounds: int) -> float | None:
    """Epsilon per site (delta 1e-5, RDP) that a sweep row's DP steps spend; None if non-private."""
    names = {"episodic": EPISODIC, "supervised": SUPERVISED}
    if row["mechanism"] not in names:
        return None
    sigma = get_mechanism(names[row["mechanism"]]).accounted_noise_multiplier(row["sigma"])
    return epsilon_for([(sigma, row["q"], row["steps"] * rounds)], delta=1e-5, accountant="rdp")


def _averaging(row: dict[str, Any]) -> str:
    a = row.get("averaging") or {"mode": "none"}
    return f"ema {a['decay']:g}" if a["mode"] == "ema" else a["mode"]


def _gain(row: dict[str, Any], key: str) -> str:
    """A paired gain in points with its 95% CI, or the plain difference of the means."""
    gain = row.get(key)
    if key == "gain_vs_start" and gain is None:
        return f"{100 * (row['accuracy_by_round'][-1] - row['accuracy_by_round'][0]):+.1f}"
    return "-" if gain is None else f"{100 * gain['mean']:+.1f} ± {100 * gain['ci95']:.1f}"


def dp_recipe_section(payload: dict[str, Any], source: str) -> list[str]:
    """Accuracy by round of each DP recipe on the demo's hospitals, from one public start."""
    config, env, rows = payload["config"], payload["environment"], payload["results"]
    rounds = len(rows[0]["accuracy_by_round"]) - 1
    averaged = any(_averaging(r) != "none" for r in rows)
    sized = any("per_class" in r for r in rows)  # rows differ in data size and episode caps
    table = []
    for r in rows:
        private = r["mechanism"] != "nonprivate"
        epsilon = _recipe_epsilon(r, rounds)
        table.append([
            r["mechanism"], r["subset"], f"{r['q']:g}" if private else "-",
            f"{r['sigma']:g}" if private else "none", str(r["episodes"]) if private else "-",
            str(r["steps"]),
            *([str(r["per_class"]), str(r["caps"])] if sized else []),
            "inf" if epsilon is None else (f"{epsilon:.2f}" if epsilon < 1000 else "huge"),
            f"{r['lr']:g}", *([_averaging(r)] if averaged else []),
            *([str(r.get("seed", 0))] if averaged or sized else []),
            *(f"{100 * a:.1f}" for a in r["accuracy_by_round"]),
            _gain(r, "gain_vs_start"), *([_gain(r, "gain_vs_baseline")] if averaged else []),
        ])  # fmt: skip
    header = ["mechanism", "trains", "q", "sigma", "episodes", "steps"]
    header += ["images per class", "records per class and role"] if sized else []
    header += ["epsilon", "lr"] + (["averaging"] if averaged else [])
    header += ["seed"] if averaged or sized else []
    header += ["round 0"] + [f"round {i}" for i in range(1, rounds + 1)] + ["gain"]
    header += ["vs last iterate"] if averaged else []
    modality = config.get("public_modality", "same")
    note = (
        " `averaging`: what each site's local steps leave in its model (the last iterate, an "
        "exponential moving average of the iterates, or the mean of the last half; "
        "post-processing, no privacy cost); `gain` and `vs last iterate` (the same seed's "
        "`none` row) are paired over the 100 episodes at the last round, with 95% CIs that "
        "cover the evaluation episodes, not the training's randomness."
        if averaged
        else ""
    )
    if sized:
        note += (
            " `images per class`: the size of the hospitals' data (2 images per patient); "
            "`records per class and role`: the support and query records an episode keeps per "
            "class (every episode is padded to it); `seed`: the training seed."
        )
    size = "the row's" if sized else config["per_class"]
    topics = [f"{modality} modality"]
    topics += ["averaging each site's local iterates"] if averaged else []
    topics += ["hospitals of different sizes"] if sized else []
    return [
        f"### DP recipes on the demo's hospitals, from a public start ({', '.join(topics)})",
        "",
        f"From `bench/results/{source}` ({env['date']}): three synthetic hospitals "
        f"({size} images per class, 2 per patient), a Conv-4 (width "
        f"{config['width']}) public start from {config['public_steps']} ProtoNet steps on the 8 "
        f"public classes imaged in the {modality} modality, then {rounds} FedAvg rounds of each "
        "recipe (`steps`: local steps per site per round); 5-way 5-shot accuracy % on "
        "the 8 unseen classes, the same 100 episodes for every cell (95% CI about +/- 2 points). "
        "sigma is as applied to C; epsilon is per site at delta 1e-5; sigma 0.001 or 0.01 is "
        "clipping and sampling without meaningful noise." + note,
        "",
        *_table(header, table),
    ]


def _multiplicity(config: dict[str, Any]) -> str:
    k = int(config.get("augmentations", 1))
    return f", {k} augmented copies per record" if k > 1 else ""


def federated_real_section(payload: dict[str, Any], source: str) -> list[str]:
    """Three hospitals on one real modality from a public start: DP against the baselines."""
    config, env, rows = payload["config"], payload["environment"], payload["results"]
    table = []
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:g}"
        if r["method"] == "federated-nonprivate":
            eps = "inf"
        cell = f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}"
        table.append([r["method"], r["trainable"] or "-", eps, cell])
    return [
        "### Federated DP on real images, from a public start",
        "",
        f"From `bench/results/{source}` ({env['date']}): `{config['modality']}` split by patient "
        "into three hospitals and a held-out quarter; public start = Conv-4 (width "
        f"{config['width']}) with {config['pretrain_steps']} supervised steps on the other four "
        f"modalities; {config['rounds']} rounds x {config['local_steps']} local steps per site, "
        f"q {config['sample_rate']:g}, Adam lr 0.001 "
        f"({', '.join(config.get('mechanisms', ['dp-episodic']))}"
        f"{_multiplicity(config)}; central DP: the three parts "
        f"pooled, as many steps as all sites together). {config['ways']}-way 5-shot accuracy % "
        f"on the held-out patients, the same {config['episodes']} episodes for every row, 95% CI."
        + (f" Note: {config['note']}." if config.get("note") else ""),
        "",
        *_table(["model", "DP touches", "epsilon per site", "accuracy"], table),
    ]


def secure_aggregation_section(payload: dict[str, Any], source: str) -> list[str]:
    """SecAgg+ against plain rounds: time and bytes; distributed against per-site noise."""
    env, results = payload["environment"], payload["results"]
    table = [
        [str(r["hospitals"]), r["mode"], f"{r['round_s']:.2f}",
         f"{r['bytes_from_node'] / 1024:.0f}", f"{r['bytes_to_node'] / 1024:.0f}"]
        for r in results["summary"]
    ]  # fmt: skip
    accuracy = []
    for r in results.get("accuracy", []):
        before, after = r["before"], r["after"]
        accuracy.append([
            r["mode"], f"{r['sigma_per_site']:.2f}", f"{r['sigma_of_the_sum']:.2f}",
            f"{r['epsilon_per_site_if_secagg_holds']:.2f}",
            f"{r['epsilon_per_site_if_secagg_fails']:.2f}",
            f"{100 * before['accuracy-5way-5shot']:.1f}",
            f"{100 * after['accuracy-5way-5shot']:.1f} ± {100 * after['ci95-5way-5shot']:.1f}",
        ])  # fmt: skip
    lines = [
        "### Secure aggregation (SecAgg+): cost, and distributed noise",
        "",
        f"From `bench/results/{source}` ({env['date']}): one round in process with the "
        "production client and server paths (Conv-4 width 32), mean of "
        f"{results['summary'][0]['repeats']} repeats, 1 thread; KiB per node and direction.",
        "",
        *_table(["hospitals", "mode", "round s", "KiB from node", "KiB to node"], table),
    ]
    if accuracy:
        lines += [
            "",
            "Distributed noise (each site adds sigma/sqrt(k), the sum carries sigma) against "
            "per-site noise at the same per-site epsilon if secure aggregation holds; 3 sites, "
            f"{results['accuracy'][0]['rounds']} one-step rounds, 5-way 5-shot % on the unseen "
            "synthetic classes (95% CI), one seed.",
            "",
            *_table(
                [
                    "noise",
                    "sigma per site",
                    "sigma of the sum",
                    "eps if SecAgg holds",
                    "eps if it fails",
                    "before",
                    "after",
                ],
                accuracy,
            ),
        ]
    return lines


def _auc_ci95(auc: float, members: int, others: int) -> float:
    """Half-width of the 95% CI of a ROC AUC (Hanley and McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (members - 1) * (q1 - auc * auc)
           + (others - 1) * (q2 - auc * auc)) / (members * others)  # fmt: skip
    return 1.96 * math.sqrt(max(var, 0.0))


def mia_federated_section(payload: dict[str, Any], source: str) -> list[str]:
    """Membership inference against federated models that learned, with and without DP."""
    config, env, rows = payload["config"], payload["environment"], payload["results"]
    # The public start calibrated against itself scores 0 for everyone (older runs wrote it).
    rows = [r for r in rows if not (r["method"] == "public-start" and r["attack"] == "calibrated")]
    table = []
    for r in rows:
        eps = "inf" if r["method"] == "federated-nonprivate" else "-"
        eps = eps if r["epsilon"] is None else f"{r['epsilon']:g}"
        tpr = wilson_interval(round(r["tpr_at_low_fpr"] * r["members"]), r["members"])
        table.append([
            r["method"], eps, f"{100 * r['accuracy']:.1f}", r["attack"],
            f"{r['auc']:.3f} ± {_auc_ci95(r['auc'], r['members'], r['non_members']):.3f}",
            f"{100 * r['tpr_at_low_fpr']:.1f} ({100 * tpr.low:.1f}-{100 * tpr.high:.1f})",
        ])  # fmt: skip
    first = rows[0]
    members = (
        f"all {first['members']} patients of the three sites"
        if config.get("members") == "all-sites"
        else f"{first['members']} of hospital 1's patients"
    )
    return [
        "### Membership inference against federated models that learned",
        "",
        f"From `bench/results/{source}` ({env['date']}): the models of the "
        f"`{config['modality']}` federation above ({config['rounds']} rounds x "
        f"{config['local_steps']} local steps, q {config['sample_rate']:g}). Members: "
        f"{members}; non-members: {first['non_members']} "
        "held-out patients no site holds; the attacker's prototypes come from other held-out "
        "patients. One score per patient (`privacy.audit.record_scores`, averaged over the "
        "patient's images). `calibrated` subtracts the public start's score (difficulty "
        f"calibration, Watson et al. 2022). TPR at {100 * first['low_fpr']:.1f}% FPR, "
        "Wilson 95% interval; AUC ± 95% CI (Hanley-McNeil).",
        "",
        *_table(["model", "epsilon per site", "accuracy %", "attack", "AUC", "TPR %"], table),
    ]


_SHOTS_ALONE = ("local-5shot", "episode-5shot", "public-start")


def _pct(r: dict[str, Any]) -> str:
    return f"{100 * r['accuracy']:.1f} ± {100 * r['ci95']:.1f}"


def _above_or_below(difference: float) -> str:
    """``difference`` (a fraction) as "2.0 above" or "2.0 below", in points."""
    return f"{100 * abs(difference):.1f} {'above' if difference > 0 else 'below'}"


def dp_prototypes_section(payload: dict[str, Any], source: str) -> list[str]:
    """The one-shot DP prototype release against a site's own few shots (every class), or on
    federated_real's N-way episodes beside its rows (``--ways N``)."""
    config, env, rows = payload["config"], payload["environment"], payload["results"]
    alone = {"nonprivate-prototypes": "prototypes alone", "dp-prototypes": "prototypes alone"}
    once = {r["method"]: r for r in rows if r["method"] in _SHOTS_ALONE}
    rows = [r for r in rows if r["method"] not in _SHOTS_ALONE]
    releases = list(dict.fromkeys(r["release"] for r in rows))
    methods = list(dict.fromkeys(alone.get(r["method"], r["method"]) for r in rows))
    cells = {(r["release"], alone.get(r["method"], r["method"])): r for r in rows}

    def cell(release: str, method: str) -> str:
        r = cells.get((release, method))
        return "-" if r is None else _pct(r)

    def label(release: str) -> str:
        r = next(r for r in rows if r["release"] == release)
        eps = r["epsilon_per_site"]
        return "no noise" if eps is None else f"epsilon {eps:g} (sigma {r['sigma']:.2f})"

    table = [[label(rel), *(cell(rel, m) for m in methods)] for rel in releases]
    vocabulary, shots = len(config["classes"]), config["shots"]
    head = [
        f"From `bench/results/{source}` ({env['date']}): `{config['modality']}` split by patient "
        f"over three sites; each releases its patients' normalised class sums of the public "
        f"start's features once for all {vocabulary} classes (sensitivity sqrt(2) C, q 1, one "
        f"step); public start: {config['pretrain_steps']} supervised steps on the other four "
        "modalities.",
    ]
    if "public-start" not in once:  # every class, a site's own shots (its `ways` is unused)
        head.append(
            f"{vocabulary}-way, {shots} shots and {config['queries']} held-out queries per class, "
            f"{config['episodes']} episodes over {config['draws']} noise draws; nearest prototype "
            "by cosine after centring on the site's own mean. A site's own "
            f"{shots} shots alone: {_pct(once['local-5shot'])}. `blended`: its shots and the "
            "released prototype weighted equally; `blended-by-mass`: weighted by the released "
            "count. 95% CIs."
        )
        return [
            "### DP prototype release (`dp-prototypes`, one shot)",
            "",
            " ".join(head),
            "",
            *_table(["release (per site)", *methods], table),
        ]
    ways = config["ways"]
    same = (
        "the episodes `federated_real` scores for this modality: its public-start score "
        "recomputed here exactly"
        if config.get("episodes_as_federated_real")
        else "NOT `federated_real`'s episodes"
    )
    head.append(
        f"Scored on {config['episodes']} {ways}-way {shots}-shot {config['queries']}-query "
        f"episodes of the held-out patients ({same}), the episode's {ways} release rows, over "
        f"{config['draws']} noise draws; nearest prototype by cosine after centring on site 1's "
        f"mean feature. Shots alone: the public start as `federated_real` scores it (the "
        f"episode's {shots} shots, centred on the episode) {_pct(once['public-start'])}; the same "
        f"shots centred on site 1's mean {_pct(once['episode-5shot'])}; site 1's own {shots} "
        f"images {_pct(once['local-5shot'])}. `blended` (equal weight) and `blended-by-mass` "
        "(weighted by the released count) add the release to the episode's shots. 95% CIs."
    )
    out = [
        f"### DP prototype release (`dp-prototypes`, one shot): `{config['modality']}`, {ways}-way",
        "",
        " ".join(head),
        "",
        *_table(["release (per site)", *methods], table),
    ]
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in config.get("federated_real", []):
        key = (r["method"], r["trainable"], r["epsilon"], r["accuracy"])
        seen.setdefault(key, r)
    if seen:
        fed = [
            [r["method"], r["trainable"] or "-",
             "inf" if r["method"] == "federated-nonprivate"
             else ("-" if r["epsilon"] is None else f"{r['epsilon']:g}"),
             _pct(r), f"`{r['source']}`"]
            for r in seen.values()
        ]  # fmt: skip
        theirs = [r for r in seen.values() if r["method"] == "public-start"]
        mine = once["public-start"]["accuracy"]
        start = (
            "the same public start: its row reproduced exactly"
            if theirs and all(abs(r["accuracy"] - mine) < 1e-6 for r in theirs)
            else "public start NOT reproduced here: compare with care"
        )
        out += [
            "",
            f"The same modality's `federated_real` rows ({ways}-way 5-shot, the same held-out "
            f"patients; {start}). Federated models adapt with the episode's shots; the release "
            "rows use no labelled image (prototypes alone) or add the release to those shots:",
            "",
            *_table(["model", "DP touches", "epsilon per site", "accuracy", "from"], fed),
        ]
        nonprivate = [r for r in seen.values() if r["method"] == "federated-nonprivate"]
        top = max((r["epsilon_per_site"] or 0 for r in rows), default=0)
        if nonprivate and top:
            best = max(nonprivate, key=lambda r: r["accuracy"])
            gaps = [
                f"`{m}` {100 * (r['accuracy'] - mine):+.1f} points against the public start, "
                f"{_above_or_below(r['accuracy'] - best['accuracy'])} non-private federated "
                f"training ({best['trainable']})"
                for m in ("dp-prototypes", "blended", "blended-by-mass")
                for r in rows
                if r["method"] == m and r["epsilon_per_site"] == top
            ]
            out += [
                "",
                f"Issue 12's target at epsilon {top:g} (>= +3 points over the public start, "
                f"within 5 of non-private federated training): {'; '.join(gaps)}.",
            ]
    else:
        out += ["", f"No `federated_real` run on `{config['modality']}` at these settings yet."]
    return out


def render_federation(folder: Path) -> list[str]:
    """Every federation section whose JSON is in ``folder``."""
    sections = (
        ("federation_cost*.json", federation_cost_section),  # after, then before
        ("federated_accuracy.json", federated_accuracy_section),
        ("simulation_scale.json", simulation_section),
        ("startup_cost.json", startup_section),
        ("reply_latency.json", reply_latency_section),
        ("dp_recipe_sweep*.json", dp_recipe_section),
        ("federated_real*.json", federated_real_section),  # one table per mechanism run
        ("secure_aggregation.json", secure_aggregation_section),
        ("mia_federated*.json", mia_federated_section),
        ("dp_prototypes*.json", dp_prototypes_section),  # brain_mri 4-way, then per modality
        ("federated_encoder_*.json", federated_encoder_section),  # one table per modality
    )
    parts: list[str] = []
    for pattern, section in sections:
        for path in sorted(folder.glob(pattern)):
            parts += ["", *section(json.loads(path.read_text()), path.name)]
    return parts
