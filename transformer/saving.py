"""Checkpoints written on a thread of their own while the loop goes on.

A checkpoint (200 MB in the book's config) takes a while to write.  The
evaluation that follows a save only reads the weights, so the write need
only be finished before the next step changes them: train.py calls
finish() right before each step.  One save at a time: both write to out.
"""
from concurrent.futures import ThreadPoolExecutor

from .checkpoint import save_checkpoint
from .errors import UserError


class CheckpointSaver:
    """save(step, contents) starts writing out; finish() waits for it (and raises its error)."""

    def __init__(self, out, outputs, enabled=True):
        self.out, self.outputs, self.enabled = out, outputs, enabled  # enabled: rank 0 alone writes
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.writing = []  # the save in flight, if any

    def save(self, step, contents, wait=False):
        """contents: state.state_contents(...), taken now, before the weights change."""
        if not self.enabled:
            return
        self.finish()
        self.outputs.check_present(step)  # the folder removed meanwhile: stop, do not recreate it
        self.writing.append(self.writer.submit(save_checkpoint, self.out, *contents))
        if wait:
            self.finish()

    def finish(self):
        try:
            while self.writing:
                self.writing.pop().result()  # a failed save raises its error here
        except OSError as e:  # a full disk, a folder removed meanwhile: save_checkpoint left out as it was
            raise UserError(f"cannot write the checkpoint {self.out} ({e.strerror or e}); "
                            "the file there, if any, is the last good one") from e

    def close(self):
        self.writer.shutdown(wait=True)  # a save in flight completes, whatever stopped the loop
