"""transformer/outputs.py: a training run never replaces a file it did not write itself.

Most cases run train.main in this process on a tiny model (S below, well under a second a
run); the signals and the lock held by another process run train.py as a subprocess. Each
case is a row of docs/robustness.md ("Never losing work").
"""
import errno
import json
import os
import re
import shutil
import signal
import time
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from transformer import outputs
from transformer.errors import UserError
from transformer.outputs import RunOutputs, lock_path, metrics_path, remove_stale_temps
from transformer.state import load_state

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # train.py is a script at the repository root
    sys.path.insert(0, str(REPO))
import train  # noqa: E402

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
WORDS = ("the module returns a list of values from the file path and raises an error when "
         "the string is not a number so call this function with care").split()
S = ["--d-model", "16", "--num-blocks", "1", "--num-heads", "2", "--context-length", "16",
     "--batch-size", "2", "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2",
     "--compact-vocab", "--no-progress"]
OLD_NS = 1_000_000_000 * 10**9  # a write to a protected file moves its mtime off this


def text(n=400):
    import random
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "\n"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(text())
    return path


def main(*args):
    """train.main on args (paths as str); its exit code."""
    return train.main([str(a) for a in args])


def one_error(capsys, pattern):
    """The single stderr line, which must match pattern."""
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert re.search(pattern, err[0]), err[0]
    return err[0]


def state(*paths):
    """(bytes, mtime) of each path, None when absent."""
    return [(p.read_bytes(), p.stat().st_mtime_ns) if p.exists() else None for p in map(Path, paths)]


def finished_run(data, out, capsys, *extra):
    """A complete S run at out, its checkpoint and metrics protected by an old mtime."""
    assert main("--data", data, "--out", out, *S, *extra) == 0
    capsys.readouterr()
    for path in (out, metrics_path(str(out))):
        os.utime(path, ns=(OLD_NS, OLD_NS))
    return out


# ---- a second run is refused, not silently replacing the first ---------------------------

@pytest.mark.parametrize("extra", [[], ["--learning-rate", "1e30"]], ids=["plain", "failing-run"])
def test_a_second_run_does_not_replace_a_finished_one(data, tmp_path, capsys, extra):
    """Issue 13.1 and 16.4: a new run on an earlier run's --out is refused before any work;
    a run that would fail (exit 3) does not get to truncate the earlier metrics either."""
    out = finished_run(data, tmp_path / "m.ckpt", capsys)
    before = state(out, tmp_path / "m.metrics.jsonl")
    assert main("--data", data, "--out", out, *S, *extra) == 2
    one_error(capsys, rf"^error: {re.escape(str(out))} already exists \(an earlier run's checkpoint\); "
                      rf"continue that run with --resume {re.escape(str(out))}, replace it with "
                      r"--overwrite, or choose a new --out$")
    assert state(out, tmp_path / "m.metrics.jsonl") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "m.ckpt", "m.metrics.jsonl"]


def test_the_default_out_is_refused_too(data, tmp_path, capsys, monkeypatch):
    """The new user's case: `python train.py` twice in one folder."""
    monkeypatch.chdir(tmp_path)
    finished_run(data, Path("model/model.ckpt"), capsys)
    before = state("model/model.ckpt", "model/model.metrics.jsonl")
    assert main("--data", data, *S) == 2
    one_error(capsys, r"^error: model/model\.ckpt already exists .*--resume model/model\.ckpt, .*--overwrite")
    assert state("model/model.ckpt", "model/model.metrics.jsonl") == before


def test_a_metrics_file_alone_is_refused(data, tmp_path, capsys):
    out = tmp_path / "m.ckpt"
    (tmp_path / "m.metrics.jsonl").write_text('{"step": 0, "train_loss": 1, "valid_loss": 1}\n')
    before = state(tmp_path / "m.metrics.jsonl")
    assert main("--data", data, "--out", out, *S) == 2
    one_error(capsys, r"^error: .*m\.metrics\.jsonl already exists \(an earlier run's metrics, without its "
                      r"checkpoint .*m\.ckpt\); replace it with --overwrite, or choose a new --out$")
    assert state(tmp_path / "m.metrics.jsonl") == before and not out.exists()


