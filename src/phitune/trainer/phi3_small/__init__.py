"""Phi-3-small (``model_type`` ``phi3small``) in plain PyTorch: config, model, tokenizer and chat template, loading
the published checkpoint layout unchanged, with no remote code and no Triton.

:func:`register` makes transformers' ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` load such a
folder with these classes; importing this package calls it, and the trainer calls it before loading any base.
Importing this package imports torch and transformers: the SDK reaches it only through the trainer.
"""

from __future__ import annotations

import functools

from .config import Phi3SmallConfig
from .modeling import Phi3SmallForCausalLM, Phi3SmallModel
from .tokenizer import CHAT_TEMPLATE, Phi3SmallTokenizer

MODEL_TYPE = "phi3small"
ARCHITECTURE = "Phi3SmallForCausalLM"

__all__ = [
    "ARCHITECTURE",
    "CHAT_TEMPLATE",
    "MODEL_TYPE",
    "Phi3SmallConfig",
    "Phi3SmallForCausalLM",
    "Phi3SmallModel",
    "Phi3SmallTokenizer",
    "register",
]


@functools.cache
def register() -> None:
    """Register Phi-3-small's classes with transformers' auto classes (once per process)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register(MODEL_TYPE, Phi3SmallConfig, exist_ok=True)
    AutoModel.register(Phi3SmallConfig, Phi3SmallModel, exist_ok=True)
    AutoModelForCausalLM.register(Phi3SmallConfig, Phi3SmallForCausalLM, exist_ok=True)
    AutoTokenizer.register(Phi3SmallConfig, slow_tokenizer_class=Phi3SmallTokenizer, exist_ok=True)


register()
