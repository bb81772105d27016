"""The contract: protocols, value types, capabilities, errors, URLs, registry, serializers.

Nothing in ``conveyor.core`` imports a driver; importing it is cheap and always works.
"""

from __future__ import annotations

from conveyor.core.base import DEFAULT_RESULT_TTL, BrokerBase, ResultBackendBase, wait_for
from conveyor.core.capabilities import Capability
from conveyor.core.errors import (
    ConfigurationError,
    ConnectionLost,
    ContentDisallowed,
    ConveyorError,
    DecodeError,
    EncodeError,
    InvalidReceipt,
    InvalidURL,
    MissingDependency,
    OperationalError,
    OperationTimeout,
    QueueNotFound,
    SerializationError,
    TaskError,
    UnknownScheme,
    UnsupportedFeature,
)
from conveyor.core.protocols import (
    Broker,
    Counters,
    DeadLetters,
    ExpirySweep,
    Groups,
    LeaseExtension,
    QueueSize,
    ResultBackend,
    Wait,
)
from conveyor.core.registry import (
    Registry,
    broker_from_url,
    default_registry,
    result_backend_from_url,
)
from conveyor.core.types import Delivery, Envelope, GroupRecord, ResultRecord, State
from conveyor.core.urls import is_secret_key, mask_options, mask_text, mask_url

__all__ = [
    "DEFAULT_RESULT_TTL",
    "Broker",
    "BrokerBase",
    "Capability",
    "ConfigurationError",
    "ConnectionLost",
    "ContentDisallowed",
    "ConveyorError",
    "Counters",
    "DeadLetters",
    "DecodeError",
    "Delivery",
    "EncodeError",
    "Envelope",
    "ExpirySweep",
    "GroupRecord",
    "Groups",
    "InvalidReceipt",
    "InvalidURL",
    "LeaseExtension",
    "MissingDependency",
    "OperationTimeout",
    "OperationalError",
    "QueueNotFound",
    "QueueSize",
    "Registry",
    "ResultBackend",
    "ResultBackendBase",
    "ResultRecord",
    "SerializationError",
    "State",
    "TaskError",
    "UnknownScheme",
    "UnsupportedFeature",
    "Wait",
    "broker_from_url",
    "default_registry",
    "is_secret_key",
    "mask_options",
    "mask_text",
    "mask_url",
    "result_backend_from_url",
    "wait_for",
]
