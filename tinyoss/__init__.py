"""tinyoss: a small, readable CPU runtime for OpenAI's gpt-oss models."""

from .config import Config
from .errors import TinyossError
from .generate import chat, generate
from .model import KVCache, Model, load
from .sampling import Sampler

__all__ = ["Config", "KVCache", "Model", "Sampler", "TinyossError", "chat", "generate", "load"]
__version__ = "0.1.0"
