"""`rlhf train` / recipe scripts: eval before, train, eval after (eval.json), report."""
import json

from rlhf.cli import main


def test_train_cli_evaluates_before_and_after_and_keeps_before_on_resume(tiny_model_dir, tmp_path, capsys):
    common = [f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=false",
              f"output_dir={tmp_path / 'run'}", "train.prompts_per_step=2", "train.samples_per_prompt=4",
              "train.micro_batch_size=4", "generation.max_new_tokens=6", "log.progress=false", "log.trackers=[]",
              "checkpoint.save_final=false", "data.eval=arithmetic", "eval.max_prompts=4", "eval.k=2"]
    main(["train", *common, "train.steps=2"])
    out = capsys.readouterr().out
    assert "policy before training: greedy accuracy" in out and "policy after training" in out
    report_line = [ln for ln in out.splitlines() if ln.startswith("report: ")]
    assert report_line and report_line[0].endswith("report.html")
    first = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert first["before"]["num_prompts"] == 4 and first["after"]["k"] == 2 and "pass@2" in first["after"]

    main(["train", *common, "train.steps=3", "checkpoint.resume=latest", "log.report=false"])
    out = capsys.readouterr().out
    assert "policy before training" not in out and "report: " not in out
    second = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert second["before"] == first["before"]  # measured on the base model by the first part of the run


def test_no_eval_without_eval_split(tiny_model_dir, tmp_path, capsys):
    main(["train", f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", f"output_dir={tmp_path / 'run'}",
          "train.steps=1", "train.samples_per_prompt=4", "train.micro_batch_size=4", "generation.max_new_tokens=4",
          "log.progress=false", "log.trackers=[]", "checkpoint.save_final=false"])
    assert "greedy accuracy" not in capsys.readouterr().out
    assert not (tmp_path / "run" / "eval.json").exists() and (tmp_path / "run" / "report.html").is_file()
