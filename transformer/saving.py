"""Checkpoints written on a thread of their own while the loop goes on, and which ones to keep.

A checkpoint (200 MB in the book's config) takes a while to write.  The
evaluation that follows a save only reads the weights, so the write need
only be finished before the next step changes them: train.py calls
finish() right before each step.  One save at a time: both write to out.

--keep last (the default) saves every save_interval steps and at the end, so
out holds the last step.  --keep best saves right after each evaluation whose
validation loss is the lowest so far (nanoGPT's always_save_checkpoint=False),
and nothing else, so out holds the weights that evaluation saw; the checkpoint
records that loss (run.best_valid_loss), and a run resumed from it in place goes
on beating it.  A resumed --keep best run starts at the best step, and draws
what the first run drew from there (every draw is seeded by its step).
"""
import math
from concurrent.futures import ThreadPoolExecutor

from .checkpoint import save_checkpoint
from .errors import UserError
from .outputs import same_file


class CheckpointSaver:
    """save(step, contents) starts writing out; finish() waits for it (and raises its error).

    keep: "last" or "best" (above); best: (step, validation loss or None) of the checkpoint
    already at out that this run continues in place (continued_checkpoint), else None."""

    def __init__(self, out, outputs, enabled=True, keep="last", save_interval=0, best=None):
        self.out, self.outputs, self.enabled = out, outputs, enabled  # enabled: rank 0 alone writes
        self.keep, self.save_interval, self.best = keep, save_interval, best
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.writing = []  # the save in flight, if any

    def save(self, step, contents, wait=False):
        """contents: state.state_contents(...), taken now, before the weights change."""
        if not self.enabled:
            return
        self.finish()
        self.outputs.check_present(step)  # the folder removed meanwhile: stop, do not recreate it
        if self.keep == "best":
            contents[1]["run"]["best_valid_loss"] = self.best[1]
        self.writing.append(self.writer.submit(self._write, contents))
        if wait:
            self.finish()

    def _write(self, contents):
        save_checkpoint(self.out, *contents)
        self.outputs.wrote_checkpoint()  # its metrics now describe a checkpoint: release() keeps them

    def finish(self):
        try:
            while self.writing:
                self.writing.pop().result()  # a failed save raises its error here
        except OSError as e:  # a full disk, a folder removed meanwhile: save_checkpoint left out as it was
            raise UserError(f"cannot write the checkpoint {self.out} ({e.strerror or e}); "
                            "the file there, if any, is the last good one") from e

    def close(self):
        self.writer.shutdown(wait=True)  # a save in flight completes, whatever stopped the loop

    # ---- when to save: snapshot() makes the contents, only when a save is due ------------------

    def evaluated(self, step, valid_loss, snapshot):
        """--keep best: save the weights just evaluated if valid_loss is the lowest yet."""
        if self.keep == "best" and math.isfinite(valid_loss) and (
                self.best is None or self.best[1] is None or valid_loss < self.best[1]):
            self.best = (step, valid_loss)
            self.save(step, snapshot())

    def stepped(self, done, max_iters, snapshot):
        """--keep last: save every save_interval steps (the end saves in ended())."""
        if self.keep == "last" and self.save_interval and done % self.save_interval == 0 and done < max_iters:
            self.save(done, snapshot())

    def ended(self, done, snapshot):
        """The run ends, finished or stopped: --keep last saves its step; --keep best has saved already."""
        if self.keep == "last":
            self.save(done, snapshot(), wait=True)
        self.finish()

    def kept(self, final=False):
        """What out holds now, for the run's last line (final: a sentence of its own)."""
        if self.keep == "last":
            return f"Model saved to {self.out}" if final else f"checkpoint saved to {self.out}"
        if self.best is None:
            text = "nothing was saved"
        elif self.best[1] is None:  # a --keep last checkpoint resumed as --keep best, not beaten yet
            text = f"the checkpoint of step {self.best[0]} is at {self.out}"
        else:
            text = f"the best checkpoint (step {self.best[0]}, validation loss {self.best[1]:.3f}) is at {self.out}"
        return text[0].upper() + text[1:] if final else text


def continued_checkpoint(out, resume, step, run):
    """(step, its best_valid_loss or None) of the checkpoint this run resumes when it writes back
    to it (--keep best goes on beating that loss), else None (a new out: the first evaluation saves)."""
    if resume is None or not same_file(out, resume):
        return None
    loss = run.get("best_valid_loss")
    return step, (None if loss is None or not math.isfinite(loss) else loss)
