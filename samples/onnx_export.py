"""Fine-tune tiny-phi3 on this machine, export it for ONNX Runtime GenAI and chat with it — offline, a few minutes.

Usage::

    pip install 'phitune[local,onnx]'
    python samples/onnx_export.py [OUT_DIR]        # default: ./phi3-onnx

OUT_DIR gets the phitune home of the run, ``merged/`` (the LoRA merged into one ONNX model) and ``shared/`` (an ONNX
base with the fine-tune as ``<name>.onnx_adapter``). The last step runs ``shared/`` with onnxruntime-genai alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnxruntime_genai as og

import phitune
from phitune.demo import demo_dataset

QUESTION = [
    {"role": "system", "content": "You are a concise assistant. Answer in a few words."},
    {"role": "user", "content": "What is the capital of France?"},
]


def main(out: Path) -> None:
    phitune.quiet_libraries()  # no warnings or progress bars from transformers, peft, DeepSpeed
    client = phitune.Client(home=out / "home")
    job = client.finetune.create(
        model="tiny-phi3",
        training_file=str(demo_dataset()),  # 20 short questions and answers bundled with phitune
        method=phitune.LoRA(r=8, alpha=16, dropout=0.0),
        hyperparameters={"epochs": 100, "batch_size": 10, "learning_rate": 3e-3, "max_steps": 80},
    )
    job = client.finetune.wait(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model is not None, job.error
    print(f"fine-tuned {job.fine_tuned_model}")

    # One folder, the adapter merged into the weights; checked against the PEFT model in PyTorch.
    merged = client.models.export(job.fine_tuned_model, format="onnx", dest=out / "merged", overwrite=True)
    checks = json.loads((merged / "export_report.json").read_text())["checks"]
    print(
        f"{merged}: max |logits - PEFT logits| = {checks['logits_max_abs_diff']:.1e}, greedy identical: "
        f"{checks['greedy_identical']}"
    )

    # The base once, the fine-tune as an adapter file; more fine-tunes of tiny-phi3 can join the same folder.
    shared = client.models.export(
        job.fine_tuned_model, format="onnx", dest=out / "shared", adapters="separate", overwrite=True
    )
    adapter_file = next(shared.glob("*.onnx_adapter"))
    print(f"{shared}: base model.onnx + {adapter_file.name}")

    # onnxruntime-genai alone: load the base, activate the adapter, generate greedily.
    model = og.Model(str(shared))
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), "fine-tune")
    tokenizer = og.Tokenizer(model)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps(QUESTION), add_generation_prompt=True))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 16)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "fine-tune")
    generator.append_tokens(prompt_ids)
    while not generator.is_done():  # genai_config.json stops on <|end|>
        generator.generate_next_token()
    answer = tokenizer.decode(generator.get_sequence(0)[len(prompt_ids) :])
    print(f"onnxruntime-genai: {QUESTION[-1]['content']} -> {answer.strip()}")

    # The same model behind phitune's chat API, served by ONNX Runtime GenAI instead of PyTorch.
    deployment = client.deployments.create(model=job.fine_tuned_model, name="tiny-onnx", engine="onnx")
    print(f"deployment {deployment.name} (engine={deployment.engine}): {deployment.chat(QUESTION).text}")
    client.deployments.delete(deployment.name)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "phi3-onnx").resolve())
