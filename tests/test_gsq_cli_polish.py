"""What a new user sees from the CLI: the training bar's ETA and losses, where a second run writes,
file modes, eval's worker count and messages, `gsq info --keys`."""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from pathlib import Path

import pytest
import tqdm.auto

from gsq import checkpoint as ckpt
from gsq import evaluate, extras
from gsq.cli import build_parser
from gsq.cli import main as gsq_main
from gsq.data import write_new
from gsq.train import time_to_stop, train
from gsq_runs import small_config

UMASK = 0o027  # not the usual 0o022, so a file made 0644 regardless of the umask is caught too


class RecordingBar(tqdm.auto.tqdm):
    """A progress bar that records (steps done, postfix) each time the postfix is set."""

    postfixes: list[tuple[int, str]] = []

    def set_postfix_str(self, s="", refresh=True):
        RecordingBar.postfixes.append((self.n, s))
        super().set_postfix_str(s, refresh)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh, **kwargs)
        RecordingBar.postfixes.append((self.n, self.postfix))


@pytest.fixture(scope="module")
def second_run(tmp_path_factory):
    """A 2-step run started where runs/tiny already holds one, under UMASK, with the bar on and
    log lines only every 100 steps: (runs root, its stdout, the bar's postfixes)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "tiny" / "checkpoints").mkdir(parents=True)
    (root / "tiny" / "checkpoints" / "latest").write_text("step_00000002\n")
    RecordingBar.postfixes = []
    out = io.StringIO()
    previous = os.umask(UMASK)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            patch.setattr(tqdm.auto, "tqdm", RecordingBar)
            config = small_config(
                root, "train.steps=2", "train.log_every=100", "train.checkpoint_every=2", "data.image_size=16"
            )
            train(config, progress=True)
    finally:
        os.umask(previous)
    return root, out.getvalue(), list(RecordingBar.postfixes)


def test_a_second_run_prints_the_folder_it_writes_to(second_run):
    root, out, _ = second_run
    assert f"this run writes to {root / 'tiny-2'}" in out
    assert (root / "tiny-2" / "checkpoints" / "step_00000002" / "state.json").is_file()


def test_checkpoint_files_follow_the_umask(second_run):
    root, _, _ = second_run
    folder = root / "tiny-2" / "checkpoints" / "step_00000002"
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
    assert "training_state.safetensors" in modes and "ema.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~UMASK), modes


def test_written_outputs_follow_the_umask(tmp_path):
    previous = os.umask(UMASK)
    try:
        path = write_new(tmp_path / "report.json", lambda temporary: temporary.write_text("{}"), overwrite=False)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK


def test_the_bar_shows_losses_from_the_first_step(second_run):
    _, _, postfixes = second_run
    first = [text for done, text in postfixes if done == 0]  # set during step 1, long before log_every
    assert first and "rec=" in first[0] and "q=" in first[0] and "(steps)" in first[0], postfixes


def test_time_to_stop_is_whichever_stop_comes_first():
    # 100 steps in 60 s: 10,000 more steps take 100 minutes, but the 14-minute limit stops it at 13
    assert time_to_stop(100, 10_000, 60.0, 14) == (13 * 60, "time limit")
    assert time_to_stop(100, 100, 60.0, 14) == (60.0, "steps")
    assert time_to_stop(100, 10_000, 60.0, 0) == (6000.0, "steps")  # no time limit
    assert time_to_stop(0, 5, 1.0, 0) == (math.inf, "steps")
    assert time_to_stop(10, 10, 900.0, 14) == (0.0, "time limit")  # past the limit: never negative


def test_eval_workers_default_to_the_cores_available(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert evaluate.default_workers() == 2 and evaluate.EvalConfig("run").num_workers == 2
    seen = []
    monkeypatch.setattr(extras, "require_for_evaluation", lambda: None)
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", seen.append)
    assert gsq_main(["eval", "run", "--no-progress"]) == 0
    assert seen[0].num_workers == 2
    assert gsq_main(["eval", "run", "--num-workers", "3", "--no-progress"]) == 0
    assert seen[1].num_workers == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert evaluate.default_workers() == 4


def test_inception_weights_help_names_the_file_looked_for():
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    (option,) = [action for action in eval_parser._actions if action.dest == "inception_weights"]
    assert Path(fidelity.URL_INCEPTION_V3).name in option.help


def test_eval_of_a_run_without_checkpoint_says_so(tmp_path):
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "config.json").write_text(small_config(tmp_path).to_json())
    with pytest.raises(ckpt.CheckpointError, match=r"tiny has no checkpoint yet \(train it first, or pass a"):
        ckpt.find_checkpoint(run)
    with pytest.raises(ckpt.CheckpointError, match="is not a checkpoint folder"):
        ckpt.find_checkpoint(tmp_path)  # not a run folder either


def test_info_keys_show_types_and_values(capsys):
    assert gsq_main(["info", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.fullmatch(r"train\.steps +int +\d+", line) for line in lines), lines
    assert any(re.fullmatch(r"optim\.betas +tuple\[float, float\] +\[0\.9, 0\.99\]", line) for line in lines)
    assert any(re.fullmatch(r"data\.path +str +\"\"", line) for line in lines)
    assert gsq_main(["info", "--keys", "F8-D64-G16-V8k"]) == 0
    assert re.search(r"^model\.codebook_size +int +8192$", capsys.readouterr().out, re.M)
