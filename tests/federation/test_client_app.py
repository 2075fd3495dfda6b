"""The ClientApp handler with hand-built Messages and Contexts (real ledger, data and training)."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from federation.client_app import train
from federation.errors import NodeConfigError
from federation.node_config import NodeConfig
from federation.records import (
    DELTA,
    REPORT,
    from_arrays,
    from_config,
)
from models.registry import Registry
from privacy.ledger import Ledger
from privacy.ledger_head import verify_signature
from privacy.site_report import SitePrivacyReport

from .conftest import context, make_site, message, write_key


def test_a_round_charges_the_ledger_keeps_the_model_and_replies_with_accounted_values_only(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a")
    reply = train(message(global_state, server_config.round_plan(1)), context(site))
    assert not reply.has_error()
    report = SitePrivacyReport.from_dict(from_config(reply.content.config_records[REPORT]))
    ledger = Ledger.open(site["ledger"])
    (entry,) = ledger.entries()
    assert entry.kind == "charge" and entry.round == 1 and entry.steps == server_config.steps
    assert report.epsilon_spent == pytest.approx(ledger.epsilon_spent())
    assert (report.head_hash, report.head_entries) == (ledger.head_hash(), 1)
    assert not report.signed  # no node-key configured
    delta = from_arrays(reply.content.array_records[DELTA])
    assert set(delta) == set(global_state) and any(np.any(v != 0) for v in delta.values())
    (kept,) = Registry.open(site["registry"]).entries(kind="global")
    assert kept.info["round"] == 0


def test_the_same_round_asked_again_is_replayed_without_a_second_charge(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a")
    msg = message(global_state, server_config.round_plan(1))
    first = train(msg, context(site))
    again = train(msg, context(site))
    assert SitePrivacyReport.from_dict(from_config(again.content.config_records[REPORT])).replayed
    for name, value in from_arrays(first.content.array_records[DELTA]).items():
        np.testing.assert_array_equal(from_arrays(again.content.array_records[DELTA])[name], value)
    assert len(Ledger.open(site["ledger"]).entries()) == 1


def test_a_plan_over_budget_is_refused_and_nothing_is_computed(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a", cap=0.5)
    reply = train(message(global_state, server_config.round_plan(1)), context(site))
    assert reply.has_error() and reply.error.reason == "budget-exhausted"
    (entry,) = Ledger.open(site["ledger"]).entries()
    assert entry.kind == "refusal"
    config = NodeConfig.from_mapping(site)
    assert not list(config.replies_dir.rglob("*.safetensors"))
    assert not (tmp_path / "a" / "registry").exists()


def test_a_plan_below_the_node_minimum_noise_is_refused_before_the_ledger(
    tmp_path, server_config, global_state
):
    site = {**make_site(tmp_path, "a"), "min-noise": 5.0}
    reply = train(message(global_state, server_config.round_plan(1)), context(site))
    assert reply.has_error() and reply.error.reason == "policy-refused"
    assert not (tmp_path / "a" / "ledger.db").exists()


def test_a_model_that_does_not_fit_the_plan_is_an_error_reply(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a")
    plan = server_config.round_plan(1)
    plan = dataclasses.replace(plan, backbone=dataclasses.replace(plan.backbone, width=16))
    reply = train(message(global_state, plan), context(site))
    assert reply.has_error() and reply.error.reason == "model-mismatch"


def test_missing_node_config_keys_are_named(tmp_path):
    with pytest.raises(NodeConfigError, match="missing data, ledger"):
        NodeConfig.from_mapping(
            {"site-id": "a", "registry": "r", "budget-epsilon": 1, "budget-delta": 1e-5}
        )


def test_node_config_file_is_read_and_command_line_keys_win(tmp_path):
    site = make_site(tmp_path, "a")
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in site.items()]
    (tmp_path / "node.toml").write_text("[node]\n" + "\n".join(lines).replace("'", '"') + "\n")
    config = NodeConfig.from_mapping({"config-file": str(tmp_path / "node.toml"), "weight": 2})
    assert config.site_id == "a" and config.weight == 2.0 and config.budget_epsilon == 8.0
    with pytest.raises(NodeConfigError, match="unknown key"):
        NodeConfig.from_mapping({**site, "budget-epsilonn": 3})


def test_an_existing_ledger_with_another_cap_is_a_config_error(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a")
    train(message(global_state, server_config.round_plan(1)), context(site))
    reply = train(
        message(global_state, server_config.round_plan(2)),
        context({**site, "budget-epsilon": 20.0}),
    )
    assert reply.has_error() and reply.error.reason == "node-misconfigured"


def test_concurrent_attempts_of_one_round_release_one_output_for_one_charge(
    tmp_path, server_config, global_state
):
    site = make_site(tmp_path, "a")
    msg = message(global_state, server_config.round_plan(1))
    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.map(lambda _: train(msg, context(site)), range(2))
    assert not first.has_error(), first.error.reason
    assert not second.has_error(), second.error.reason
    deltas = [from_arrays(r.content.array_records[DELTA]) for r in (first, second)]
    for name in deltas[0]:
        np.testing.assert_array_equal(deltas[0][name], deltas[1][name])
    assert [e.kind for e in Ledger.open(site["ledger"]).entries()] == ["charge"]


def test_a_node_with_a_key_signs_the_ledger_head_it_sends(tmp_path, server_config, global_state):
    key = write_key(tmp_path / "node-key")
    site = {**make_site(tmp_path, "a"), "node-key": str(key)}
    reply = train(message(global_state, server_config.round_plan(1)), context(site))
    report = SitePrivacyReport.from_dict(from_config(reply.content.config_records[REPORT]))
    assert report.signed and report.head_entries == 1
    verify_signature(report.head, (tmp_path / "node-key.pub").read_text())
