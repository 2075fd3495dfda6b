"""Clinician or IT: prepare a model version for a new modality from this hospital's unlabelled
studies; the result is a local version that the Adapt page offers."""

import streamlit as st

from app.dashboard import adapters, archive_view, domain_prep, ui, views
from app.dashboard.auth import ROLE_CLINICIAN, ROLE_IT
from app.dashboard.errors import SourceError
from app.dashboard.jobs import Job
from models.domain import DOMAIN_METHODS, DomainConfig, default_method
from models.errors import FedfewError, RegistryError
from models.pipeline import PipelineConfig

PREPARED_KEY = "prepare_published"  # label of the version published in this session
JOB_KEY = views.PREPARE_JOB_KEY
NOTICE_KEY = "prepare_notice"  # (cancelled?, message) of a run that published nothing
CASES_KEY = "prepare_cases"  # the case-shelf slot of studies pulled or uploaded here
IN_PAGE_WAIT_S = 1.5  # a training run longer than this gets a progress bar and Cancel

session = ui.require_role(ROLE_CLINICIAN, ROLE_IT)
config = ui.settings()
st.title("Prepare for a new modality")
ui.intended_use_notice()
st.caption(
    "Point at studies of the new kind (no labels needed) on this hospital's disk. The model "
    f"learns what they look like; the result is a new model version, {domain_prep.LOCAL_ONLY}. "
    "No privacy budget is spent: nothing leaves this machine."
)

try:
    models = adapters.base_models(config.registry, local=False, public=False)
except RegistryError:
    models = []
if not models:
    st.warning(
        f"No model yet: this node's registry (`{config.registry}`) holds no global model to "
        "prepare. Wait for the federation to deliver one, or run `fedfew demo`."
    )
    st.stop()

by_id = {e.id: e for e in models}
FROM_FOLDER = "A folder or file on this machine"
FROM_CASES = "Studies from the image archive or uploaded here"
kinds = [FROM_FOLDER, FROM_CASES]
kind = st.radio("Where the studies are", kinds, key="prepare_kind", horizontal=True)
source_text = ""
studies: list = []
if kind == FROM_FOLDER:
    source_text = st.text_input(
        "Studies (folder, CSV manifest or .npz)",
        key="prepare_source",
        placeholder="/data/archive/new-modality",
        help="A folder (searched with its subfolders), a CSV with a `path` column, or an .npz "
        "image set. Labels in the files are never read.",
    )
    if config.data_roots:
        st.caption("Allowed folders: " + ", ".join(f"`{r}`" for r in config.data_roots))
    else:
        st.caption(
            "No folder is open to this dashboard: IT names them (`fedfew dashboard --data-root "
            "DIR`). Take the studies from the image archive instead."
        )
else:
    archive_view.archive_panel(
        config.dicomweb,
        key="prepare_archive",
        targets={"the studies to prepare from": CASES_KEY},
        pull_all=True,
    )
    shown = views.case_uploader(
        "Studies (no labels needed)",
        key=CASES_KEY,
        pipeline=PipelineConfig(image_size=views.THUMB_PX),  # thumbnails only, here
    )
    studies = views.case_shelf().all_uploads().get(CASES_KEY, [])
    st.caption(f"{len(shown.cases)} readable studies; labels in them are never read.")
base_id = st.selectbox(
    "Base model",
    list(by_id),
    format_func=lambda v: domain_prep.version_label(by_id[v]),
    key="prepare_base",
    help="The federated model version to prepare, newest first.",
)
methods = list(DOMAIN_METHODS)
try:  # a frozen base (the public encoder) has nothing to train: its default is statistics
    default = default_method(views.base_model(str(config.registry), base_id).model)
except FedfewError:
    default = DomainConfig.method  # the run itself reports the damaged version
method = st.radio(
    "Preparation",
    methods,
    index=methods.index(default),
    format_func=lambda m: domain_prep.METHOD_HELP.get(m, m),
    key="prepare_method",
)
minutes = st.number_input(
    "Time budget (minutes)",
    min_value=0.5,
    max_value=120.0,
    value=float(DomainConfig.minutes),
    step=0.5,
    key="prepare_minutes",
    help="Training stops after this time (about 5 minutes for 1,000 studies on 2 cores). "
    "The statistics preparation takes seconds whatever the budget.",
)


def finish(job: Job[domain_prep.Prepared]) -> None:
    """Take a finished run's result, or say why there is none."""
    st.session_state.pop(JOB_KEY, None)
    prepared = job.result
    if prepared is None:
        st.session_state[NOTICE_KEY] = (
            job.cancelled,
            "Preparation cancelled: nothing was published." if job.cancelled else job.error,
        )
        return
    skipped = f"; {prepared.skipped} unreadable files left out" if prepared.skipped else ""
    st.session_state[PREPARED_KEY] = (
        f"Published {domain_prep.version_label(prepared.entry)} ({prepared.images} studies"
        f"{skipped}). Choose it as the base model on the Adapt page."
    )


job: Job[domain_prep.Prepared] | None = st.session_state.get(JOB_KEY)
if job is not None and not job.running:
    finish(job)
    job = None
if st.button("Prepare", type="primary", key="prepare_run", disabled=job is not None):
    st.session_state.pop(PREPARED_KEY, None)
    st.session_state.pop(NOTICE_KEY, None)
    try:
        if kind == FROM_FOLDER:
            source: object = domain_prep.resolve_source(source_text, roots=config.data_roots)
        elif studies:
            source = domain_prep.studies_from_cases(
                list(studies), source=f"{len(studies)} studies from the archive or uploads"
            )
        else:
            raise SourceError("pull studies from the archive or upload them first")
    except FedfewError as exc:
        ui.show_error(exc)
    else:
        chosen = DomainConfig(method=method, minutes=float(minutes))

        def work(progress: views.ProgressFn) -> domain_prep.Prepared:
            return domain_prep.prepare_model(
                config.registry,
                base_version=base_id,
                source=source,  # type: ignore[arg-type]
                config=chosen,
                author=session.username,
                on_progress=progress,
            )

        job = st.session_state[JOB_KEY] = Job(work, what=f"preparation ({method})")
        # The statistics take seconds: the page waits for them.
        if job.wait(None if method == "statistics" else IN_PAGE_WAIT_S):
            finish(job)
            job = None
if job is not None:
    views.job_progress(job, cancel_key="prepare_cancel")
if NOTICE_KEY in st.session_state:
    cancelled, text = st.session_state[NOTICE_KEY]
    (st.info if cancelled else ui.show_error)(text)
if st.session_state.get(PREPARED_KEY):
    st.success(st.session_state[PREPARED_KEY])

rows = domain_prep.local_rows(config.registry)
if rows:
    st.subheader("Local versions on this node")
    st.dataframe(rows, hide_index=True, key="prepare_local_versions")
