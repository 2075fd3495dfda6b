"""The DP mechanism registry: names, sensitivities, configs, errors."""

import numpy as np
import pytest

from privacy.dp_config import (
    EPISODIC_SENSITIVITY,
    PROTOTYPE_SENSITIVITY,
    SUPERVISED_SENSITIVITY,
    WITHIN_CLASS_SENSITIVITY,
    DPConfig,
    DPPretrainConfig,
    DPPrototypeConfig,
)
from privacy.errors import UnknownMechanismError
from privacy.mechanisms import (
    DISTRIBUTED,
    EPISODIC,
    MECHANISMS,
    OUTPUT_DELTA,
    OUTPUT_RELEASE,
    PROTOTYPES,
    SUPERVISED,
    WITHIN_CLASS,
    Mechanism,
    describe,
    get_mechanism,
    register_mechanism,
)


def test_registry_holds_every_mechanism_with_its_sensitivity():
    """All of them, without importing federation/: a privacy administrator's `fedfew budget`
    must name every mechanism a ledger row can hold."""
    assert {name: m.sensitivity for name, m in MECHANISMS.items()} == {
        EPISODIC: EPISODIC_SENSITIVITY,
        SUPERVISED: SUPERVISED_SENSITIVITY,
        DISTRIBUTED: EPISODIC_SENSITIVITY,  # the share per site is in its ledger row
        PROTOTYPES: PROTOTYPE_SENSITIVITY,
        WITHIN_CLASS: WITHIN_CLASS_SENSITIVITY,
    }
    assert pytest.approx(2**0.5) == PROTOTYPE_SENSITIVITY
    assert get_mechanism(PROTOTYPES).accounted_noise_multiplier(2**0.5) == pytest.approx(1.0)
    assert (EPISODIC_SENSITIVITY, SUPERVISED_SENSITIVITY) == (2.0, 1.0)
    assert get_mechanism(EPISODIC).accounted_noise_multiplier(3.0) == 1.5
    assert get_mechanism(SUPERVISED).noise_for(1.5) == 1.5


def test_each_mechanism_builds_its_own_config_from_shared_values():
    values = {"noise_multiplier": 2.0, "max_grad_norm": 0.5, "ways": 4, "expected_patients": 9}

    episodic = get_mechanism(EPISODIC).dp_config(values)
    supervised = get_mechanism(SUPERVISED).dp_config(values)

    assert episodic == DPConfig(noise_multiplier=2.0, max_grad_norm=0.5, ways=4)
    assert supervised == DPPretrainConfig(
        noise_multiplier=2.0, max_grad_norm=0.5, expected_patients=9
    )
    prototypes = get_mechanism(PROTOTYPES).dp_config({**values, "classes": ("a", "b")})
    assert prototypes == DPPrototypeConfig(
        noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=1.0, classes=("a", "b")
    )
    with pytest.raises(TypeError, match="takes a DPPretrainConfig"):
        get_mechanism(SUPERVISED).check_config(episodic)


def test_unknown_name_is_a_typed_error_listing_the_registered_ones():
    listed = "dp-episodic, dp-episodic-distributed, dp-prototypes, dp-supervised"
    with pytest.raises(UnknownMechanismError, match=listed):
        get_mechanism("dp-magic")
    assert "not a mechanism of this version" in describe("dp-episodic-protonet-federated")
    assert "2C" in describe(EPISODIC) and "per-patient" in describe(SUPERVISED)


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_mechanism(
            Mechanism(
                name=EPISODIC,
                sensitivity=1.0,
                config_type=DPConfig,
                build_trainer=MECHANISMS[EPISODIC].build_trainer,
                description="an impostor",
            )
        )
    assert MECHANISMS[EPISODIC].sensitivity == 2.0
    with pytest.raises(TypeError):
        MECHANISMS[EPISODIC] = MECHANISMS[SUPERVISED]  # type: ignore[index]  # read-only view


def test_a_mechanism_says_what_leaves_the_node_and_makes_it():
    start = {"w": np.zeros(3, np.float32)}
    model = {"w": np.array([1.0, 2.0, 3.0], np.float64)}
    episodic, prototypes = get_mechanism(EPISODIC), get_mechanism(PROTOTYPES)
    assert (episodic.output, prototypes.output) == (OUTPUT_DELTA, OUTPUT_RELEASE)
    delta = episodic.reply_arrays(None, model=model, start=start)
    assert delta["w"].dtype == np.float32 and delta["w"].tolist() == [1.0, 2.0, 3.0]
    sums = {"sums": np.ones((2, 3), np.float32)}
    assert prototypes.reply_arrays(sums, model=model, start=start)["sums"].shape == (2, 3)
    with pytest.raises(TypeError, match="must return its release as numpy arrays"):
        prototypes.reply_arrays([1.0], model=model, start=start)
