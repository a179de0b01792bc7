"""Lean loading: a sharded bf16 checkpoint loads without a full-precision (or full bf16) copy held in memory, into
the same model transformers' own loader builds, and trains with peft."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from phitune.trainer.loading import PeakRSS, load_for_training, rss_bytes  # noqa: E402
from phitune.types import Full, LoRA, QLoRA  # noqa: E402

SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
"""48M parameters in 16 layers: 96 MB in bf16, 192 MB in fp32, ~27 MB in 4 bits (decoder weights dominate, as in
Phi-3). Many small tensors, so that one tensor in flight is small beside the checkpoint."""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("sharded") / "model"
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="30MB")
    del model
    return folder


def checkpoint_bytes(folder: Path) -> int:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return int(index["metadata"]["total_size"])


def test_checkpoint_is_sharded(sharded: Path) -> None:
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    assert 90e6 < checkpoint_bytes(sharded) < 100e6


def test_peak_rss_measures_a_block() -> None:
    import mmap

    with PeakRSS() as peak:
        block = mmap.mmap(-1, 64 * 2**20)  # fresh pages (a malloc could reuse resident free heap)
        block.write(b"x" * len(block))
        block.close()
    assert peak.scope == "load"  # Linux: the high-water mark of the block alone
    assert peak.peak_bytes >= rss_bytes() + 60 * 2**20


def test_qlora_streams_without_a_bf16_copy(sharded: Path) -> None:
    before = rss_bytes()
    model, report = load_for_training(str(sharded), QLoRA(), device="cpu", precision="bf16")
    bf16 = checkpoint_bytes(sharded)
    assert report.loader == "streamed" and report.quantized and report.dtype == "bf16"
    assert report.peak_scope == "load"
    # 4-bit decoder weights plus bf16 embeddings: about a quarter of the checkpoint
    assert report.weight_bytes < 0.35 * bf16
    # never the whole checkpoint resident: the final model plus one tensor in flight (largest: 1.4M weights, whose
    # quantisation takes ~16 bytes a weight in temporaries), with room for the C heap's own slack
    assert report.peak_rss_bytes - before < report.weight_bytes + 0.5 * bf16, report
    assert getattr(model, "is_loaded_in_4bit", False)
    assert report.data()["load"]["peak_rss_bytes"] == report.peak_rss_bytes


def test_full_streams_without_holding_the_mapped_checkpoint(sharded: Path) -> None:
    before = rss_bytes()
    model, report = load_for_training(str(sharded), Full(), device="cpu")
    bf16 = checkpoint_bytes(sharded)
    assert report.loader == "streamed" and report.dtype == "fp32"
    assert report.weight_bytes >= 2 * bf16
    # fp32 weights plus one tensor, not fp32 plus the whole mapped bf16 checkpoint
    assert report.peak_rss_bytes - before < 2 * bf16 + 0.5 * bf16, report
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lora_keeps_transformers_mapped_bf16(sharded: Path) -> None:
    model, report = load_for_training(str(sharded), LoRA(), device="cpu", precision="bf16")
    assert report.loader == "from_pretrained" and report.dtype == "bf16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert math.isclose(report.weight_bytes, checkpoint_bytes(sharded), rel_tol=0.01)


def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose mapping in this process holds ``tensor``'s memory."""
    address = tensor.untyped_storage().data_ptr()
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *_, name = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            files.add(name)
    return files


def test_qlora_keeps_its_bf16_embedding_mapped(sharded: Path) -> None:
    model, _ = load_for_training(str(sharded), QLoRA(), device="cpu", precision="bf16")
    files = _mapped_files(model.get_input_embeddings().weight)
    assert any(name.endswith(".safetensors") for name in files), files  # a view of the shard, read as rows are used
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] = 1.0  # a private mapping: the checkpoint is never written
    reloaded, _ = load_for_training(str(sharded), QLoRA(), device="cpu", precision="bf16")
    assert reloaded.get_input_embeddings().weight[0, 0] != 1.0


@pytest.mark.parametrize("method", [QLoRA(), Full()], ids=["qlora", "full"])
def test_same_model_as_from_pretrained(sharded: Path, method: QLoRA | Full) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, _ = load_for_training(str(sharded), method, device="cpu", precision="bf16")  # bf16 autocast below
    kwargs: dict[str, object] = {"dtype": torch.float32}
    if isinstance(method, QLoRA):
        kwargs = {
            "dtype": torch.bfloat16,
            "device_map": {"": "cpu"},
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
        }
    reference = AutoModelForCausalLM.from_pretrained(sharded, **kwargs)
    ids = torch.tensor([[1, 17, 300, 999, 5, 42]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert type(model.model.layers[0].mlp.down_proj) is type(reference.model.layers[0].mlp.down_proj)


@pytest.mark.parametrize(("columns", "double_quant"), [(192, True), (100, False)])
def test_sliced_quantisation_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, columns: int, double_quant: bool
) -> None:
    import bitsandbytes as bnb

    from phitune.trainer import loading

    monkeypatch.setattr(loading, "QUANT_SLICE_ELEMENTS", 3000)  # many slices, a partial one last
    with torch.device("meta"):
        layer = bnb.nn.Linear4bit(columns, 130, False, torch.bfloat16, compress_statistics=double_quant)
    weight = torch.randn(130, columns, dtype=torch.bfloat16)
    sliced = loading.quantize_4bit(weight, layer.weight)
    packed, state = bnb.functional.quantize_4bit(weight, compress_statistics=double_quant, quant_type="fp4")
    assert torch.equal(sliced.data, packed) and torch.equal(sliced.quant_state.absmax, state.absmax)
    assert sliced.bnb_quantized and sliced.module is layer and layer.quant_state is sliced.quant_state
    restored = bnb.functional.dequantize_4bit(sliced.data, sliced.quant_state)
    assert torch.equal(restored, bnb.functional.dequantize_4bit(packed, state))


def test_lean_qlora_trains_with_peft(sharded: Path, tmp_path: Path) -> None:
    import peft

    from phitune.trainer.model import apply_method

    model, _ = load_for_training(str(sharded), QLoRA(r=4), device="cpu")
    model = apply_method(model, QLoRA(r=4), gradient_checkpointing=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))
    model.save_pretrained(tmp_path / "adapter")
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path / "adapter"), peft.LoraConfig)
