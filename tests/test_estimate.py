"""The "will it fit?" estimator: predicted peaks against measured training runs, refusal with what would fit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import rename_at_once, write_chat
from phitune.errors import SpecError, WontFitError
from phitune.estimate import (
    ACT_H,
    ACT_I,
    CATALOG_SHAPES,
    GEMM_ATTENTION_LENGTH_MULTIPLE,
    KEEP_PROBABILITIES_MAX_LENGTH,
    Estimate,
    MachineProbe,
    ModelShape,
    attention_probability_bytes,
    check_fits,
    estimate,
    model_shape,
    probabilities_kept_from,
    probe_machine,
)
from phitune.local.worker import trainer_env
from phitune.types import Distributed, Hyperparameters, JobSpec, LoRA, QLoRA

GiB = 2**30

# A trainer process as the local worker runs it (lean loading, phitune.trainer.loading), timed and
# measured by the kernel (the parent reads the child's ru_maxrss).
_TRAIN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from phitune.trainer import loop
    from phitune.types import JobSpec

    spec = JobSpec.model_validate_json(sys.argv[1])
    work = Path(sys.argv[2])

    class Control(loop.NullControl):
        steps = []
        def metrics(self, data): self.steps.append(data)

    control = Control()
    run = loop.TrainRun(spec, spec.model, Path(spec.training_file), None, work / "out", work / "ckpt")
    loop.train(run, control)
    print(json.dumps(control.steps))
    """
)


def measured_peak(spec: JobSpec, work: Path) -> int:
    """Peak RSS of a fresh trainer process that trains ``spec``."""
    work.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", _TRAIN, spec.model_dump_json(), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**trainer_env(Distributed()), "HF_HUB_OFFLINE": "1"},
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(output)[-1]["step"] == spec.hyperparameters.max_steps
    return int(usage.ru_maxrss * 1024)


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 15M-parameter Phi-3 (hidden 512, 4 layers) with tiny-phi3's tokenizer: activations show beside the runtime."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from phitune.tiny import ensure_tiny_phi3

    tiny = ensure_tiny_phi3(tmp_path_factory.mktemp("tiny"))
    config = AutoConfig.from_pretrained(tiny)
    config.update({"hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 8})
    config.update({"num_hidden_layers": 4})
    folder = tmp_path_factory.mktemp("wider") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    return folder


def long_chat(path: Path, examples: int) -> Path:
    """Chat examples long enough to fill 256 tokens."""
    text = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea. " * 30
    return write_chat(path, [(f"Tell me story {i}.", text) for i in range(examples)])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "batch", "checkpointing"),
    [("lora", 4, False), ("lora", 4, True), ("qlora", 2, True)],
)
def test_estimate_matches_measured_peak(
    wider_model: Path, tmp_path: Path, method: str, batch: int, checkpointing: bool
) -> None:
    data = long_chat(tmp_path / "train.jsonl", examples=2 * batch)
    hp = Hyperparameters(
        batch_size=batch, max_seq_length=256, max_steps=2, gradient_checkpointing=checkpointing, lr_scheduler="constant"
    )
    spec = JobSpec(model=str(wider_model), training_file=str(data), method=method, hyperparameters=hp)
    predicted = estimate(spec, home=tmp_path, dataset=data)
    peak = measured_peak(spec, tmp_path / "run")
    assert predicted.micro_batch_tokens == batch * 256
    assert abs(predicted.peak_bytes / peak - 1) < 0.3, (predicted.memory, peak)


def test_medium_full_fine_tune_is_refused_on_24_gib(tmp_path: Path) -> None:
    spec = JobSpec(model="Phi-3-medium-4k-instruct", training_file="file-x", method="full")
    with pytest.raises(WontFitError) as caught:
        check_fits(spec, home=tmp_path, available_bytes=24 * GiB)
    error = caught.value
    result = error.estimate
    assert isinstance(result, Estimate) and not result.fits
    assert result.parameters == 13_960_238_080 and result.trainable_parameters == result.parameters
    assert result.peak_bytes > 200 * GiB  # fp32 weights, gradients and AdamW alone are 16 bytes a parameter
    assert "24.0 GiB is available" in str(error) and "GiB at its peak" in str(error)
    assert error.suggestions and all("qlora" in s for s in error.suggestions)
    assert any(s in str(error) for s in error.suggestions)