def test_an_empty_metrics_file_holds_nothing_to_refuse(data, tmp_path, capsys):
    """A run killed (SIGKILL) before its first evaluation leaves an empty metrics file: no work."""
    (tmp_path / "m.metrics.jsonl").write_text("")
    assert main("--data", data, "--out", tmp_path / "m.ckpt", *S) == 0
    assert [json.loads(x)["step"] for x in open(tmp_path / "m.metrics.jsonl")] == [0, 10, 19]


def test_resuming_into_another_existing_out_is_refused(data, tmp_path, capsys):
    first = finished_run(data, tmp_path / "a.ckpt", capsys)
    other = finished_run(data, tmp_path / "b.ckpt", capsys)
    before = state(first, other, tmp_path / "b.metrics.jsonl")
    assert main("--data", data, "--resume", first, "--out", other, "--max-iters", "30") == 2
    one_error(capsys, r"^error: .*b\.ckpt already exists and is not the run being resumed; "
                      r"leave out --out to continue .*a\.ckpt in place, replace it with --overwrite")
    assert state(first, other, tmp_path / "b.metrics.jsonl") == before


def test_overwrite_replaces_both_files(data, tmp_path, capsys):
    out = finished_run(data, tmp_path / "m.ckpt", capsys)
    assert main("--data", data, "--out", out, *S, "--max-iters", "5", "--overwrite") == 0
    assert load_state(out)[1]["step"] == 5
    steps = [json.loads(line)["step"] for line in open(tmp_path / "m.metrics.jsonl")]
    assert steps == [0, 4]  # the earlier run's 0, 10, 19 are gone
    assert not Path(lock_path(str(out))).exists()


def test_resuming_in_place_appends(data, tmp_path, capsys):
    out = finished_run(data, tmp_path / "m.ckpt", capsys)
    earlier = (tmp_path / "m.metrics.jsonl").read_text()
    assert main("--data", data, "--resume", out, "--max-iters", "25") == 0
    assert load_state(out)[1]["step"] == 25
    later = (tmp_path / "m.metrics.jsonl").read_text()
    assert later.startswith(earlier) and [json.loads(x)["step"] for x in later.splitlines()] == [0, 10, 19, 20, 24]


@pytest.mark.parametrize("max_iters", [10, 20])
def test_resume_needs_more_iterations_than_the_checkpoint_has(data, tmp_path, capsys, max_iters):
    """Issue 16.1: --max-iters 10 on a step-20 checkpoint rewrote it as 'step 10' with step-20
    weights and AdamW t=20; now refused in one line, the checkpoint untouched."""
    out = finished_run(data, tmp_path / "m.ckpt", capsys)
    before = state(out, tmp_path / "m.metrics.jsonl")
    assert main("--data", data, "--resume", out, "--max-iters", max_iters) == 2
    one_error(capsys, rf"^error: checkpoint .*m\.ckpt is at step 20, so --max-iters must be more than 20 "
                      rf"to continue it \(got {max_iters}\)$")
    assert state(out, tmp_path / "m.metrics.jsonl") == before


def test_resuming_a_finished_run_says_to_give_a_larger_max_iters(data, tmp_path, capsys):
    """The README's `--resume model/model.ckpt` on a run that ended: the refusal names the flag
    and gives a command that works."""
    out = finished_run(data, tmp_path / "m.ckpt", capsys)
    before = state(out, tmp_path / "m.metrics.jsonl")
    assert main("--data", data, "--resume", out) == 2
    one_error(capsys, rf"^error: checkpoint {re.escape(str(out))} is at step 20, where its run ended "
                      rf"\(--max-iters 20\); to train it further give a larger --max-iters, e\.g\. "
                      rf"python train\.py --resume {re.escape(str(out))} --max-iters 40$")
    assert state(out, tmp_path / "m.metrics.jsonl") == before
    assert main("--data", data, "--resume", out, "--max-iters", "40") == 0


