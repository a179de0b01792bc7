"""Chat generation with ONNX Runtime GenAI: one loaded model per export folder, LoRA adapters switched per request.

An export folder (see :mod:`phitune.export`) holds ``model.onnx``, ``genai_config.json``, the tokenizer and the chat
template; a ``<name>.onnx_adapter`` beside a base built with LoRA inputs is an adapter that
``onnxruntime_genai.Adapters`` activates per generator, so several fine-tunes share one copy of the base weights.
onnxruntime-genai is imported when a model is loaded, not when this module is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np

    from .torch_engine import Generation

REPORT_NAME = "export_report.json"
"""The export report beside an ONNX export; the engine reads its ``tokenizer.bos`` fix (see :class:`OnnxModel`)."""

BosFix = Literal["keep", "add", "strip"]


@dataclass(frozen=True)
class OnnxServed:
    """What to load for a model id on the ONNX engine: an export folder, plus an adapter file for LoRA fine-tunes."""

    model_id: str
    folder: str
    adapter_file: str | None = None


class OnnxModel:
    """One ONNX Runtime GenAI model folder: the model, its tokenizer, and the adapters loaded on it.

    Prompts are rendered with the folder's chat template and tokenized by onnxruntime-genai. ``bos`` makes those ids
    equal to the transformers tokenizer's: ``"add"`` prepends BOS, ``"strip"`` removes a leading one (the export
    measures which, if any, is needed and records it in the export report). Replies are decoded by the ``tokenizers``
    library from the same ``tokenizer.json``, as transformers decodes them: onnxruntime-genai's decoder drops (stream)
    or stops at (batch) a token that is not whole UTF-8, so its text could differ from the PyTorch engine's.
    """

    def __init__(self, folder: str | Path) -> None:
        import onnxruntime_genai as og
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.model = og.Model(str(self.folder))
        self.tokenizer = og.Tokenizer(self.model)
        self._decoder = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.adapters = og.Adapters(self.model)
        self._loaded: set[str] = set()
        config = json.loads((self.folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        eos = config["eos_token_id"]
        self.stop_ids: set[int] = set(eos) if isinstance(eos, list) else {int(eos)}
        self.bos_id = int(config["bos_token_id"])
        self.context_length = int(config["context_length"])
        self.vocab_size = int(config["vocab_size"])
        self.chat_template = _chat_template(self.folder)
        report = self.folder / REPORT_NAME
        tokenizer_fix = json.loads(report.read_text(encoding="utf-8")).get("tokenizer", {}) if report.exists() else {}
        self.bos: BosFix = tokenizer_fix.get("bos", "keep")

    # ------------------------------------------------------------------------------------------------ prompts
    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text: the chat template applied with the generation prompt."""
        return str(
            self.tokenizer.apply_chat_template(
                json.dumps(messages), template_str=self.chat_template, add_generation_prompt=True
            )
        )

    def raw_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids as onnxruntime-genai's tokenizer makes them, before the BOS fix."""
        return [int(t) for t in self.tokenizer.encode(self.render(messages))]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids, with BOS handled as the transformers tokenizer does."""
        ids = self.raw_prompt_ids(messages)
        if self.bos == "add" and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        if self.bos == "strip" and ids[:1] == [self.bos_id]:
            return ids[1:]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens left out."""
        return str(self._decoder.decode(ids, skip_special_tokens=True))

    # --------------------------------------------------------------------------------------------- generation
    def _generator(
        self,
        adapter_file: str | None,
        *,
        max_length: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Any:
        import onnxruntime_genai as og

        options: dict[str, Any] = {"max_length": max_length, "do_sample": temperature > 0}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=self.vocab_size)
        if seed is not None:
            options["random_seed"] = seed
        params = og.GeneratorParams(self.model)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        if adapter_file is not None:
            generator.set_active_adapter(self.adapters, self._adapter(adapter_file))
        return generator

    def _adapter(self, adapter_file: str) -> str:
        name = Path(adapter_file).name
        if name not in self._loaded:
            self.adapters.load(str(adapter_file), name)
            self._loaded.add(name)
        return name

    def logits(self, ids: list[int], adapter_file: str | None = None) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` of one forward pass over ``ids``."""
        import numpy as np

        generator = self._generator(adapter_file, max_length=len(ids) + 1)
        generator.append_tokens(ids)
        logits: np.ndarray = np.asarray(generator.get_output("logits"))[0]
        return logits

    def greedy(self, ids: list[int], max_new_tokens: int, adapter_file: str | None = None) -> list[int]:
        """Greedy continuation of ``ids``, up to (not including) a stop token."""
        return [t for t in self._tokens(ids, max_new_tokens, adapter_file) if t not in self.stop_ids]

    def _tokens(self, ids: list[int], max_new_tokens: int, adapter_file: str | None, **sampling: Any) -> Iterator[int]:
        """Generated ids, ending with a stop token if one came before ``max_new_tokens``."""
        if len(ids) >= self.context_length:
            from ..errors import SpecError

            raise SpecError("messages", f"the prompt is {len(ids)} tokens; the context length is {self.context_length}")
        limit = min(len(ids) + max_new_tokens, self.context_length)
        generator = self._generator(adapter_file, max_length=limit, **sampling)
        generator.append_tokens(ids)
        for _ in range(limit - len(ids)):
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            yield token
            if token in self.stop_ids or generator.is_done():
                return

    def stream(
        self,
        messages: list[dict[str, str]],
        adapter_file: str | None,
        *,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        deadline: float | None = None,
    ) -> Iterator[str | Generation]:
        """Yield text pieces as they are generated, then one final :class:`~phitune.engines.torch_engine.Generation`;
        ``max_tokens`` and ``deadline`` as :meth:`phitune.engines.torch_engine.ModelPool.stream` takes them."""
        from .torch_engine import Generation, token_budget

        prompt_ids = self.prompt_ids(messages)
        budget = token_budget(len(prompt_ids), max_tokens, self.context_length)
        out_ids: list[int] = []
        finish: Literal["stop", "length"] = "length"
        emitted = ""
        sampling = {"temperature": temperature, "top_p": top_p, "seed": seed}
        for token in self._tokens(prompt_ids, budget, adapter_file, **sampling):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if token in self.stop_ids:
                finish = "stop"
                break
            out_ids.append(token)
            text = self.decode(out_ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(emitted) :]
                emitted = text
        final = self.decode(out_ids)
        if len(final) > len(emitted):
            yield final[len(emitted) :]
        yield Generation(final, len(prompt_ids), len(out_ids), finish)


class OnnxPool:
    """Loaded ONNX models of one process, one per export folder; adapters are switched per request on their base."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._models: dict[str, OnnxModel] = {}

    def model(self, folder: str) -> OnnxModel:
        with self._lock:
            if folder not in self._models:
                self._models[folder] = OnnxModel(folder)
            return self._models[folder]

    def stream(
        self,
        served: OnnxServed,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        deadline: float | None = None,
    ) -> Iterator[str | Generation]:
        """Yield text pieces, then the final Generation (one generation at a time per pool)."""
        with self._lock:
            model = self.model(served.folder)
            yield from model.stream(
                messages,
                served.adapter_file,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                deadline=deadline,
            )

    def generate(self, served: OnnxServed, messages: list[dict[str, str]], **options: Any) -> Generation:
        """Generate a whole reply."""
        for piece in self.stream(served, messages, **options):
            if not isinstance(piece, str):
                return piece
        raise RuntimeError("generation ended without a result")  # pragma: no cover

    def clear(self) -> None:
        """Unload every model."""
        with self._lock:
            self._models.clear()


_SHARED = OnnxPool()


def shared_pool() -> OnnxPool:
    """The process-wide pool: every LocalBackend of a process shares the loaded ONNX models."""
    return _SHARED


def _chat_template(folder: Path) -> str | None:
    """The chat template saved beside the tokenizer (``chat_template.jinja`` or in ``tokenizer_config.json``)."""
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None
