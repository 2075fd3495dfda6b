"""`fedfew demo`: a real federated DP run of three hospitals on this machine.

It makes each hospital's data (the embedded synthetic set, or sets given with ``--data``), a CA,
a server certificate and node keys; starts a SuperLink and one SuperNode per hospital on
127.0.0.1 with TLS and node authentication; runs this project's ServerApp and ClientApp with
``flwr run``; and reports each site's epsilon (from its own ledger) and the published model's
few-shot accuracy on classes no site trained on. Every process it started is stopped at the end,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from federation.demo_sites import DEMO_MIXES, DEMO_SITES, split_by_patient, split_evenly, write_site
from federation.deploy.flower_project import RunResult, write_app_project
from federation.deploy.local_deployment import LocalFederation, SiteSpec
from federation.deploy.server_provisioning import CLIENT_APP, SERVER_APP
from federation.errors import DeploymentError
from federation.rounds import STATUS_FILE
from federation.server_config import ServerConfig
from federation.within_class_strategy import ADAPTER as WITHIN_CLASS_ADAPTER
from models.pipeline import PipelineConfig
from models.public_start import save_public_start
from models.registry import Registry, RegistryEntry
from models.run_config import flatten_tables
from models.synthetic import DEMO_TRAIN_CLASSES, public_set, synthetic_arrays
from privacy.errors import ReportFormatError
from privacy.ledger import Ledger
from privacy.mechanisms import MECHANISMS, describe
from privacy.round_record import FederationStatus, RoundRecord

MARKER = ".fedfew-demo"  # a folder holding it was made by the demo and may be replaced by it


RUN_CONFIG = Path(__file__).with_name("demo_run.toml")  # the demo federation's run config
# Under --secure-aggregation: SecAgg+ carries deltas, so a delta mechanism (docs/demo.md).
SECURE_RUN_CONFIG = Path(__file__).with_name("demo_run_secure.toml")


def demo_run_config(*, secure: bool = False) -> ServerConfig:
    """The demo federation's run config (``app/demo_run.toml``, or ``app/demo_run_secure.toml``
    when ``secure``), read strictly.

    Raises:
        ValueError: the file holds an unknown or mistyped key (naming it).
    """
    with (SECURE_RUN_CONFIG if secure else RUN_CONFIG).open("rb") as file:
        return ServerConfig.from_run_config(flatten_tables(tomllib.load(file)))


@dataclass(frozen=True)
class DemoSettings:
    """The demo's federation (its run config file) and its hospitals' data and caps."""

    run: ServerConfig = dataclasses.field(default_factory=demo_run_config)
    # About 800 patients per hospital: a DP release's signal grows with the patients and its
    # noise does not (150 gave +4.9 to +5.3 at epsilon 7.45, 300 +6 to +7:
    # bench/results/demo_within_class*.json); a hospital embeds its 1,600 images once.
    images_per_class: int = 300
    budget_epsilon: float = 8.0  # each hospital's cap
    budget_delta: float = 1e-5
    timeout: float = 900.0  # the whole `flwr run`

    def with_changes(
        self, *, rounds: int | None = None, steps: int | None = None, side: int | None = None
    ) -> DemoSettings:
        """These settings with the command line's changes (``None``: the file's value)."""
        changes = {"num-rounds": rounds, "steps": steps, "backbone.image-size": side}
        given = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, run=self.run.with_values(given))


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced."""

    workdir: Path
    run: RunResult
    model: RegistryEntry
    start: RegistryEntry  # round 0: the public start, evaluated like every round
    site_epsilon: dict[str, float]
    site_cap: dict[str, float]
    superlink: str = ""  # HOST:PORT the SuperLink listened on (for the dashboard's check)
    # The rounds as the server recorded them (its status file's history, round 0 first).
    rounds: tuple[RoundRecord, ...] = ()
    mechanism: str = ""  # the registered DP mechanism the rounds ran ("": not recorded)


