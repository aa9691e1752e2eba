"""qguard_stream: Qwen3Guard-Stream as a token-streaming guardrail.

Public API: StreamGuard (load, open/moderate/rollback/close sessions, the model card's
stream_moderate_from_ids), StreamState, Verdicts, GuardConfig; decision policies
(consecutive_unsafe, ConsecutiveUnsafe, ProbabilityThreshold) and callbacks (Hooks, attach).
Integrations (watch / awatch iterators, transformers generate(), CARE) live in
qguard_stream.integrations and are reached via guard.watch / guard.awatch or imported from there.
GenGuard (Qwen3Guard-Gen moderation by greedy generation) with GenVerdict / parse_gen_output.
TextStreamGuard feeds text deltas from any LLM.
"""

import importlib.util
import sys
from pathlib import Path


def _attach_source_tree_kernels() -> None:
    """Make `qguard_stream.kernels` importable when running from a checkout.

    Installed, setuptools maps the top-level kernels/ folder to `qguard_stream.kernels`
    (package-dir). From a source tree (PYTHONPATH=repo root) nothing does, so register that folder
    under the same dotted name. No top-level `kernels` module is ever made importable: that name
    belongs to Hugging Face's `kernels` package, which transformers probes for.
    """
    name = f"{__name__}.kernels"
    source = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if importlib.util.find_spec(name) is not None or not source.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(source.parent)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sys.modules[__name__].kernels = module


_attach_source_tree_kernels()

from qguard_stream.config import ConfigError, GuardConfig
from qguard_stream.conversation import ConversationVerdict
from qguard_stream.gen.guard import GenGuard
from qguard_stream.gen.parse import GenVerdict, parse_gen_output
from qguard_stream.hooks import FlagEvent, Hooks, Monitor, TransitionEvent, attach
from qguard_stream.integrations.text import TextStreamGuard
from qguard_stream.integrations.watch import FlaggedError
from qguard_stream.kvcache.paged import PoolExhaustedError
from qguard_stream.loader import CheckpointError
from qguard_stream.policy import (
    ConsecutiveUnsafe,
    Decision,
    Policy,
    ProbabilityThreshold,
    TokenVerdict,
    consecutive_unsafe,
)
from qguard_stream.stream import StreamGuard, StreamState
from qguard_stream.verdicts import (
    ForeignSessionError,
    NonFiniteScoresError,
    StreamClosedError,
    Verdicts,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConsecutiveUnsafe",
    "ConversationVerdict",
    "Decision",
    "FlagEvent",
    "FlaggedError",
    "ForeignSessionError",
    "GenGuard",
    "GenVerdict",
    "GuardConfig",
    "Hooks",
    "Monitor",
    "NonFiniteScoresError",
    "Policy",
    "PoolExhaustedError",
    "ProbabilityThreshold",
    "StreamClosedError",
    "StreamGuard",
    "StreamState",
    "TextStreamGuard",
    "TokenVerdict",
    "TransitionEvent",
    "Verdicts",
    "__version__",
    "attach",
    "consecutive_unsafe",
    "parse_gen_output",
]
