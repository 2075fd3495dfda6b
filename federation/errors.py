"""Typed errors of the federation layer. Messages say what was wrong, with which value, and what
to do about it."""

from __future__ import annotations

from models.errors import FedfewError


class FederationError(FedfewError):
    """Base class of every federation error."""


class NodeConfigError(FederationError, ValueError):
    """A hospital node's configuration is missing a field or holds an invalid value."""


class PlanRefusedError(FederationError):
    """A node refuses a round's DP plan (policy or budget); nothing was computed."""


class PlanInvalidError(PlanRefusedError):
    """A round's message lacks the model or the plan, or the plan is malformed."""


class BudgetRefusedError(PlanRefusedError):
    """The node's ledger refuses the round: it would take the site past its cap."""


class ModelMismatchError(FederationError):
    """The global model the server sent does not fit the network the plan names."""


class SiteDataError(FederationError):
    """The node's own training data cannot be read or used (details stay in the node's log)."""


class InvalidUpdateError(FederationError):
    """A node's reply failed the validation gate (names, shapes, dtypes, finiteness, norm)."""


class QuorumError(FederationError):
    """Too few valid replies arrived within the deadline, after every retry."""


class CheckpointError(FederationError):
    """A server checkpoint is unreadable or belongs to another federation."""


class CertificateError(FederationError):
    """A TLS certificate or key is missing, malformed, expired or not signed by the CA."""


class DeploymentError(FederationError):
    """A SuperLink, SuperNode or `flwr run` process failed to start or finish."""


class NodeRefusedError(FederationError):
    """The SuperLink refused a SuperNode (e.g. its key is not registered)."""


class ProvisioningError(FederationError, ValueError):
    """A deployment file (`server.toml`, `node.toml`) is missing, malformed or names a missing
    file, or an argument of `fedfew server|node init` is invalid."""