def set_classes(paths: Iterable[Path]) -> str:
    """The class names of the given sets, in first-seen order, as a run config's vocabulary."""
    names: dict[str, None] = {}
    for path in paths:
        with np.load(path) as loaded:
            names.update({str(c): None for c in loaded["classes"]})
    return ",".join(names)


def prepare_workdir(workdir: Path) -> Path:
    """An empty work folder: a previous demo's folder is replaced, anything else is refused.

    Raises:
        DeploymentError: ``workdir`` exists, is not empty and was not made by the demo.
    """
    workdir = workdir.absolute()
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise DeploymentError(
                f"{workdir} exists and was not made by `fedfew demo`; give another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by fedfew demo; replaced by the next demo run\n")
    return workdir


def site_data(
    workdir: Path,
    data: Sequence[Path] | None,
    *,
    images_per_class: int = DemoSettings.images_per_class,
) -> dict[str, Path]:
    """Each hospital's training set: the synthetic demo split (``images_per_class`` of each
    training class, two per patient), one given set per hospital, or one given set split by
    patient across the three hospitals."""
    if not data:
        arrays = synthetic_arrays(n_classes=DEMO_TRAIN_CLASSES, per_class=images_per_class, seed=0)
        parts = split_by_patient(arrays, DEMO_MIXES)
    elif len(data) == 1:
        with np.load(data[0]) as loaded:
            parts = split_evenly({k: loaded[k] for k in loaded.files}, len(DEMO_SITES))
    else:
        return {f"hospital-{i + 1}": Path(p).absolute() for i, p in enumerate(data)}
    return {
        name: write_site(workdir / name / "data.npz", part)
        for name, part in zip(DEMO_SITES, parts, strict=True)
    }


def site_spec(workdir: Path, site: str, data: Path, settings: DemoSettings) -> SiteSpec:
    """What `fedfew node init` is given for a hospital: its data, its cap, and its state folder
    `WORKDIR/<site>/` (ledger.db, registry/, logs/)."""
    return SiteSpec(
        data=data,
        budget_epsilon=settings.budget_epsilon,
        budget_delta=settings.budget_delta,
        state_dir=workdir / site,
        policy={"allowed-mechanisms": settings.run.mechanism},
    )


def public_start(workdir: Path, settings: DemoSettings, echo: Callable[[str], None]) -> Path:
    """The operator's step: write the public start, ImageNet EfficientNet-Lite0 from its installed
    wheel, frozen, with the adapter at identity (nothing is trained, no hospital data is used).

    Returns:
        The model directory the federation starts from (``WORKDIR/public-start``).
    """
    backbone = settings.run.backbone
    public = None
    if backbone.adapter == WITHIN_CLASS_ADAPTER:
        side = PipelineConfig(image_size=backbone.image_size)
        public = public_set(config=side, modality="inverted").images
    echo(
        "operator's step (not private, no hospital data): the public start is ImageNet "
        f"EfficientNet-Lite0 from its installed wheel, frozen, at {backbone.image_size} px, "
        f"with a '{backbone.adapter}' adapter (nothing is trained here"
        + (
            "; its public basis comes from public images of another modality)"
            if public is not None
            else ")"
        )
    )
    return save_public_start(workdir / "public-start", backbone=backbone, public_images=public)


def server_config(
    workdir: Path,
    sites: int,
    settings: DemoSettings,
    eval_data: str,
    initial_model: Path | None = None,
    *,
    secure_aggregation: bool = False,
) -> ServerConfig:
    """The demo's run config with this run's own values: its work folder, ``sites`` nodes (all
    must connect; one may fail), ``initial_model`` (else a random start), the evaluation set and
    ``secure_aggregation`` (SecAgg+ rounds, docs/privacy.md "Secure aggregation")."""
    run = settings.run
    return dataclasses.replace(
        run,
        min_nodes=sites,
        min_replies=max(1, sites - 1),
        initial_model=str(initial_model or ""),
        workdir=str(workdir / "server"),
        eval=dataclasses.replace(run.eval, data=eval_data),
        secagg=dataclasses.replace(run.secagg, enabled=secure_aggregation),
    )


