"""Console: warnings shown once, one clean log line per step, a progress bar with ETA and live reward/KL."""
import io
import logging
import warnings

from rlhf import logging as rlog
from rlhf.logging import Progress, RlhfWarning, console_line, quiet_repeated_warnings, warn_once

RECORD = {"step": 3, "reward/mean": 0.5, "reward/std": 0.25, "kl": 0.0123, "loss": -0.01, "completion/len_mean": 12.5,
          "time/step_s": 2.0, "time/generate_s": 1.2, "time/train_s": 0.6}


def test_warn_once_by_message_and_by_key(monkeypatch):
    monkeypatch.setattr(rlog, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shown = [warn_once("prompt truncated") for _ in range(3)]
        shown += [warn_once(f"{n} samples unscored", key="unscored") for n in range(3)]
    assert shown == [True, False, False, True, False, False]
    assert [str(w.message) for w in caught] == ["prompt truncated", "0 samples unscored"]
    assert all(w.category is RlhfWarning for w in caught)


def test_library_warnings_and_log_records_repeat_once(monkeypatch):
    monkeypatch.setattr(rlog, "_once_filter", rlog._OnceFilter())
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    lib = logging.getLogger("transformers")
    handler, second = Collect(), Collect()  # two handlers: both get the first occurrence
    lib.addHandler(handler)
    lib.addHandler(second)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_repeated_warnings()
            registry = {}  # the library module's __warningregistry__
            for step in range(4):  # the same warning raised from two places of a library, every step
                for line in (10, 20):
                    warnings.warn_explicit("flag ignored", UserWarning, "generation/utils.py", line,
                                           module="transformers.generation.utils", registry=registry)
                logging.getLogger("transformers.generation.utils").warning("temperature is ignored (step %d)", step)
                logging.getLogger("transformers.generation.utils").error("real error %d", step)
        assert [str(w.message) for w in caught] == ["flag ignored"]
        assert seen.count("temperature is ignored (step 0)") == 2 and len([s for s in seen if "ignored" in s]) == 2
        assert [s for s in seen if s.startswith("real error")] == [f"real error {i}" for i in range(4) for _ in "ab"]
    finally:
        lib.removeHandler(handler)
        lib.removeHandler(second)


def test_console_line_is_one_line_on_a_narrow_terminal():
    from rich.console import Console

    out = io.StringIO()
    progress = Progress(total=10, enabled=True, console=Console(file=out, width=40, force_terminal=False))
    try:
        progress.update(RECORD)
    finally:
        progress.close()
    line = console_line(RECORD)
    assert "\n" not in line and line in out.getvalue()
    assert "reward 0.500" in line and "kl 0.0123" in line and "gen 1.2s" in line


def test_progress_bar_shows_eta_reward_and_kl():
    progress = Progress(total=10, enabled=True)
    try:
        progress._bar.console.quiet = True
        progress.update(RECORD)
        task = progress._bar.tasks[0]
        assert task.completed == 1 and task.total == 10
        assert "reward 0.500" in task.fields["info"] and "kl 0.0123" in task.fields["info"]
        columns = [type(c).__name__ for c in progress._bar.columns]
        assert "TimeRemainingColumn" in columns
    finally:
        progress.close()


def test_plain_line_when_bar_is_off(capsys):
    Progress(total=10, enabled=False).update({**RECORD, "kl": None})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "kl None" in out


def test_a_run_logs_one_line_per_step(tiny_cfg, capsys):
    from rlhf.trainers import Trainer

    steps = 3
    Trainer(tiny_cfg(f"train.steps={steps}", "log.trackers=[]")).train()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [int(ln.split()[1]) for ln in lines] == list(range(1, steps + 1))


def test_a_run_warns_once_about_a_step_without_signal(tiny_cfg, tmp_path, monkeypatch):
    from rlhf.trainers import Trainer

    monkeypatch.setattr(rlog, "_warned", set())
    (tmp_path / "flat.py").write_text("def flat(completions, **kw):\n    return [1.0] * len(completions)\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = Trainer(tiny_cfg("train.steps=3", "log.trackers=[]", "generation.max_new_tokens=2",
                                   f"reward.functions=[{{fn: '{tmp_path}/flat.py:flat'}}]")).train()
    assert all(r["frac_zero_std"] == 1.0 for r in records)
    ours = [str(w.message) for w in caught if issubclass(w.category, RlhfWarning)]
    assert sum("every advantage is 0" in m for m in ours) == 1 and ours[0].startswith("step 1:")
    assert sum("cut at generation.max_new_tokens" in m for m in ours) <= 1


def test_equal_group_rewards_warn_only_for_group_relative_advantages(monkeypatch):
    """With a critic (gae, td) or plain REINFORCE equal rewards still give advantages: no warning there."""
    monkeypatch.setattr(rlog, "_warned", set())
    record = {"step": 1, "frac_zero_std": 1.0, "reward/mean": 1.0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rlog.warn_about_step(record, group_relative=False)
        assert not [w for w in caught if issubclass(w.category, RlhfWarning)]
        rlog.warn_about_step(record, group_relative=True)
        assert sum("every advantage is 0" in str(w.message) for w in caught) == 1
