"""The command line end to end: `jaxsloth train` writes metrics, a loss plot and an adapter that
`peft` loads with our logits; `jaxsloth demo` (README's first command) runs."""

import json

import numpy as np
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

import jaxsloth
from jaxsloth.cli import main


def test_train_command_writes_metrics_plot_and_a_peft_adapter(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("llama3")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                       {"role": "assistant", "content": w}]})
                              for w in ["cat", "dog", "sun", "sea"] * 3))
    out = tmp_path / "run"
    main(["train", "--model", str(ckpt), "--data", str(data), "--output_dir", str(out), "--dtype", "float32",
          "--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
          "--learning_rate", "1e-3", "--r", "4", "--lora_alpha", "8", "--save_steps", "2", "--max_seq_length", "64"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in metrics)
    assert (out / "loss_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

    # the adapter in PyTorch gives the logits of the trained model reloaded in JAX
    model, _ = jaxsloth.load_model(ckpt, dtype="float32")
    model = jaxsloth.load_adapter(model, out / "adapter")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 12))
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32), out / "adapter")
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(ids))
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    assert np.abs(np.asarray(model.lora["q"]["b"])).max() > 0, "training must have moved B off zero"


def test_demo_command_runs(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--steps", "5"])
    text = capsys.readouterr().out
    assert "4. loss by step" in text and "6. PEFT adapter written" in text
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()


def test_train_command_reports_bad_data_without_a_traceback(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    rc = main(["train", "--model", str(tiny_checkpoint("llama3")), "--data", str(tmp_path / "bad.jsonl"),
               "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "jaxsloth train: error:" in err and "cannot tell the format" in err
    assert "Traceback" not in err