def test_a_run_that_saved_nothing_leaves_nothing(data, tmp_path, capsys):
    """Issue 22: a run blowing up before its first save said "nothing was saved" yet left its
    metrics, which refused the same command run again; now it leaves no file, and the rerun works."""
    out = tmp_path / "m.ckpt"
    assert main("--data", data, "--out", out, *S, "--learning-rate", "1e30", "--eval-interval", "1",
                "--save-interval", "0") == 3  # evaluated every step, saved only at the end
    one_error(capsys, r"^error: at step \d+ .* is not finite; stopping \(nothing was saved\)\. ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]
    assert main("--data", data, "--out", out, *S) == 0


# ---- outputs that would replace an input or a special file -------------------------------

def make_case(tmp_path, data, case):
    """(argv, paths that must keep their bytes) for one bad --out."""
    if case == "out-is-the-data":
        return ["--data", data, "--out", data, "--overwrite"], [data]
    if case == "metrics-is-the-data":
        d = tmp_path / "x.metrics.jsonl"
        shutil.copy(data, d)
        return ["--data", d, "--out", tmp_path / "x.ckpt", "--overwrite"], [d]
    if case == "out-is-a-hard-link-to-the-data":
        os.link(data, tmp_path / "linked.ckpt")
        return ["--data", data, "--out", tmp_path / "linked.ckpt", "--overwrite"], [data]
    if case == "out-is-a-fifo":
        os.mkfifo(tmp_path / "fifo.ckpt")
        return ["--data", data, "--out", tmp_path / "fifo.ckpt", "--overwrite"], []
    if case == "out-is-a-device":  # a copy of /dev/null's node: replacing it harms nothing else
        try:
            os.mknod(tmp_path / "device.ckpt", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError as e:
            pytest.skip(f"cannot make a device node here ({e}); out-is-a-fifo covers the same check")
        return ["--data", data, "--out", tmp_path / "device.ckpt", "--overwrite"], []
    if case == "metrics-is-a-directory":
        (tmp_path / "m.metrics.jsonl").mkdir()
        return ["--data", data, "--out", tmp_path / "m.ckpt"], []
    if case == "metrics-is-a-symlink":
        (tmp_path / "m.metrics.jsonl").symlink_to(data)
        return ["--data", tmp_path / "other.txt", "--out", tmp_path / "m.ckpt", "--overwrite"], [data]
    if case == "out-ends-in-a-slash":
        return ["--data", data, "--out", str(tmp_path / "newdir") + "/"], []
    raise ValueError(case)


BAD_OUT = [
    ("out-is-the-data", r"--out .*data\.txt would overwrite the input .*data\.txt with its checkpoint"),
    ("metrics-is-the-data", r"--out .*x\.ckpt would overwrite the input .*x\.metrics\.jsonl with its metrics file"),
    ("out-is-a-hard-link-to-the-data", r"--out .*linked\.ckpt would overwrite the input .*data\.txt"),
    ("out-is-a-fifo", r"--out .*fifo\.ckpt is not a regular file \(a device, FIFO or socket\)"),
    ("out-is-a-device", r"--out .*device\.ckpt is not a regular file \(a device, FIFO or socket\)"),
    ("metrics-is-a-directory", r"the metrics file .*m\.metrics\.jsonl is a directory"),
    ("metrics-is-a-symlink", r"the metrics file .*m\.metrics\.jsonl is a symbolic link"),
    ("out-ends-in-a-slash", r"--out .*newdir/ ends in a slash, so it names a folder; give a file path such as "
                            r".*newdir/model\.ckpt"),
]


@pytest.mark.parametrize("case, message", BAD_OUT, ids=[c for c, _ in BAD_OUT])
def test_an_output_never_replaces_an_input_or_a_special_file(data, tmp_path, capsys, case, message):
    """Issue 16.2 and the trailing slash: one line, exit 2, nothing written or replaced."""
    (tmp_path / "other.txt").write_text(text(300))
    argv, kept = make_case(tmp_path, data, case)
    before_names = sorted(p.name for p in tmp_path.iterdir())
    before = state(*kept)
    fifo = tmp_path / "fifo.ckpt"
    assert main(*argv, *S) == 2
    one_error(capsys, message)
    assert state(*kept) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == before_names
    if case == "out-is-a-fifo":
        assert fifo.is_fifo()
    if case == "out-is-a-device":
        assert (tmp_path / "device.ckpt").is_char_device()


# ---- one run per output: the lock ------------------------------------------------------

def test_a_second_run_on_a_running_out_is_refused(data, tmp_path, capsys):
    """Issue 16.3: while one train.py writes m.ckpt, a second one (even with --overwrite, or a
    --resume of the same file) stops in one line; the first run's metrics get no lines of it."""
    out = tmp_path / "m.ckpt"
    first = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--out", str(out), *S,
                              "--max-iters", "100000", "--eval-interval", "100000", "--save-interval", "0"],
                             cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("Step: 0"):
                break
        assert main("--data", data, "--out", out, *S, "--overwrite") == 2
        one_error(capsys, rf"^error: another training run \(pid {first.pid}\) is writing .*m\.ckpt; "
                          r"wait for it to finish or choose another --out$")
        assert Path(lock_path(str(out))).read_text() == f"{first.pid}\n"  # still the first run's
        first.send_signal(signal.SIGINT)
        rest, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130, rest + err
    assert [json.loads(x)["step"] for x in open(tmp_path / "m.metrics.jsonl")] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "m.ckpt", "m.metrics.jsonl"]


