"""tinyoss: a small, readable CPU runtime for OpenAI's gpt-oss models."""

from .config import Config
from .errors import TinyossError
from .model import KVCache, Model, load

__all__ = ["Config", "KVCache", "Model", "TinyossError", "load"]
__version__ = "0.1.0"
