"""Files shipped inside the package: the real Qwen3 tokenizer (vocab, merges, config)."""

from importlib import resources
from pathlib import Path


def tokenizer_dir() -> Path:
    """The vendored real Qwen3 tokenizer files shipped inside the package."""
    return Path(str(resources.files("qguard_stream") / "assets" / "qwen3_tokenizer"))