def test_two_checkpoints_with_one_stem_share_a_lock(tmp_path):
    """m.ckpt and m.pt would write one m.metrics.jsonl: the second claim is refused."""
    first = RunOutputs(str(tmp_path / "m.ckpt")).claim()
    try:
        with pytest.raises(UserError, match=rf"another training run \(pid {os.getpid()}\) is writing .*m\.pt"):
            RunOutputs(str(tmp_path / "m.pt")).claim()
        first.log({"step": 0, "train_loss": 1.0})
        first.wrote_checkpoint()  # else release() removes the metrics of a run that saved nothing
    finally:
        first.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.metrics.jsonl"]  # the lock file is gone


def test_a_claim_after_a_finished_run_sees_its_files(tmp_path):
    """Two fresh runs racing on a new out: the one that locks second finds the first's metrics."""
    first = RunOutputs(str(tmp_path / "m.ckpt"))
    first.check()
    second = RunOutputs(str(tmp_path / "m.ckpt"))
    second.check()  # both looked before either wrote
    first.claim().log({"step": 0, "train_loss": 1.0})
    first.wrote_checkpoint()
    first.release()
    with pytest.raises(UserError, match=r"m\.metrics\.jsonl already exists"):
        second.claim()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.metrics.jsonl"]


def test_a_failed_run_leaves_no_new_folder(data, tmp_path, capsys, monkeypatch):
    """The lock makes --out's folders; a run stopped before it saves removes them again."""
    out = tmp_path / "new" / "deeper" / "m.ckpt"
    from transformer import progress
    monkeypatch.setattr(progress, "progress_bar", lambda *a, **k: (_ for _ in ()).throw(UserError("stop here")))
    assert main("--data", data, "--out", out, *S) == 2
    one_error(capsys, r"^error: stop here$")
    assert list(tmp_path.iterdir()) == [data]


# ---- the folder removed mid-run, a full disk at the metrics file -----------------------

def test_removing_the_out_folder_mid_run_stops_without_recreating_it(data, tmp_path, capsys, monkeypatch):
    """Issue 16.4: `rm -rf` of --out's folder at step 5: the run stops at its next metrics write
    or save, says so, and does not recreate the folder (which used to come back, metrics lost,
    "Model saved")."""
    out = tmp_path / "run" / "m.ckpt"
    calls = []

    def get_batch(*args):
        calls.append(1)
        if len(calls) == 2 * 2 + 5:  # after the step-0 evaluation's 2 + 2 batches, at step 5
            shutil.rmtree(tmp_path / "run")
        return real(*args)
    real = train.get_batch
    monkeypatch.setattr(train, "get_batch", get_batch)
    assert main("--data", data, "--out", out, *S) == 2
    one_error(capsys, r"^error: .*run/m\.metrics\.jsonl was removed or replaced during the run \(was its "
                      r"folder deleted\?\); stopping at step 10 without saving, so nothing is recreated$")
    assert not (tmp_path / "run").exists()


class FullDisk:
    """A file whose second flush fails as a full disk does."""

    def __init__(self, f):
        self.f, self.flushes = f, 0

    def write(self, s):
        return self.f.write(s)

    def flush(self):
        self.flushes += 1
        if self.flushes >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        raise OSError(errno.ENOSPC, "No space left on device")  # close flushes too


