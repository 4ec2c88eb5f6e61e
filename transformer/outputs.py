"""The files a training run writes, kept safe: a run never replaces what it did not write itself.

    outputs = RunOutputs(out, resume=..., overwrite=..., inputs=[data, resume])
    outputs.check()     # before any work: refuse an earlier run's files, inputs, non-regular files
    outputs.claim()     # lock, remove dead runs' temp files, open the metrics file
    outputs.log(record) # one JSON line, flushed; stops the run if the folder was removed
    outputs.release()   # close, unlock, remove the lock file (and the new metrics file of a
                        # run that wrote no checkpoint: nothing was saved, so nothing is left)

One run writes `out` (the checkpoint, always by temp file + rename), `<stem>.metrics.jsonl`
beside it and, while it runs, the lock file `<stem>.run.lock`, where `<stem>` is `out`
without its extension. Two checkpoints with one stem share a metrics file, so the lock is
taken on the stem. docs/robustness.md lists what each refusal says.
"""
import contextlib
import errno
import fcntl
import glob
import json
import os
import signal
import stat

from .errors import UserError

DEFAULT_FOLDER = "model"
DEFAULT_OUT = os.path.join(DEFAULT_FOLDER, "model.ckpt")
METRICS_LINE = 1 << 16  # bytes: a metrics record is about 150


def metrics_path(out):
    """model/model.ckpt -> model/model.metrics.jsonl"""
    return os.path.splitext(out)[0] + ".metrics.jsonl"


def lock_path(out):
    """model/model.ckpt -> model/model.run.lock"""
    return os.path.splitext(out)[0] + ".run.lock"


def same_file(a, b):
    """True when paths a and b name one file: the same inode (links, symlinks) or the same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def check_not_special(path, what):
    """UserError when path exists but is not a regular file (a device, a FIFO, a socket, a folder)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {path} is a directory; remove it or choose another path")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file (a device, FIFO or socket); "
                        "writing would replace it, so choose another path")


def check_default_folder(path):
    """UserError when the default path model/... is wanted but `model` is a file (an --out model run)."""
    if path == DEFAULT_OUT and os.path.isfile(DEFAULT_FOLDER):
        raise UserError(f"the default checkpoint {DEFAULT_OUT} needs a folder {DEFAULT_FOLDER}, but "
                        f"{DEFAULT_FOLDER} is a file (a run saved with --out {DEFAULT_FOLDER}?); "
                        f"pass it by name (--resume {DEFAULT_FOLDER}, --ckpt {DEFAULT_FOLDER}) "
                        "or give another --out")


def check_writable_folder(out, flag="--out"):
    """UserError unless a file can be created at out (its missing folders made on the way),
    found before any work.  flag names the option in the message ("" for a plain argument)."""
    named = f"{flag} {out}" if flag else f"{out}"
    other = f"another {flag}" if flag else "another path"
    if os.path.isdir(out):
        raise UserError(f"{named} is a directory; give a file path such as "
                        f"{os.path.join(out, 'model.ckpt')}")
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):  # the nearest folder that exists; the rest will be created
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{named} cannot be created because {folder} is a file; choose {other}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{named} cannot be written: no write permission in {folder}; choose {other}")


def check_output(path, flag, inputs=()):
    """The one rule for every file a command writes (train.py's checkpoint, convert's output,
    plot's and inspect's PNGs): UserError unless path can be created in a folder we may write,
    is a regular file or nothing yet (never a directory, device, FIFO or socket), and is none
    of inputs (not the same path, link or inode).  --force and --overwrite decide only whether
    an earlier output may be replaced; they never widen this.  flag names the path in messages
    ("--out", or "" for a plain argument)."""
    check_writable_folder(path, flag)
    named = f"{flag} {path}" if flag else path
    check_not_special(path, flag or "the output")
    for given in inputs:
        if given and same_file(path, given):
            raise UserError(f"{named} is the input {given}; writing would replace it, so choose another path")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png_output(path, flag, inputs=(), doing="drawing"):
    """check_output, and an existing file at path (or that a link there points to) must be a
    PNG, an earlier plot or map to replace, never someone's other file that happens to have the
    name.  doing names the command's work in the message ("plotting")."""
    check_output(path, flag, inputs)
    if not os.path.exists(path):
        return
    named = f"{flag} {path}" if flag else path
    try:
        with open(path, "rb") as f:  # check_output found a regular file: opening cannot block
            is_png = f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}) to check that it is an earlier image; "
                        "choose another path") from e
    if not is_png:
        raise UserError(f"{named} exists and is not a PNG; {doing} would replace it, so choose another path")


