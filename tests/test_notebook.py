"""The README's Python example (a notebook user's first run) runs as written, on the tiny model."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## From Python (a notebook)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_trains(tiny_model_dir, tmp_path, capsys):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 20 and "Trainer(cfg, model=" in code
    code = (code.replace('"smollm2-135m-instruct"', repr(str(tiny_model_dir)))
                .replace("output_dir=runs/notebook", f"output_dir={tmp_path / 'nb'}")
                .replace("train.steps=10", "train.steps=2"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    history = scope["history"]
    assert [r["step"] for r in history] == [1, 2] and all(0.0 <= r["reward/mean"] <= 1.0 for r in history)
    assert (tmp_path / "nb" / "metrics.jsonl").read_text().count("\n") == 2
    assert capsys.readouterr().out.strip().endswith("]")  # the printed reward curve


def test_a_loaded_model_and_tokenizer_can_be_passed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf import Trainer, load_config
    from rlhf.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = load_config(overrides=[f"output_dir={tmp_path / 'run'}", "train.steps=1", "train.prompts_per_step=2",
                                 "train.samples_per_prompt=2", "train.micro_batch_size=2",
                                 "generation.max_new_tokens=4", "model.compute_dtype=fp32", "log.progress=false",
                                 "checkpoint.save_final=false"])
    trainer = Trainer(cfg, model=model, tokenizer=load_tokenizer(str(tiny_model_dir)),
                      reward_funcs=[(lambda completions, **kw: [float(len(c)) for c in completions], 0.5)])
    assert trainer.unwrapped.base_model.model is model  # LoRA (the default) on the model given
    (record,) = trainer.train()
    assert record["reward/<lambda>/mean"] > 0