def test_a_full_disk_at_the_metrics_file_is_one_line(data, tmp_path, capsys, monkeypatch):
    real_open = open
    monkeypatch.setattr(outputs, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    out = tmp_path / "m.ckpt"
    assert main("--data", data, "--out", out, *S) == 2
    one_error(capsys, r"^error: cannot write the metrics file .*m\.metrics\.jsonl \(No space left on device\); "
                      r"stopping at step 10 \(the last checkpoint at .*m\.ckpt, if any, is kept\)$")
    assert load_state(out)[1]["step"] == 10  # the save at step 10 came before the evaluation's line
    assert not Path(lock_path(str(out))).exists()


# ---- signals and stale temp files (subprocesses) ---------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_saves_like_ctrl_c(data, tmp_path, sig):
    """Issue 16.5: SIGTERM (kill, a job scheduler's stop) or SIGHUP (the terminal closed) used to
    end the run unsaved; now the step finishes, is saved, and the run exits 128 + the signal's
    number with the resume hint."""
    out = tmp_path / "m.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--out", str(out), *S,
                             "--max-iters", "100000", "--eval-interval", "100000"],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("Step: 0"):
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    stdout = "".join(seen) + rest
    assert proc.returncode == 128 + sig, stdout + err
    assert "Traceback" not in stdout + err
    match = re.search(rf"^Interrupted by {sig.name} after step (\d+); checkpoint saved to (.+)\. "
                      r"Resume with: python train\.py --resume (.+)$", stdout, re.M)
    assert match, stdout
    assert load_state(out)[1]["step"] == int(match[1]) >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "m.ckpt", "m.metrics.jsonl"]


def test_a_signal_ignored_from_the_start_stays_ignored(data, tmp_path):
    """`nohup train.py &` ignores SIGHUP (and a script's background job SIGINT): the run must not
    take them back and stop when the terminal closes."""
    out = tmp_path / "m.ckpt"

    def ignore():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--out", str(out), *S,
                             "--max-iters", "60", "--eval-interval", "100000"], preexec_fn=ignore,
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("Step: 0"):
                proc.send_signal(signal.SIGHUP)
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, rest + err
    assert "Interrupted" not in rest and load_state(out)[1]["step"] == 60


def dead_pid():
    """The id of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_runs_are_removed(data, tmp_path, capsys):
    """Issue 16.5: a run killed mid-save leaves m.ckpt.tmp.<pid> (80-140 MB in the book's
    config); the next run on m.ckpt removes it, but not a live process's."""
    out = finished_run(data, tmp_path / "m.ckpt", capsys)
    stale = tmp_path / f"m.ckpt.tmp.{dead_pid()}"
    live = tmp_path / f"m.ckpt.tmp.{os.getppid()}"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    assert main("--data", data, "--resume", out, "--max-iters", "21") == 0
    assert not stale.exists() and live.exists()
    assert remove_stale_temps(str(out)) == []


