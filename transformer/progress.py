"""What a training run tells the person watching it: the backend, the book's evaluation lines,
a progress bar on a terminal, the metrics file (through RunOutputs.log) and Weights & Biases."""
import shutil
import sys
import time

import numpy as np

from nanograd.fast.threads import cpu_threads

from .errors import UserError


def describe_backend(xp):
    """The first line a run prints: which backend, on what."""
    if xp is np:
        cores = cpu_threads()
        return f"Backend: numpy {np.__version__} on the CPU ({cores} core{'s' if cores > 1 else ''})"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"Backend: cupy {xp.__version__} on {name} (CUDA runtime {xp.cuda.runtime.runtimeGetVersion()})"


class RunLog:
    """The run's reports.  evaluation() prints the book's line and logs a metrics record;
    step() moves the bar; say() prints a line (above the bar, if there is one)."""

    def __init__(self, outputs, start, total, tokens_per_step, progress=True, wandb_run=None):
        self.outputs, self.wandb_run = outputs, wandb_run
        self.start, self.tokens_per_step = start, tokens_per_step
        self.t0 = time.perf_counter()
        self.bar = progress_bar(start, total, enabled=progress)

    def say(self, line):
        (self.bar.write if self.bar is not None else print)(line)

    def seconds(self):
        return time.perf_counter() - self.t0

    def evaluation(self, step, losses, lr):
        line = f"Step: {step}, Training Loss: {losses['train']:.3f}, Validation Loss: {losses['valid']:.3f}"
        if "valid_full" in losses:
            line += f", Full Validation Loss: {losses['valid_full']:.3f}"
        self.say(line)
        self.outputs.log({"step": step, "lr": lr, "time_s": round(self.seconds(), 3),
                          **{f"{k}_loss": v for k, v in losses.items()}})
        if self.wandb_run is not None:
            self.wandb_run.log({f"{k}_loss": v for k, v in losses.items()}, step=step)

    def step(self, step, loss):
        if self.bar is not None:
            tokens = (step + 1 - self.start) * self.tokens_per_step
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens / self.seconds():,.0f}", refresh=False)

    def close(self):
        """Close the bar (before a last message: closing later would redraw it below) and wandb."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def finished(self, steps, out):
        seconds = self.seconds()
        steps = max(steps, 1)
        print(f"Training complete in {seconds:.1f} s ({1000 * seconds / steps:.0f} ms/step, "
              f"{steps * self.tokens_per_step / seconds:,.0f} tokens/s). Model saved to {out}")


def progress_bar(start, total, enabled):
    """A tqdm bar when stdout is a terminal (and tqdm is installed), else None."""
    if not (enabled and sys.stdout.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if shutil.get_terminal_size((0, 0)).columns > 0:
        return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    # a terminal that reports no size (0 x 0) would hide the bar: assume 80 x 24
    return tqdm(total=total, initial=start, unit="step", ncols=80, nrows=24)


def start_wandb(project, h_params, settings):
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb "
                        "(set WANDB_MODE=offline to log without an account)") from None
    return wandb.init(project=project, config={**settings, **h_params})
