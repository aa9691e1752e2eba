"""qguard_stream: Qwen3Guard-Stream as a token-streaming guardrail.

Public API: StreamGuard (load, open/moderate/rollback/close sessions, the model card's
stream_moderate_from_ids), StreamState, Verdicts, GuardConfig, TextStreamGuard (text deltas from
any LLM).
"""

from qguard_stream.cache import SessionCache
from qguard_stream.config import ConfigError, GuardConfig
from qguard_stream.integrations.text import TextStreamGuard
from qguard_stream.loader import CheckpointError
from qguard_stream.stream import (
    ConversationVerdict,
    StreamClosedError,
    StreamGuard,
    StreamState,
    Verdicts,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConversationVerdict",
    "GuardConfig",
    "SessionCache",
    "StreamClosedError",
    "StreamGuard",
    "StreamState",
    "TextStreamGuard",
    "Verdicts",
    "__version__",
]