def test_oversized_lora_gets_each_change_that_fits(tmp_path: Path) -> None:
    hp = Hyperparameters(batch_size=4, max_seq_length=4096, precision="bf16")  # the same on every CPU
    spec = JobSpec(model="Phi-3-mini-4k-instruct", training_file="file-x", method="lora", hyperparameters=hp)
    result = estimate(spec, home=tmp_path, available_bytes=24 * GiB)
    assert not result.fits and result.memory.activations > 50 * GiB
    assert any(s.startswith("gradient_checkpointing=True") for s in result.suggestions)
    checkpointed = spec.model_copy(update={"hyperparameters": hp.model_copy(update={"gradient_checkpointing": True})})
    fitting = check_fits(checkpointed, home=tmp_path, available_bytes=24 * GiB)
    assert fitting is not None and fitting.fits


def test_medium_qlora_fits_24_gib(tmp_path: Path) -> None:
    hp = Hyperparameters(batch_size=1, max_seq_length=256, gradient_checkpointing=True, precision="bf16")
    spec = JobSpec(model="Phi-3-medium-4k-instruct", training_file="file-x", method="qlora", hyperparameters=hp)
    result = check_fits(spec, home=tmp_path, available_bytes=24 * GiB)
    assert result is not None
    assert 7 * GiB < result.memory.weights < 8.5 * GiB  # 13.6B 4-bit weights + 0.33B bf16 embedding and head
    assert result.peak_bytes < 12 * GiB


PROBE = MachineProbe(device="cpu", threads=2, bf16_flops=3e11, fp32_flops=1.5e11, dequant_per_second=1e9,
                     bf16=True, measured_at=0.0, fingerprint="fixed")  # fmt: skip
"""A machine's measured speeds, fixed: the memory model does not depend on them."""


def test_phi35_moe_does_not_fit_24_gib_and_says_what_would(tmp_path: Path) -> None:
    """41.9B parameters whose experts stay bf16 under QLoRA (bitsandbytes quantises linear layers only): no change
    on a 24 GiB machine fits, so the refusal gives the memory of the leanest single-process form and the 80 GB GPUs
    FSDP would share LoRA across."""
    hp = Hyperparameters(batch_size=4, max_seq_length=1024, precision="bf16")
    lora = LoRA(dropout=0.0)
    spec = JobSpec(model="Phi-3.5-MoE-instruct", training_file="file-x", method=lora, hyperparameters=hp)
    with pytest.raises(WontFitError) as caught:
        check_fits(spec, home=tmp_path, available_bytes=24 * GiB)
    result = caught.value.estimate
    assert isinstance(result, Estimate) and result.parameters == 41_873_153_344
    assert result.memory.weights > 75 * GiB  # bf16
    leanest, shared = result.suggestions
    assert leanest.startswith("gradient_checkpointing=True, method='qlora', batch_size=1")
    needed = float(leanest.rsplit("~", 1)[1].split()[0])
    assert 75 < needed < 100 and "or more" in leanest
    assert "strategy='fsdp', nproc=2" in shared and "method='lora'" in shared
    qlora = spec.model_copy(update={"method": QLoRA(dropout=0.0)})
    quantized = estimate(qlora, home=tmp_path, available_bytes=24 * GiB, probe=PROBE)
    assert result.memory.weights - quantized.memory.weights < 3 * GiB  # only the attention layers are 4-bit
    lean = Hyperparameters(batch_size=1, max_seq_length=256, gradient_checkpointing=True, precision="bf16")
    leanest_job = qlora.model_copy(update={"hyperparameters": lean})  # nothing left to change on this machine
    suggestions = estimate(leanest_job, home=tmp_path, available_bytes=24 * GiB, probe=PROBE).suggestions
    assert suggestions[0].startswith("the job as it is on a machine (or GPU) with ~")