@contextlib.contextmanager
def replacing(path):
    """with replacing(path) as tmp: write tmp.  On success tmp replaces path (os.replace, so a
    reader never sees half a file and a link at path is replaced, not followed); on any failure
    tmp is removed and path is untouched.  tmp is <path>.tmp.<pid>, the name remove_stale_temps
    cleans up after a killed process."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def pid_alive(pid):
    """True when a process with this id exists (it may belong to someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path):
    """Remove `<path>.tmp.<pid>` files whose writer has died (SIGKILL, power cut mid-save)."""
    removed = []
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = tmp.rsplit(".", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            try:
                os.remove(tmp)
                removed.append(tmp)
            except OSError:
                pass
    return removed


class RunOutputs:
    """The checkpoint, metrics file and lock of one training run."""

    def __init__(self, out, resume=None, overwrite=False, inputs=()):
        self.out = out
        self.resume = resume
        self.overwrite = overwrite
        self.inputs = [path for path in inputs if path]
        self.metrics_path = metrics_path(out)
        self.lock_path = lock_path(out)
        self.metrics = None  # the open metrics file, after claim()
        self.lock = None  # the lock file's descriptor, after claim()
        self.created = []  # folders claim() made, deepest last
        self.new_metrics = False  # whether claim() created the metrics file (not appending to one)
        self.saved = False  # whether this run has written its checkpoint (wrote_checkpoint)

    # ---- before any work -------------------------------------------------------------------

    def check(self):
        """UserError, one sentence, if this run could replace a file it did not write."""
        out = self.out
        if out == "":
            raise UserError("--out is empty; give a checkpoint path such as model/model.ckpt")
        if out.endswith(("/", os.sep)) and not os.path.isdir(out):
            raise UserError(f"--out {out} ends in a slash, so it names a folder; give a file path "
                            f"such as {os.path.join(out, 'model.ckpt')}")
        check_default_folder(out)
        check_output(out, "--out")  # the inputs below: the checkpoint may continue the one resumed
        check_not_special(self.metrics_path, "the metrics file")
        check_not_special(self.lock_path, "the lock file")
        if os.path.islink(self.metrics_path):
            raise UserError(f"the metrics file {self.metrics_path} is a symbolic link; writing would "
                            "change the file it points to, so remove the link or choose another --out")
        for output in (out, self.metrics_path, self.lock_path):
            for given in self.inputs:
                if same_file(output, given) and not (output == out and self.continues(given)):
                    kind = {out: "checkpoint", self.metrics_path: "metrics file"}.get(output, "lock file")
                    raise UserError(f"--out {out} would overwrite the input {given} with its {kind}; "
                                    "choose another --out")
        self.check_unclaimed()

    def continues(self, path):
        """True when this run resumes path and writes its checkpoint back there."""
        return self.resume is not None and same_file(path, self.resume) and same_file(self.out, self.resume)

    def check_unclaimed(self):
        """UserError if out or its metrics file holds an earlier run's work this run may not replace."""
        if self.overwrite or (self.resume is not None and same_file(self.out, self.resume)):
            return
        for path, what in ((self.out, "checkpoint"), (self.metrics_path, "metrics")):
            if path == self.metrics_path and os.path.isfile(path) and not os.path.islink(path) \
                    and os.path.getsize(path) == 0:
                continue  # no evaluation in it (a run killed before its first): nothing to lose
            if os.path.lexists(path):
                if self.resume is not None:
                    raise UserError(f"{path} already exists and is not the run being resumed; leave out --out "
                                    f"to continue {self.resume} in place, replace it with --overwrite, "
                                    "or choose a new --out")
                if not os.path.lexists(self.out):  # metrics without a checkpoint: nothing to resume
                    raise UserError(f"{path} already exists (an earlier run's metrics, without its checkpoint "
                                    f"{self.out}); replace it with --overwrite, or choose a new --out")
                raise UserError(f"{path} already exists (an earlier run's {what}); continue that run with "
                                f"--resume {self.out}, replace it with --overwrite, or choose a new --out")

    # ---- while the run lasts ---------------------------------------------------------------

    def claim(self):
        """Make the folders, take the lock (or UserError), remove dead runs' temp files, open metrics."""
        folder = os.path.dirname(os.path.abspath(self.out))
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            for folder in reversed(missing):
                try:
                    os.mkdir(folder)
                except FileExistsError:
                    continue
                except OSError as e:
                    raise UserError(f"cannot create the folder {folder} for --out {self.out} "
                                    f"({e.strerror}); choose another --out") from e
                self.created.append(folder)
            self._lock()
            self.check_unclaimed()  # again, now that no other run can write here
            remove_stale_temps(self.out)
            self._open_metrics()
        except BaseException:
            self.release()
            raise
        return self

    def _lock(self):
        """An exclusive flock on <stem>.run.lock, held until release(); UserError if another run has it."""
        while True:
            try:  # O_NONBLOCK: a FIFO put there opens at once (and is refused below), never waits
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NONBLOCK, 0o644)
            except OSError as e:
                raise UserError(f"cannot create the lock file {self.lock_path} ({e.strerror}); "
                                "remove it or choose another --out") from e
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # the file opened, not the name: no race
                os.close(fd)
                raise UserError(f"the lock file {self.lock_path} is not a regular file (a device, FIFO "
                                "or socket); move it away or choose another --out")
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if holder and not holder.isdigit():  # someone's own file of that name: not ours to rewrite
                os.close(fd)
                raise UserError(f"{self.lock_path} exists and is not a lock file of train.py; "
                                "move it away or choose another --out")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {self.lock_path} ({e.strerror}); choose another --out") from e
                raise UserError(f"another training run{f' (pid {holder})' if holder.isdigit() else ''} "
                                f"is writing {self.out}; wait for it to finish or choose another --out") from None
            try:  # the file we locked may have been removed by a run that just finished: lock the new one
                if os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.lock = fd
        try:  # who holds it, for the message another run prints
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise UserError(f"cannot write the lock file {self.lock_path} ({e.strerror}); "
                            "free some space or choose another --out") from e

    def _open_metrics(self):
        """A resumed run appends to its metrics file; a new run starts one (never through a link)."""
        appending = self.resume is not None and same_file(self.out, self.resume)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if appending else os.O_EXCL)
        try:
            if not appending and os.path.lexists(self.metrics_path):
                os.remove(self.metrics_path)  # --overwrite, or empty: check_unclaimed refused it otherwise
            fd = os.open(self.metrics_path, flags, 0o644)
        except OSError as e:
            raise UserError(f"cannot open the metrics file {self.metrics_path} ({e.strerror}); "
                            "choose another --out") from e
        self.metrics = open(fd, "a", encoding="utf-8")
        self.new_metrics = not appending

    def check_present(self, step):
        """UserError if the metrics file (or its whole folder) was removed or replaced meanwhile."""
        try:
            now = os.stat(self.metrics_path)
            ours = os.fstat(self.metrics.fileno())
            present = (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)
        except OSError:
            present = False
        if not present:
            raise UserError(f"{self.metrics_path} was removed or replaced during the run (was its folder "
                            f"deleted?); stopping at step {step} without saving, so nothing is recreated")

    def log(self, record):
        """Append one evaluation as a JSON line and flush it; UserError if it cannot be written."""
        self.check_present(record["step"])
        try:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        except OSError as e:
            raise UserError(f"cannot write the metrics file {self.metrics_path} ({e.strerror or e}); "
                            f"stopping at step {record['step']} (the last checkpoint at {self.out}, "
                            "if any, is kept)") from e

    def logged(self, step):
        """True when the metrics file this run appends to already holds an evaluation at step:
        the resumed run made it after saving its checkpoint at step, then went on and stopped.
        Read a line at a time, each at most METRICS_LINE bytes (a longer one is no record of ours)."""
        if self.metrics is None or self.new_metrics:
            return False
        try:
            with open(os.open(self.metrics_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                for line in iter(lambda: f.readline(METRICS_LINE), b""):
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError):
                        continue
                    if isinstance(record, dict) and type(record.get("step")) is int and record["step"] == step:
                        return True
        except OSError:  # unreadable: evaluate again, as if it were not there
            return False
        return False

    def wrote_checkpoint(self):
        """This run's checkpoint is at out: its metrics describe a file that exists, so release() keeps them."""
        self.saved = True

    def release(self):
        """Close the metrics file, remove our lock file and unlock; remove folders claim() made if empty.
        A new metrics file goes too when the run wrote no checkpoint (it blew up, or failed, before its
        first save): "nothing was saved" leaves nothing that would refuse the run made again."""
        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            try:
                empty = os.fstat(metrics.fileno()).st_size == 0
                metrics.close()
            except OSError:  # a full disk at the last flush: log() has reported it already
                empty = False
            if (empty or not self.saved) and self.new_metrics:  # no evaluation, or no checkpoint: leave nothing
                try:
                    os.remove(self.metrics_path)
                except OSError:
                    pass
        if self.lock is not None:
            try:
                if os.stat(self.lock_path).st_ino == os.fstat(self.lock).st_ino:
                    os.remove(self.lock_path)
            except OSError:
                pass
            os.close(self.lock)  # closing releases the flock
            self.lock = None
        for folder in reversed(self.created):
            try:
                os.rmdir(folder)  # only when empty: a failed run leaves no folder behind
            except OSError:
                pass
        self.created = []


class Interrupts:
    """While active, SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) are only recorded;
    the loop checks and stops cleanly. A signal ignored from the start (`nohup`, a background job
    of a script) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.received = []  # signal numbers, in order
        self.previous = {}

    def start(self):
        """Record the signals from now on; returns self."""
        for sig in self.SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                self.previous[sig] = signal.signal(sig, lambda signum, _: self.received.append(signum))
        return self

    def stop(self):
        """Give the signals back to their earlier handlers."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __bool__(self):
        return bool(self.received)

    def exit_code(self):
        """128 + the first signal's number, as a shell reports a process it stopped: 130, 143, 129."""
        return 128 + self.received[0]

    def by(self):
        """'' for Ctrl-C, else ' by SIGTERM' (or SIGHUP): what the stop message names."""
        return "" if self.received[0] == signal.SIGINT else f" by {signal.Signals(self.received[0]).name}"