def run_demo(
    workdir: Path,
    *,
    data: Sequence[Path] | None = None,
    eval_data: str = "synthetic",
    settings: DemoSettings = DemoSettings(),
    echo: Callable[[str], None] = print,
    secure_aggregation: bool = False,
) -> DemoResult:
    """Run the whole demo; see the module docstring.

    Raises:
        DeploymentError: a process failed to start or the run failed (its reason is given).
    """
    workdir = prepare_workdir(workdir)
    what = "synthetic data (not real patients)" if not data else "the given sets"
    echo(f"preparing {len(data) if data and len(data) > 1 else 3} hospitals with {what}...")
    sites = site_data(workdir, data, images_per_class=settings.images_per_class)
    if data and settings.run.dp.classes:  # the given sets' classes are the release's vocabulary
        settings = dataclasses.replace(
            settings, run=settings.run.with_values({"dp.classes": set_classes(sites.values())})
        )
    start = public_start(workdir, settings, echo)
    config = server_config(
        workdir, len(sites), settings, eval_data, start, secure_aggregation=secure_aggregation
    )
    app_dir = workdir / "flower-app"
    write_app_project(app_dir, serverapp=SERVER_APP, clientapp=CLIENT_APP, config=config.to_dict())
    specs = {name: site_spec(workdir, name, path, settings) for name, path in sites.items()}
    echo(
        "provisioning as the runbook does (`fedfew server init`, `fedfew node init`), then "
        "starting a SuperLink and one SuperNode per hospital on 127.0.0.1 (TLS, node keys)..."
    )
    # All hospitals share this machine's cores: one torch thread pool each would oversubscribe.
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(specs)))}
    deployment = LocalFederation(
        workdir / "deployment", sites=specs, env=threads, federation=config.federation
    )
    with deployment as federation:
        echo(
            f"SuperLink on 127.0.0.1:{federation.port}; nodes registered and connected: "
            + ", ".join(f"{n} (id {i})" for n, i in federation.node_ids.items())
        )
        secure = " under secure aggregation (SecAgg+)" if secure_aggregation else ""
        echo(
            f"running {config.num_rounds} rounds of {describe(config.mechanism)}{secure} with "
            "`flwr run` (each hospital embeds its images once)..."
        )
        run = _run_with_progress(federation, app_dir, config, settings.timeout, echo)
        superlink = f"127.0.0.1:{federation.port}"
    run.check()
    registry = Registry.open(config.root / "registry")
    ledgers = {
        name: Ledger.open(node_file.node.ledger)
        for name, node_file in deployment.node_files.items()
    }
    return DemoResult(
        workdir=workdir,
        run=run,
        model=registry.latest(),
        start=registry.entries(kind="global")[0],
        site_epsilon={name: ledger.epsilon_spent() for name, ledger in ledgers.items()},
        site_cap={name: ledger.cap_epsilon for name, ledger in ledgers.items()},
        superlink=superlink,
        rounds=_read_rounds(config.root / STATUS_FILE),
        mechanism=config.mechanism,
    )


def _run_with_progress(
    federation: LocalFederation,
    app_dir: Path,
    config: ServerConfig,
    timeout: float,
    echo: Callable[[str], None],
) -> RunResult:
    """`flwr run` in a thread while the server's status file is followed for round lines."""
    outcome: dict[str, RunResult | BaseException] = {}

    def target() -> None:
        try:
            outcome["run"] = federation.run(app_dir, timeout=timeout)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="flwr-run", daemon=True)
    thread.start()
    shown = 0
    status = config.root / STATUS_FILE
    while thread.is_alive():
        thread.join(timeout=2.0)
        rounds = _read_rounds(status)
        for record in rounds[shown:]:
            echo(_round_line(record, config.num_rounds))
        shown = max(shown, len(rounds))
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    run = outcome.get("run")
    if not isinstance(run, RunResult):
        raise DeploymentError("flwr run ended without a result")
    return run