@pytest.mark.parametrize("model", ["Phi-3.5-mini-instruct", "Phi-4-mini-instruct", "Phi-4"])
def test_the_dense_family_fits_24_gib_with_qlora_and_checkpointing(tmp_path: Path, model: str) -> None:
    hp = Hyperparameters(batch_size=1, max_seq_length=1024, gradient_checkpointing=True, precision="bf16")
    spec = JobSpec(model=model, training_file="file-x", method="qlora", hyperparameters=hp)
    result = estimate(spec, home=tmp_path, available_bytes=24 * GiB, probe=PROBE)
    assert result.fits and result.peak_bytes < 20 * GiB


def test_expert_adapters_are_counted_as_peft_makes_them() -> None:
    """One rank-r adapter per expert on each expert tensor, beside the attention's: the closed form the estimator
    uses equals what peft builds on the meta device."""
    from phitune.estimate.memory import _count_on_meta, trainable_parameters
    from phitune.estimate.shapes import PHI35_MOE_SHAPE

    for method in (LoRA(r=8, dropout=0.0), LoRA(r=8, target_parameters=())):
        spec = JobSpec(model="Phi-3.5-MoE-instruct", training_file="file-x", method=method)
        assert trainable_parameters(PHI35_MOE_SHAPE, spec) == _count_on_meta(PHI35_MOE_SHAPE, method)


def test_every_catalog_model_has_a_shape(tmp_path: Path) -> None:
    from phitune import catalog

    for entry in catalog.MODELS:
        shape = model_shape(entry.name, tmp_path)
        assert shape.parameters == pytest.approx(entry.parameters_b * 1e9, rel=0.02), entry.name


def test_the_loss_chunks_are_sized_as_the_trainer_sizes_them() -> None:
    pytest.importorskip("torch")
    from phitune.estimate.memory import LOSS_CHUNK_ELEMENTS, LOSS_MIN_CHUNK_ROWS
    from phitune.trainer import loss

    assert (LOSS_CHUNK_ELEMENTS, LOSS_MIN_CHUNK_ROWS) == (loss.CHUNK_ELEMENTS, loss.MIN_CHUNK_ROWS)


def test_a_mapped_embedding_counts_only_the_rows_the_data_holds(wider_model: Path, tmp_path: Path) -> None:
    shape = model_shape(str(wider_model))
    assert shape.checkpoint_dtype == "bfloat16"
    data = write_chat(tmp_path / "few.jsonl", [("Hi.", "Hello there."), ("Bye.", "Goodbye.")])
    embedding = shape.vocab_size * shape.hidden_size * 2
    for method in ("lora", "qlora"):
        bf16 = Hyperparameters(precision="bf16")  # a bf16 base stays mapped, whatever this CPU prefers
        spec = JobSpec(model=str(wider_model), training_file="file-x", method=method, hyperparameters=bf16)
        everything = estimate(spec, tokens_per_example=64, available_bytes=24 * GiB)
        few_rows = estimate(spec, dataset=data, available_bytes=24 * GiB)
        assert few_rows.tokens_per_epoch is not None
        saved = everything.memory.weights - few_rows.memory.weights
        rows = few_rows.tokens_per_epoch
        assert saved == embedding - rows * (shape.hidden_size * 2 + 4096), method
    full = JobSpec(model=str(wider_model), training_file="file-x", method="full")  # trained: converted, not mapped
    weights = estimate(full, dataset=data, available_bytes=24 * GiB).memory.weights
    assert weights == estimate(full, tokens_per_example=64, available_bytes=24 * GiB).memory.weights


def test_unknown_shape_is_not_refused(tmp_path: Path) -> None:
    spec = JobSpec(model="someone/not-downloaded-model", training_file="file-x", method="full")
    assert check_fits(spec, home=tmp_path, available_bytes=1) is None
    with pytest.raises(SpecError, match=r"no config\.json"):
        estimate(spec, home=tmp_path)


