"""Egress of error replies: every failure becomes one fixed public reason code; the exception's
text stays in the node's own log; the server keeps the code only, whatever a reply carries."""

from __future__ import annotations

import json

import pytest
from flwr.app import Error, Message

from federation import client_app
from federation.client_app import failure_log_path, train
from federation.errors import (
    BudgetRefusedError,
    ModelMismatchError,
    NodeConfigError,
    PlanInvalidError,
    PlanRefusedError,
    SiteDataError,
)
from federation.inprocess_grid import InProcessGrid
from federation.node_config import NodeConfig
from federation.reasons import ERROR_CODES, ReasonCode, reason_of
from federation.strategies import strategy_for
from models.errors import DataError, UnreadableImageError
from privacy.errors import LedgerError, LedgerTamperedError

from .conftest import context, make_site, message

MARKER = "MARKER-patient-0042"

TYPED = [
    (BudgetRefusedError(f"{MARKER} over the cap"), ReasonCode.BUDGET_EXHAUSTED),
    (PlanRefusedError(f"{MARKER} noise too low"), ReasonCode.POLICY_REFUSED),
    (PlanInvalidError(f"{MARKER} plan is missing steps"), ReasonCode.PLAN_INVALID),
    (ModelMismatchError(f"{MARKER} shape [8] vs [16]"), ReasonCode.MODEL_MISMATCH),
    (SiteDataError(f"{MARKER}.png unreadable"), ReasonCode.DATA_UNREADABLE),
    (DataError(f"{MARKER}.csv lists 3 images of 1 class"), ReasonCode.DATA_UNREADABLE),
    (UnreadableImageError(f"{MARKER}.png", "truncated"), ReasonCode.DATA_UNREADABLE),
    (NodeConfigError(f"{MARKER} budget-epsilon"), ReasonCode.NODE_MISCONFIGURED),
    (LedgerTamperedError(3, MARKER), ReasonCode.LEDGER_UNUSABLE),
    (LedgerError(f"{MARKER} is not a ledger"), ReasonCode.LEDGER_UNUSABLE),
    # Not typed: bugs, library errors and out-of-memory are never refusals.
    (RuntimeError(f"{MARKER} CUDA out of memory"), ReasonCode.INTERNAL_ERROR),
    (MemoryError(MARKER), ReasonCode.INTERNAL_ERROR),
    (ValueError(f"{MARKER} could not broadcast (12,3) into (10,3)"), ReasonCode.INTERNAL_ERROR),
    (OSError(f"{MARKER}: disk full"), ReasonCode.INTERNAL_ERROR),
    (KeyError(MARKER), ReasonCode.INTERNAL_ERROR),
]


@pytest.mark.parametrize(("exc", "expected"), TYPED, ids=lambda v: type(v).__name__)
def test_each_error_replies_its_code_and_no_text(
    exc, expected, tmp_path, server_config, global_state, monkeypatch
):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(client_app, "run_round", fail)
    site = make_site(tmp_path, "a")
    reply = train(message(global_state, server_config.round_plan(1)), context(site))
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (ERROR_CODES[expected], expected.value)
    assert MARKER not in repr(reply.error)
    (logged,) = failure_log_path(NodeConfig.from_mapping(site)).read_text().splitlines()
    entry = json.loads(logged)
    assert entry["reason"] == expected.value and MARKER in entry["detail"] + entry["traceback"]


def test_reason_codes_are_distinct():
    assert len(set(ERROR_CODES.values())) == len(ReasonCode)
    assert len({r.value for r in ReasonCode}) == len(ReasonCode)


def test_an_unreadable_node_config_is_a_code_only(tmp_path, server_config, global_state):
    reply = train(message(global_state, server_config.round_plan(1)), context({"site-id": MARKER}))
    assert reply.error.reason == ReasonCode.NODE_MISCONFIGURED.value


def test_a_message_without_a_plan_is_plan_invalid(tmp_path, server_config, global_state):
    msg = message(global_state, server_config.round_plan(1))
    del msg.content.config_records["plan"]
    reply = train(msg, context(make_site(tmp_path, "a")))
    assert reply.error.reason == ReasonCode.PLAN_INVALID.value


def test_real_unreadable_patient_files_reply_data_unreadable_and_stay_in_the_node_log(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a")
    folder = tmp_path / f"{MARKER}-images"  # the path the detail names holds the marker
    folder.mkdir()
    for i in range(4):
        (folder / f"{MARKER}-{i}.png").write_bytes(b"\x89PNG not really")
    manifest = folder / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{MARKER}-{i}.png,c{i % 2}\n" for i in range(4)))
    site["data"] = str(manifest)
    reply = train(message(global_state, server_config.round_plan(1)), context(site))
    assert reply.error.reason == ReasonCode.DATA_UNREADABLE.value
    assert MARKER not in repr(reply.error)
    log = failure_log_path(NodeConfig.from_mapping(site)).read_text()
    assert MARKER in log


def test_the_server_keeps_the_code_only_whatever_text_a_reply_carries(server_config, global_state):
    leaked = Error(1001, f"<class 'ValueError'>:<'{MARKER}.png has shape (3, 7)'>")
    assert reason_of(leaked) is ReasonCode.UNRECOGNISED
    strategy = strategy_for(server_config, global_state)
    grid = InProcessGrid(
        {
            1: lambda m: Message(leaked, reply_to=m),
            2: lambda m: Message(Error(1001, "budget-exhausted"), reply_to=m),
        }
    )
    sent = list(strategy.configure_train(1, client_app.to_arrays(global_state), None, grid))
    replies = list(grid.send_and_receive(sent, timeout=5))
    accepted, problems = strategy.gate(replies)
    assert not accepted
    assert sorted(problems) == [
        "node 1 refused or failed: unrecognised",
        "node 2 refused or failed: budget-exhausted",
    ]
