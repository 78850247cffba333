"""The compression core: sessions, lifecycle, events and state. Never imports lightning."""

from lightning_compress.core.events import Event, EventType
from lightning_compress.core.helpers import log_model_info, model_sparsity, should_log_model_info
from lightning_compress.core.lifecycle import CompressionLifecycle
from lightning_compress.core.logger import BaseLogger, LoggerManager, LoguruLogger
from lightning_compress.core.model_layer import (
    ModelParameterizedLayer,
    get_layers_params,
    match_named_modules,
)
from lightning_compress.core.session import CompressionSession
from lightning_compress.core.session_functions import (
    LifecycleCallbacks,
    active_session,
    create_session,
    reset_session,
)
from lightning_compress.core.state import Data, Hardware, ModifiedState, State
from lightning_compress.core.verbosity import set_verbosity, verbosity

__all__ = [
    "BaseLogger",
    "CompressionLifecycle",
    "CompressionSession",
    "Data",
    "Event",
    "EventType",
    "Hardware",
    "LifecycleCallbacks",
    "LoggerManager",
    "LoguruLogger",
    "ModelParameterizedLayer",
    "ModifiedState",
    "State",
    "active_session",
    "create_session",
    "get_layers_params",
    "log_model_info",
    "match_named_modules",
    "model_sparsity",
    "reset_session",
    "set_verbosity",
    "should_log_model_info",
    "verbosity",
]