def test_client_estimate_reads_the_dataset(home: Path, chat_file: Path) -> None:
    import phitune

    client = phitune.Client(home=home)
    result = client.finetune.estimate(
        model="tiny-phi3", training_file=chat_file, method="lora", hyperparameters={"batch_size": 2}
    )
    assert result.fits and result.examples == 8 and result.steps_per_epoch == 4
    assert result.tokens_per_epoch is not None and result.tokens_per_epoch > 8 * 10
    assert (
        result.trainable_tokens_per_epoch is not None
        and 0 < result.trainable_tokens_per_epoch < result.tokens_per_epoch
    )
    assert result.seconds_per_epoch is not None and result.seconds_per_epoch > 0
    assert result.tokens_per_second > 0 and "tokens/s" in result.summary
    assert client.finetune.list() == []  # nothing was submitted
    stored = client.files.upload(chat_file)
    assert client.finetune.estimate(model="tiny-phi3", training_file=stored.id).examples == 8


def test_peft_passthrough_methods_are_estimated_on_a_small_vocabulary(home: Path, chat_file: Path) -> None:
    import phitune

    ia3 = {"peft_type": "IA3", "target_modules": ["qkv_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
    client = phitune.Client(home=home)
    method = {"type": "peft", "config": ia3}
    result = client.finetune.estimate(model="tiny-phi3", training_file=chat_file, method=method)
    assert result.fits and 0 < result.trainable_parameters < result.parameters / 100


def test_probe_is_measured_once_and_cached(tmp_path: Path) -> None:
    cache = tmp_path / "probe.json"
    first = probe_machine(cache)
    # CPUs without AVX512-BF16 run bf16 GEMMs far slower than fp32 ones: only fp32 is bounded below everywhere
    assert first.bf16_flops > 0 and first.fp32_flops > 1e9 and first.dequant_per_second is None
    assert probe_machine(cache).measured_at == first.measured_at
    quantized = probe_machine(cache, quantized=True)  # the dequantisation rate was missing: measured now
    assert quantized.dequant_per_second is not None and quantized.dequant_per_second > 1e6
    assert MachineProbe.model_validate(json.loads(cache.read_text())[first.fingerprint]) == quantized


def test_the_probe_times_no_gemm_in_the_callers_process(tmp_path: Path) -> None:
    """The machine is measured in a child process: the caller (a client's finetune.create) imports no torch."""
    code = (
        "import sys; from pathlib import Path; from phitune.estimate import probe_machine; "
        "probe = probe_machine(Path(sys.argv[1])); print(probe.fp32_flops > 0, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "probe.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]


def test_concurrent_probes_share_a_cold_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients in several threads of one process probe a cold cache at once (a fresh machine's first jobs); every
    thread's rename waits for the others', the worst interleaving."""
    cache = tmp_path / "probe.json"
    _, errors = rename_at_once(monkeypatch, 8, lambda: probe_machine(cache, refresh=True))
    assert not errors
    (stored,) = json.loads(cache.read_text()).values()
    assert MachineProbe.model_validate(stored).bf16_flops > 0
    assert [f.name for f in tmp_path.iterdir()] == ["probe.json"]  # no temporary file left behind


@pytest.mark.parametrize("tiny", ["tiny-phi3", "tiny-phi4-mini", "tiny-phi4", "tiny-phi3.5-moe"])
def test_catalog_shapes_have_the_real_parameter_counts(tmp_path: Path, tiny_model_dir: Path, tiny: str) -> None:
    """The hub's parameter counts; and for each built-in tiny architecture (partial rotary and tied embeddings,
    grouped-query attention, experts with biases and LayerNorms), the count transformers builds."""
    assert CATALOG_SHAPES["Phi-3-mini-4k-instruct"].parameters == 3_821_079_552
    assert CATALOG_SHAPES["Phi-3-medium-4k-instruct"].parameters == 13_960_238_080
    assert CATALOG_SHAPES["Phi-4-mini-instruct"].parameters == 3_836_021_760
    assert CATALOG_SHAPES["Phi-4"].parameters == 14_659_507_200
    assert CATALOG_SHAPES["Phi-3.5-MoE-instruct"].parameters == 41_873_153_344
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from phitune.tiny import ensure_tiny

    folder = ensure_tiny(tiny_model_dir.parent, tiny)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        counted = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert model_shape(str(folder)).parameters == counted


def test_attention_probabilities_count_where_the_cpu_kernel_keeps_them() -> None:
    """The CPU attention kernel keeps an example's softmax probabilities for the backward where recomputing them is
    a noticeable share of the layer's work (narrow models): heads x padded length bytes per token and layer in bf16,
    up to 1024 tokens. Phi-3's real sizes recompute them; SDPA (GPUs) keeps none."""
    pytest.importorskip("torch")
    from phitune.trainer import attention

    assert GEMM_ATTENTION_LENGTH_MULTIPLE == attention.LENGTH_MULTIPLE
    narrow = ModelShape(  # the benchmark model of benchmarks/train_vs_trl.py
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=32064,
    )
    # the score matmul (2 L^2 H) against 2% of the layer's matmul work (4 L N): L >= 0.04 N / H
    assert probabilities_kept_from(narrow) == math.ceil(0.04 * narrow.layer_linear_parameters / 384) == 185
    assert attention_probability_bytes(narrow, 184, "bf16", "cpu") == 0
    assert attention_probability_bytes(narrow, 300, "bf16", "cpu") == 6 * 320 * 2  # padded to a multiple of 32
    assert attention_probability_bytes(narrow, 300, "fp32", "cpu") == 6 * 320 * 4
    assert attention_probability_bytes(narrow, KEEP_PROBABILITIES_MAX_LENGTH + 1, "bf16", "cpu") == 0
    assert attention_probability_bytes(narrow, 300, "bf16", "cuda") == 0
    for name, shape in CATALOG_SHAPES.items():
        assert probabilities_kept_from(shape) > KEEP_PROBABILITIES_MAX_LENGTH, name

    hp = Hyperparameters(batch_size=2, max_seq_length=300, precision="bf16")
    spec = JobSpec(model="Phi-3-mini-4k-instruct", training_file="file-x", method="lora", hyperparameters=hp)
    mini = model_shape(spec.model)
    predicted = estimate(spec, tokens_per_example=300, available_bytes=100 * GiB)
    per_token = ACT_H * mini.hidden_size + ACT_I * mini.intermediate_size
    assert predicted.memory.activations == round(mini.num_hidden_layers * 600 * per_token)


def _mixed_lengths(path: Path) -> Path:
    """Answers from one word to a few hundred: a padded micro-batch would be mostly padding."""
    pairs = [(f"Question {i}?", " ".join(["word"] * (1 + (i * 37) % 300))) for i in range(41)]
    return write_chat(path, pairs)


def test_time_per_epoch_and_tokens_per_second_agree(tmp_path: Path) -> None:
    probe = MachineProbe(device="cpu", threads=2, bf16_flops=3e11, fp32_flops=1.5e11, dequant_per_second=1e9,
                         bf16=True, measured_at=0.0, fingerprint="fixed")  # fmt: skip
    spec = JobSpec(
        model="Phi-3-mini-4k-instruct",
        training_file="train.jsonl",
        method="qlora",
        hyperparameters=Hyperparameters(batch_size=4, gradient_checkpointing=True),
    )
    result = estimate(spec, dataset=_mixed_lengths(tmp_path / "train.jsonl"), probe=probe, available_bytes=64 * GiB)
    assert result.examples == 41 and result.steps_per_epoch == 11  # 10 full micro-batches and one of a single example
    assert result.tokens_per_epoch and result.trainable_tokens_per_epoch and result.seconds_per_epoch
    assert result.tokens_per_second * result.seconds_per_epoch == pytest.approx(result.tokens_per_epoch)
    assert result.trainable_tokens_per_second is not None
    assert result.trainable_tokens_per_second * result.seconds_per_epoch == pytest.approx(
        result.trainable_tokens_per_epoch
    )
    assert (result.weight_dtype, result.quantization) == ("bf16" if result.compute_dtype == "bf16" else "fp32", "nf4")
