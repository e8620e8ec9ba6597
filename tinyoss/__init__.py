"""tinyoss: a small, readable CPU runtime for OpenAI's gpt-oss models."""

from .config import Config
from .errors import TinyossError
from .generate import chat  # tinyoss.generate stays the module; its generator is generate.generate
from .model import KVCache
from .runtime import Model, load
from .recorder import Recording, record
from .sampling import Sampler

__all__ = ["Config", "KVCache", "Model", "Recording", "Sampler", "TinyossError", "chat", "load",
           "record"]
__version__ = "0.1.0"
