"""How every command of the project starts and ends: `run_command(main)`.

train.py, inference.py, python -m transformer.{convert,plot,inspect} and python -m
nanograd.gradcheck all end in `run_command(main)`, so what they print can never crash
them (it lives here, not in transformer/, because nanograd never imports transformer):

    stdout closed (`>&-`)          one line on stderr before any work, exit 2
    reader gone (`... | head`)     stop quietly, exit 1
    stdout full or failing         the command finishes its work; one line on stderr, exit 2
    text stdout cannot encode      escaped (`\\u9500`), never a UnicodeEncodeError
    Ctrl-C                         `Interrupted (Ctrl-C).`, exit 130
"""
import os
import signal
import sys

CLOSED = 2  # the exit code of a command whose output could not be written


class GuardedStdout:
    """sys.stdout, but a write that fails for any reason but a vanished reader is remembered
    and the rest of the output dropped, so the command still finishes (and saves) its work."""

    def __init__(self, stream):
        self.stream = stream
        self.failure = None  # the first OSError, if any

    def _guard(self, call, *args):
        if self.failure is None:
            try:
                return call(*args)
            except BrokenPipeError:
                raise  # the reader left: nobody wants the rest; run_command stops quietly
            except OSError as e:
                self.failure = e
        return None

    def write(self, text):
        self._guard(self.stream.write, text)
        return len(text)

    def flush(self):
        self._guard(self.stream.flush)

    def __getattr__(self, name):  # isatty, fileno, encoding ...: the real stream's
        return getattr(self.stream, name)


def _say(line):
    """One line on stderr, if there is a stderr to write it to."""
    if sys.stderr is not None:
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:
            pass


def _silence_stdout():
    """Point file descriptor 1 at /dev/null, so the interpreter's own flush at exit cannot fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    except OSError:
        pass


def run_command(main):
    """sys.exit(main()), with every way of printing made safe (see the module's docstring)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # train.py, inference.py set it while importing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.stdout is None:  # started with stdout closed: descriptor 1 is free, a file we open could take it
        _say("error: standard output is closed; run the command with its output going to a terminal, "
             "a file or /dev/null")
        sys.exit(CLOSED)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # text the terminal cannot encode is escaped, not fatal
            stream.reconfigure(errors="backslashreplace")
    stdout = sys.stdout = GuardedStdout(sys.stdout)
    try:
        try:
            code = main()
        finally:
            stdout.flush()  # a closed pipe shows up here (also after --help), not at exit
    except BrokenPipeError:
        _silence_stdout()  # no second error at exit
        sys.exit(1)
    except KeyboardInterrupt:
        _say("Interrupted (Ctrl-C).")
        sys.exit(130)
    finally:
        sys.stdout = stdout.stream
    if stdout.failure is not None:
        _silence_stdout()
        if not code:  # a failed command has said why already, in its one line
            _say(f"error: cannot write to standard output ({stdout.failure.strerror or stdout.failure}); "
                 "the command finished, but its printed output is lost")
            code = CLOSED
    sys.exit(code)
