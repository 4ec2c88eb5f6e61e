"""What a training run tells the person watching it: the backend, the book's evaluation lines,
a progress bar on a terminal (else a progress line every ~10 s), a sample of the model's text
now and then, the metrics file (through RunOutputs.log) and Weights & Biases."""
import json
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


PROGRESS_SECONDS = 10  # without a terminal: a progress line once this much time has passed


class RunLog:
    """The run's reports.  evaluation() prints the book's line and logs a metrics record;
    step() moves the bar, or without a terminal prints a progress line every PROGRESS_SECONDS;
    sample() prints a sample of text; say() prints a line (above the bar, if there is one).

    time_before: seconds the resumed run had trained, so the metrics' time_s goes on from it."""

    def __init__(self, outputs, start, total, tokens_per_step, progress=True, wandb_run=None, time_before=0.0):
        self.outputs, self.wandb_run = outputs, wandb_run
        self.start, self.total, self.tokens_per_step = start, total, tokens_per_step
        self.time_before = time_before
        self.t0 = time.perf_counter()
        self.bar = progress_bar(start, total, enabled=progress)
        self.lines = progress and self.bar is None  # no terminal: progress lines instead of the bar
        self.mark = self.t0  # when the last report was made
        self.line_at = self.t0  # when the last progress line was printed
        self.steps, self.step_seconds, self.loss_sum = 0, 0.0, 0.0  # since that line

    def say(self, line):
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)  # flushed: a log file shows it now, not when a buffer fills

    def seconds(self):
        """Seconds since this process's run began."""
        return time.perf_counter() - self.t0

    def training_seconds(self):
        """Seconds the run has trained, over all its resumptions: what a checkpoint stores."""
        return self.time_before + self.seconds()

    def lap(self):
        """Seconds since the last report; what happened in them was the step, if step() asks."""
        now = time.perf_counter()
        lap, self.mark = now - self.mark, now
        return lap

    def evaluation(self, step, losses, lr):
        self.lap()  # the evaluation's time is no step's
        line = f"Step: {step}, Training Loss: {losses['train']:.3f}, Validation Loss: {losses['valid']:.3f}"
        if "valid_full" in losses:
            line += f", Full Validation Loss: {losses['valid_full']:.3f}"
        self.say(line)
        self.outputs.log({"step": step, "lr": lr, "time_s": round(self.training_seconds(), 3),
                          **{f"{k}_loss": v for k, v in losses.items()}})
        if self.wandb_run is not None:
            self.wandb_run.log({f"{k}_loss": v for k, v in losses.items()}, step=step)

    def sample(self, step, text):
        """One line: the step and the text, JSON-quoted (its newlines shown as \\n)."""
        self.say(f"Sample at step {step}: {json.dumps(text, ensure_ascii=False)}")
        self.lap()  # nor the sample's

    def step(self, step, loss):
        seconds = self.lap()
        if self.bar is not None:
            tokens = (step + 1 - self.start) * self.tokens_per_step
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens / self.seconds():,.0f}", refresh=False)
        elif self.lines:
            self.steps, self.step_seconds, self.loss_sum = self.steps + 1, self.step_seconds + seconds, self.loss_sum + loss
            if self.mark - self.line_at >= PROGRESS_SECONDS:
                self.say(f"step {step + 1}/{self.total}: loss {self.loss_sum / self.steps:.3f}, "
                         f"{1000 * self.step_seconds / self.steps:.0f} ms/step, "
                         f"{self.steps * self.tokens_per_step / self.step_seconds:,.0f} tokens/s")
                self.line_at, self.steps, self.step_seconds, self.loss_sum = self.mark, 0, 0.0, 0.0

    def close(self):
        """Close the bar (before a last message: closing later would redraw it below) and wandb."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def finished(self, steps, saved):
        """The last line; saved says where the model is (CheckpointSaver.kept())."""
        seconds = self.seconds()
        steps = max(steps, 1)
        print(f"Training complete in {seconds:.1f} s ({1000 * seconds / steps:.0f} ms/step, "
              f"{steps * self.tokens_per_step / seconds:,.0f} tokens/s). {saved}")


SAMPLE_TOKENS = 50  # new tokens in each sample
SAMPLE_TEMPERATURE = 0.5  # inference.py's default
SAMPLE_STREAM = 4  # the sample's generator: (seed, 4); the run's draws use purposes 0-3


class TrainingSample:
    """What the model writes from a fixed prompt, as nanoGPT's sample.py and llm.c show it.

    The prompt is a newline (where nanoGPT's sample.py starts) when the data has one, else the
    data's first token.  Every sample draws from a fresh generator seeded (seed, SAMPLE_STREAM),
    so two samples differ only because the weights did.  It runs with dropout off and touches
    nothing the training reads: generate() walks the model through its own key/value cache
    (not model.cache) and draws from that generator (not model.rng), so a run with samples
    trains bit for bit as one without (tests/test_train.py)."""

    def __init__(self, ids, vocab, seed, tokenizer, new_tokens=SAMPLE_TOKENS):
        newline = tokenizer.encode_ordinary("\n")[0]  # in cl100k_base's numbering
        if vocab is not None:  # the model's dense numbering
            where = int(np.searchsorted(vocab, newline))
            newline = where if where < len(vocab) and vocab[where] == newline else -1
        self.prompt = np.array([[newline if (ids == newline).any() else ids[0]]])  # (1, 1)
        self.vocab, self.seed, self.tokenizer, self.new_tokens = vocab, seed, tokenizer, new_tokens

    def text(self, model):
        out = model.generate(self.prompt, self.new_tokens, temperature=SAMPLE_TEMPERATURE,
                             rng=np.random.default_rng([self.seed, SAMPLE_STREAM]))[0]  # (1 + new,)
        return self.tokenizer.decode((self.vocab[out] if self.vocab is not None else out).tolist())


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


def import_wandb():
    """The wandb module, or UserError: asked before any work, so a missing package costs nothing."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb "
                        "(set WANDB_MODE=offline to log without an account)") from None
    return wandb


def start_wandb(wandb, project, h_params, settings):
    return wandb.init(project=project, config={**settings, **h_params})