def _read_rounds(path: Path) -> tuple[RoundRecord, ...]:
    try:
        return FederationStatus.read(path).rounds
    except (OSError, ReportFormatError):
        return ()  # not written yet (or being replaced): the next poll reads it


def _round_line(record: RoundRecord, total: int) -> str:
    accuracy = {k: v for k, v in record.metrics.items() if k.startswith("accuracy-")}
    spent = ", ".join(
        f"{site} eps {report.epsilon_spent:.2f}" for site, report in sorted(record.sites.items())
    )
    shown = ", ".join(f"{k.removeprefix('accuracy-')} {100 * v:.1f}%" for k, v in accuracy.items())
    if record.round == 0:
        return f"  public start (round 0): {shown}"
    return f"  round {record.round}/{total} ({record.seconds:.0f} s): {shown}; {spent}"


def summary(result: DemoResult) -> list[str]:
    """The lines the demo prints at the end."""
    output = _output_word(result.mechanism)
    lines = [f"published global model {result.model.label} in {result.model.path.parent}"]
    for site, epsilon in sorted(result.site_epsilon.items()):
        cap = result.site_cap[site]
        lines.append(f"  {site}: epsilon spent {epsilon:.2f} of its cap {cap:g} (delta 1e-5)")
    for key, value in sorted(result.model.metrics.items()):
        if key.startswith("accuracy-"):
            ci = result.model.metrics.get(key.replace("accuracy-", "ci95-"), 0.0)
            start = result.start.metrics.get(key, float("nan"))
            lines.append(
                f"  few-shot accuracy on unseen classes, {key.removeprefix('accuracy-')}: "
                f"{100 * value:.1f}% +/- {100 * ci:.1f} (public start {100 * start:.1f}%, "
                f"DP rounds {100 * (value - start):+.1f} points)"
            )
    lines.append(secure_aggregation_line(result.rounds, output=output))
    lines.append(f"federated run took {result.run.wall_s:.0f} s; every process is stopped")
    return lines


def _output_word(mechanism: str) -> str:
    """What a hospital's reply is under ``mechanism``: a DP release or a DP update (a model
    delta; also when the mechanism is not recorded or no longer registered)."""
    found = MECHANISMS.get(mechanism)
    return "DP release" if found is not None and found.releases_arrays else "DP update"


def secure_aggregation_line(rounds: Sequence[RoundRecord], *, output: str = "DP update") -> str:
    """Whether the rounds ran under secure aggregation, as the server recorded each round (a
    SecAgg+ round's record holds what the gate found in its unmasked sum); ``output``: what a
    hospital's reply is (``DP update`` or ``DP release``)."""
    trained = [r for r in rounds if r.round > 0]
    secure = [r.secure_aggregation for r in trained if r.secure_aggregation is not None]
    if not secure:
        return (
            f"secure aggregation: off; the server saw each hospital's {output} in all "
            f"{len(trained)} rounds"
        )
    contributors = sorted({s.contributors for s in secure})
    return (
        f"secure aggregation (SecAgg+): {len(secure)} of {len(trained)} rounds ran under it; "
        f"the server saw only the sum of {' or '.join(map(str, contributors))} hospitals' "
        f"{output.removeprefix('DP ')}s, never one hospital's {output.removeprefix('DP ')}"
    )


def dashboard_command(result: DemoResult) -> str:
    """The command that opens one hospital's dashboard on what the demo left behind."""
    hospital = next(iter(sorted(result.site_epsilon)))
    superlink = f"--superlink {result.superlink} " if result.superlink else ""
    return (
        "open the dashboard of a hospital: fedfew dashboard "
        f"--registry {result.workdir / hospital / 'registry'} "
        f"--ledger {result.workdir / hospital / 'ledger.db'} "
        f"--federation-status {result.workdir / 'server' / STATUS_FILE} "
        f"{superlink}(create a user first: fedfew users add --role clinician)"
    )