def test_remove_stale_temps_ignores_other_names(tmp_path):
    pid = dead_pid()
    names = [f"m.ckpt.tmp.{pid}", f"m.ckpt.tmp.{pid}x", f"m.ckptx.tmp.{pid}", f"m.ckpt.tmp.{os.getpid()}"]
    for name in names:
        (tmp_path / name).write_text("")
    assert remove_stale_temps(str(tmp_path / "m.ckpt")) == [str(tmp_path / names[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_file_that_is_not_a_lock_is_left_alone(tmp_path):
    """m.run.lock holding anything but a process id is someone's file: refused, not rewritten."""
    path = Path(lock_path(str(tmp_path / "m.ckpt")))
    path.write_text("my notes about the run\n")
    with pytest.raises(UserError, match=r"m\.run\.lock exists and is not a lock file of train\.py; move it away"):
        RunOutputs(str(tmp_path / "m.ckpt")).claim()
    assert path.read_text() == "my notes about the run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.run.lock"]


def test_lock_file_is_removed_and_stale_one_reused(tmp_path):
    """A killed run leaves its lock file, unlocked: the next run takes it over."""
    path = lock_path(str(tmp_path / "m.ckpt"))
    Path(path).write_text("12345\n")
    run = RunOutputs(str(tmp_path / "m.ckpt")).claim()
    assert Path(path).read_text() == f"{os.getpid()}\n"
    run.release()
    assert not Path(path).exists()


# ---- counts of 10^12: streamed, and a signal stops them at once -------------------------

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.parametrize("flag", ["--eval-iters", "--grad-accum-steps"])
def test_a_count_of_10_to_the_12_streams_and_sigterm_stops_it_at_once(data, tmp_path, flag):
    """Issue 23.1 and 23.2: --eval-iters or --grad-accum-steps 10^12 built every batch up front
    (gigabytes, SIGTERM ignored).  Now batches are drawn one at a time, so memory stays flat while
    it runs; SIGTERM mid-phase saves the last whole step (0 here: the phase never ends) at once."""
    out = tmp_path / "m.ckpt"
    args = [*S, "--max-iters", "3", flag, str(10**12)]
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--out", str(out), *args],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("Model:"):
                break
        time.sleep(2)  # well into the endless evaluation or accumulation
        early = rss_kb(proc.pid)
        time.sleep(2)
        late = rss_kb(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest + err
    assert late - early < 5_000, f"memory grew by {late - early} kB in 2 s"
    assert took < 3, f"{took:.1f} s from SIGTERM to exit"  # a tiny model: milliseconds per batch
    assert "Interrupted by SIGTERM after step 0; checkpoint saved to" in rest
    assert load_state(out)[1]["step"] == 0


@pytest.mark.parametrize("how", ["check", "claim"])
def test_a_fifo_at_the_lock_file_is_refused(data, tmp_path, capsys, how):
    """Issue 23.10: a FIFO at <out>.run.lock gave `OSError: Illegal seek` (os.pread) as a traceback.
    Refused by train.py's checks, and by claim() itself (the lock opened without blocking and
    checked on the open file), should one appear between the two."""
    fifo = Path(lock_path(str(tmp_path / "m.ckpt")))
    os.mkfifo(fifo)
    if how == "check":
        assert main("--data", data, "--out", tmp_path / "m.ckpt", *S) == 2
        one_error(capsys, r"the lock file .*m\.run\.lock is not a regular file \(a device, FIFO or socket\)")
    else:
        with pytest.raises(UserError, match=r"the lock file .*m\.run\.lock is not a regular file .*move it away"):
            RunOutputs(str(tmp_path / "m.ckpt")).claim()
    assert fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "m.run.lock"]


# ---- the one output rule of every command (check_output) --------------------------------

def test_check_output_refuses_inputs_and_special_files_whatever_the_flags(tmp_path):
    """One rule for train.py, convert, plot and inspect: never a directory, device, FIFO or
    an input (by path, hard link or symbolic link); a new path or a regular file is fine."""
    given = tmp_path / "in.txt"
    given.write_text("x")
    os.link(given, tmp_path / "hard.txt")
    os.symlink(given, tmp_path / "soft.txt")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    outputs.check_output(str(tmp_path / "new" / "out.ckpt"), "--out", inputs=[str(given)])
    outputs.check_output(str(tmp_path / "hard.txt"), "--out", inputs=[])
    for path, message in [(given, "is the input"), (tmp_path / "hard.txt", "is the input"),
                          (tmp_path / "soft.txt", "is the input"), (tmp_path / "fifo", "is not a regular file"),
                          (tmp_path / "dir", "is a directory")]:
        with pytest.raises(UserError, match=message):
            outputs.check_output(str(path), "--out", inputs=[str(given)])


def test_check_png_output_replaces_only_an_earlier_png(tmp_path):
    png, notes = tmp_path / "a.png", tmp_path / "b.png"
    png.write_bytes(outputs.PNG_MAGIC + b"rest")
    notes.write_text("my notes")
    outputs.check_png_output(str(png), "--out")
    outputs.check_png_output(str(tmp_path / "new.png"), "--out")
    with pytest.raises(UserError, match=r"b\.png exists and is not a PNG; drawing would replace it"):
        outputs.check_png_output(str(notes), "--out")
    assert notes.read_text() == "my notes"
