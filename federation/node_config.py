"""A hospital node's own configuration: its data, ledger, registry, budget cap and DP policy.

It comes from the SuperNode's ``--node-config`` (kebab-case keys), optionally naming a TOML file
(``config-file``) whose ``[node]`` table holds the same keys; keys given on the command line win.
The cap and the policy are the node's: nothing the server sends can change them.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.errors import NodeConfigError
from federation.secure_aggregation import SecurePolicy
from models.run_config import key_of, read_fields, required_names
from privacy.mechanisms import DEFAULT_MECHANISM, MECHANISMS

CONFIG_FILE_KEY = "config-file"

OWNER = "node config"  # what this configuration is called in its error messages
_LISTS = ("allowed_mechanisms",)  # list fields; --node-config gives them as "a,b"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a hospital node decides for itself."""

    site_id: str  # public name of the site, shown in reports
    data: Path  # .npz, image folder or CSV manifest of this site's training images
    ledger: Path  # the site's privacy ledger (created with the cap below on first use)
    registry: Path  # local registry: global versions received, clinicians' adapters
    budget_epsilon: float  # total epsilon cap of the site; the server cannot raise it
    budget_delta: float  # delta of every epsilon on the ledger
    min_noise: float = 0.8  # smallest accounted sigma accepted: below it one round spends a lot
    max_steps_per_round: int = 100  # bounds the spend of any single round
    max_sample_rate: float = 0.2  # larger q means each patient is in more steps
    weight: float = 1.0  # public aggregation weight (p_k), agreed with the federation
    accountant: str = "rdp"  # accountant for a new ledger (the ledger then keeps its own)
    state_dir: Path | None = None  # replies kept for replay; default beside the ledger
    # The SuperNode's private key (`fedfew node init`): signs the ledger head sent with every
    # reply. Optional: without it the node still works and its heads are recorded as unsigned.
    node_key: Path | None = None
    # DP mechanisms (privacy.mechanisms) this site runs: an explicit allow-list, so a mechanism
    # added to the code later stays off until the site's administrator allows it.
    allowed_mechanisms: tuple[str, ...] = (DEFAULT_MECHANISM,)
    # Secure aggregation (federation.secure_aggregation.SecurePolicy): "allowed" runs rounds with
    # or without it; "required" refuses to send a delta unmasked; "forbidden" refuses SecAgg+.
    secure_aggregation: str = SecurePolicy.ALLOWED.value

    def __post_init__(self) -> None:
        if not self.site_id.strip():
            raise NodeConfigError("node config: site-id must not be empty")
        positive = {
            "budget-epsilon": self.budget_epsilon,
            "min-noise": self.min_noise,
            "max-steps-per-round": self.max_steps_per_round,
            "weight": self.weight,
        }
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise NodeConfigError(f"node config: {key} must be a number > 0, got {value!r}")
        if not 0 < self.budget_delta < 1:
            raise NodeConfigError(
                f"node config: budget-delta must be in (0, 1), got {self.budget_delta!r}"
            )
        unknown = [m for m in self.allowed_mechanisms if m not in MECHANISMS]
        if unknown or not self.allowed_mechanisms:
            raise NodeConfigError(
                f"node config: allowed-mechanisms {list(self.allowed_mechanisms)!r} must name one "
                f"or more of {', '.join(sorted(MECHANISMS))} (comma-separated)"
            )
        if self.secure_aggregation not in {p.value for p in SecurePolicy}:
            raise NodeConfigError(
                f"node config: secure-aggregation must be one of "
                f"{', '.join(p.value for p in SecurePolicy)}, got {self.secure_aggregation!r}"
            )
        if not 0 < self.max_sample_rate <= 1:
            raise NodeConfigError(
                f"node config: max-sample-rate must be in (0, 1], got {self.max_sample_rate!r}"
            )

    @property
    def replies_dir(self) -> Path:
        """Where replies are kept so a resent round is answered without a second charge."""
        return self._state / "replies"

    @property
    def features_dir(self) -> Path:
        """Where the site's features under a frozen encoder are kept (never sent)."""
        return self._state / "features"

    @property
    def _state(self) -> Path:
        return self.state_dir or self.ledger.parent / f"{self.ledger.stem}-state"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodeConfig:
        """Build from kebab-case keys (``--node-config`` and/or the TOML file it names).

        Raises:
            NodeConfigError: unreadable file, unknown or missing key, or a bad value; the message
                names the key and what to do.
        """
        merged: dict[str, Any] = {}
        if CONFIG_FILE_KEY in values:
            merged.update(_read_toml(Path(str(values[CONFIG_FILE_KEY]))))
        merged.update({k: v for k, v in values.items() if k != CONFIG_FILE_KEY})
        missing = [key_of(n) for n in required_names(cls) if key_of(n) not in merged]
        if missing:
            raise NodeConfigError(
                f"{OWNER}: missing {', '.join(missing)}; set them with --node-config "
                f"or in the TOML file named by {CONFIG_FILE_KEY} (see `fedfew node init`)"
            )
        for name in _LISTS:  # --node-config gives a list as one comma-separated string
            value = merged.get(key_of(name))
            if isinstance(value, str):
                merged[key_of(name)] = [v.strip() for v in value.split(",") if v.strip()]
        return cls(**read_fields(cls, merged, owner=OWNER, error=NodeConfigError))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        table = tomllib.loads(path.read_text()).get("node", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise NodeConfigError(f"node config file {path} is unreadable: {exc}") from exc
    if not isinstance(table, dict):
        raise NodeConfigError(f"node config file {path}: [node] must be a table")
    return table
