"""Tests for transformer/settings.py: --config files (issue 22.4), their precedence, the
settings a checkpoint records written back as a config, and --help's defaults."""
import argparse
import importlib
import os
import sys
import tomllib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from transformer import errors, settings
from transformer.state import load_state
from transformer.validate import check_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # train.py and inference.py are scripts at the repository root
    sys.path.insert(0, REPO)
import train  # noqa: E402

TINY = {"d_model": 16, "num_blocks": 1, "num_heads": 2, "context_length": 16, "batch_size": 4,
        "max_iters": 12, "eval_interval": 5, "eval_iters": 2}
WORDS = "the cat sat on a mat and then the dog ran over to the cat. "


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(WORDS * 80, encoding="utf-8")
    return path


def config_file(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def toml(values):
    return "".join(f"{key} = {settings.toml_value(value)}\n" for key, value in values.items())


def parse(argv):
    return settings.parse_args([str(a) for a in argv], train.BOOK_H_PARAMS)


def main(argv, capsys):
    """train.main(argv): (exit code, stdout, stderr)."""
    code = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_recorded_run_written_back_as_a_config_repeats_it_bit_for_bit(tmp_path, text_file, capsys):
    """Issue 22.4's round trip: train with settings from flags, print the checkpoint's settings
    as TOML (python -m transformer.settings CKPT), train again from that file alone: the same
    weights, moments and recorded settings, to the bit."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    first = tmp_path / "first.ckpt"
    code, _, err = main(["--data", text_file, *flags, "--out", first, "--no-progress", "--lr-schedule", "cosine",
                         "--warmup-iters", 3, "--min-lr", 1e-4, "--grad-clip", 1.0, "--beta2", 0.99,
                         "--weight-decay", 0.1, "--weight-decay-on", "matrices", "--dropout", 0.0,
                         "--seed", 7, "--compact-vocab"], capsys)
    assert code == 0, err
    assert settings.main([str(first)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# The settings a checkpoint recorded at step 12")
    rebuilt = config_file(tmp_path, printed)
    assert tomllib.loads(printed)["beta2"] == 0.99
    second = tmp_path / "second.ckpt"
    code, _, err = main(["--config", rebuilt, "--out", second, "--no-progress"], capsys)
    assert code == 0, err
    (t1, m1), (t2, m2) = load_state(first), load_state(second)
    untimed = lambda run: {k: v for k, v in run.items() if k != "time_s"}  # noqa: E731 (seconds differ)
    assert untimed(m1["run"]) == untimed(m2["run"]) and m1["adamw"] == m2["adamw"] and m1["h_params"] == m2["h_params"]
    assert set(t1) == set(t2)
    for name in t1:
        np.testing.assert_array_equal(t2[name], t1[name], err_msg=name)
    assert settings.config_text(m2["run"]) == settings.config_text(m1["run"])


def test_flags_then_config_then_checkpoint_then_defaults(tmp_path):
    """The order, key by key: a flag beats the config, the config beats the resumed run's
    settings, and those beat the defaults."""
    path = config_file(tmp_path, toml({"learning_rate": 0.01, "batch_size": 3, "eval_full": True}))
    args = parse(["--config", path, "--learning-rate", 0.02])
    saved = {"batch_size": 5, "eval_iters": 7, "learning_rate": 0.5, "eval_full": False}
    s = settings.resolve_settings(args, saved, train.BOOK_H_PARAMS)
    assert s["learning_rate"] == 0.02  # flag over config
    assert s["batch_size"] == 3  # config over checkpoint
    assert s["eval_full"] is True  # config over checkpoint
    assert s["eval_iters"] == 7  # checkpoint over default
    assert s["max_iters"] == train.BOOK_H_PARAMS["max_iters"]  # the default
    assert s["beta2"] == 0.999 and s["weight_decay"] == 0.01 and s["tokenizer"] == "cl100k_base"
    assert parse(["--config", path, "--no-eval-full"]).eval_full is False  # a flag switches a config's true off


def test_an_integer_for_a_float_setting_is_that_float(tmp_path):
    args = parse(["--config", config_file(tmp_path, "learning_rate = 1\nweight_decay = 0\n")])
    assert type(args.learning_rate) is float and args.learning_rate == 1.0
    assert type(args.weight_decay) is float


@pytest.mark.parametrize("text, message", [
    ("batch-size = 3\n", "unknown setting 'batch-size'; did you mean 'batch_size'?"),
    ("resume = 'a.ckpt'\n", "unknown setting 'resume'"),
    ("[model]\nd_model = 8\n", "unknown setting 'model'"),
    ("batch_size = '3'\n", "batch_size must be a positive integer, got '3'"),
    ("batch_size = 3.0\n", "batch_size must be a positive integer, got 3.0"),
    ("batch_size = true\n", "batch_size must be a positive integer, got True"),
    ("batch_size = 0\n", "batch_size must be a positive integer, got 0"),
    ("learning_rate = 'fast'\n", "learning_rate must be a finite number greater than 0"),
    ("learning_rate = nan\n", "learning_rate must be a finite number greater than 0"),
    ("dtype = 'float16'\n", "dtype must be float32 or float64"),
    ("dtype = ['float32']\n", "dtype must be float32 or float64"),
    ("eval_full = 1\n", "eval_full must be true or false"),
    ("tokenizer = 'bytes'\n", "tokenizer must be cl100k_base or char"),
    ("beta2 = 1.0\n", "beta2 must be a number in [0, 1)"),
    ("weight_decay_on = 'vectors'\n", "weight_decay_on must be all or matrices"),
    ("out = 3\n", "out must be a path"),
    ("batch_size = \n", "is not valid TOML: Invalid value (at line 1, column 14)"),
    ("batch_size = 3\nbatch_size = 4\n", "is not valid TOML"),
])
def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = config_file(tmp_path, text)
    code, out, err = main(["--config", path, "--out", tmp_path / "m.ckpt"], capsys)
    assert code == 2
    assert err.startswith(f"error: config file {path}") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "m.ckpt").exists()


def test_an_unreadable_config_is_one_line(tmp_path, capsys):
    for path, message in ((tmp_path / "missing.toml", "does not exist"), (tmp_path, "is a directory"),
                          (config_file(tmp_path, ""), None)):
        code, _, err = main(["--config", path, "--max-iters", 0], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert message is None or message in err  # the empty file is valid TOML: --max-iters 0 is refused
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("data = 'caf\xe9'\n".encode("latin-1"))
    code, _, err = main(["--config", bad], capsys)
    assert code == 2 and "is not valid UTF-8" in err and err.count("\n") == 1


def test_a_config_model_other_than_the_resumed_one_is_refused(tmp_path, text_file, capsys):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    ckpt = tmp_path / "m.ckpt"
    assert main(["--data", text_file, *flags, "--out", ckpt, "--no-progress"], capsys)[0] == 0
    path = config_file(tmp_path, toml({**TINY, "d_model": 32, "max_iters": 20}))
    code, _, err = main(["--config", path, "--resume", ckpt], capsys)
    assert code == 2
    assert err == f"error: d_model in {path} differs from the checkpoint's (16); a resumed run keeps its model\n"
    same = config_file(tmp_path, toml({**TINY, "max_iters": 14, "out": str(tmp_path / "resumed.ckpt")}), "same.toml")
    code, _, err = main(["--config", same, "--resume", ckpt, "--no-progress"], capsys)
    assert code == 0, err
    assert load_state(tmp_path / "resumed.ckpt")[1]["step"] == 14  # the config's out and max_iters


@given(st.text(st.characters(blacklist_categories=("Cs",))))
def test_toml_strings_round_trip(text):
    assert tomllib.loads(f"x = {settings.toml_value(text)}")["x"] == text


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 2**64 - 1) | st.booleans())
def test_toml_numbers_round_trip(value):
    back = tomllib.loads(f"x = {settings.toml_value(value)}")["x"]
    assert back == value and type(back) is type(value)


def test_a_path_that_is_not_utf8_cannot_be_written_as_toml():
    with pytest.raises(errors.UserError, match="not UTF-8"):
        settings.toml_value("data/caf\udce9.txt")


CLIS = ["train", "inference", "transformer.convert", "transformer.plot", "transformer.inspect",
        "transformer.settings", "nanograd.gradcheck"]


@pytest.mark.parametrize("module", CLIS)
def test_every_option_of_every_cli_shows_its_default(module, monkeypatch, capsys):
    """Issue 22.4: --help names each option's default, either argparse's "(default: X)" or the
    help's own words when the default means "not given"; on/off switches are off unless given."""
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        parsers.append(self)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    parser = parsers[0]
    formatter = parser._get_formatter()
    for action in parser._actions:
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
        if not action.option_strings or switch:
            continue
        shown = formatter._expand_help(action) if action.help else ""
        assert "default" in shown, f"{module} {action.option_strings[0]}: {shown!r}"
        assert shown.split()[0] in help_text


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_adamw_gets_beta2_weight_decay_and_nanogpts_groups(reference):
    """--beta2, --weight-decay, --weight-decay-on reach the optimizer train.py builds: with
    matrices, every parameter of fewer than 2 dimensions (biases, LayerNorm) is spared."""
    h = {**train.BOOK_H_PARAMS, **TINY, "max_token_value": 11}
    s = {**h, **settings.RUN_DEFAULTS, **settings.TOKENIZER_ADAMW_DEFAULTS,
         "beta2": 0.99, "weight_decay": 0.1, "weight_decay_on": "matrices"}
    model, optimizer = train.make_model_and_optimizer(h, "numpy", s, reference)
    vectors = {name for name, p in model.params.items() if p.ndim < 2}
    assert vectors and any(name.endswith("bias") for name in vectors)
    assert optimizer.no_decay == vectors and optimizer.betas == (0.9, 0.99) and optimizer.weight_decay == 0.1
    _, book = train.make_model_and_optimizer(h, "numpy", {**s, **settings.TOKENIZER_ADAMW_DEFAULTS}, reference)
    assert book.no_decay == set() and book.betas == (0.9, 0.999) and book.weight_decay == 0.01


def test_a_resumed_run_takes_a_new_beta2_and_weight_decay(tmp_path, text_file, capsys):
    """Flags win over the checkpoint for AdamW's settings too; the new checkpoint records them
    in its run settings and its optimizer entry alike (check_state requires they agree)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    ckpt = tmp_path / "m.ckpt"
    assert main(["--data", text_file, *flags, "--out", ckpt, "--no-progress"], capsys)[0] == 0
    code, _, err = main(["--resume", ckpt, "--max-iters", 14, "--beta2", 0.95, "--weight-decay", 0.2,
                         "--no-progress"], capsys)
    assert code == 0, err
    tensors, meta = load_state(ckpt)
    assert meta["run"]["beta2"] == meta["adamw"]["betas"][1] == 0.95
    assert meta["run"]["weight_decay"] == meta["adamw"]["weight_decay"] == 0.2
    for key, value in (("beta2", 0.9), ("weight_decay", 0.0)):  # an edited file: the two disagree
        with pytest.raises(errors.CheckpointError, match=f"stores run.{key} = {value} but its optimizer has"):
            check_state(tensors, {**meta, "run": {**meta["run"], key: value}}, "m.ckpt", "nanograd-transformer")


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_every_shipped_config_is_a_valid_run(name):
    """configs/*.toml: every key known and well-typed, the settings they make pass check_settings."""
    args = parse(["--config", os.path.join(REPO, "configs", name)])
    s = settings.resolve_settings(args, {}, train.BOOK_H_PARAMS)
    settings.check_settings(s)
    assert args.out and args.out != "model/model.ckpt"  # a run of its own, beside the default one


def test_the_shakespeare_config_keeps_nanogpts_data_tokenizer_and_evaluation():
    """Issue 24: the config is ours to tune, but the race is run on nanoGPT's terms: its
    characters, and its evaluation every 250 steps of 240 random sequences of each split
    (nanoGPT's 20 batches of 12), whatever our batch."""
    path = os.path.join(REPO, "configs", "shakespeare_char_cpu.toml")
    config = settings.read_config(path, {**train.BOOK_H_PARAMS, **settings.RUN_DEFAULTS,
                                         **settings.TOKENIZER_ADAMW_DEFAULTS})
    assert config["tokenizer"] == "char" and config["eval_interval"] == 250
    assert config["eval_iters"] * config["batch_size"] == 20 * 12 and config["context_length"] == 64
    assert "data" not in config  # given on the command line: the project never ships or downloads it


def test_settings_of_a_checkpoint_without_them_is_one_line(tmp_path, capsys):
    from transformer import Model
    from transformer.state import save_state
    ckpt = tmp_path / "w.ckpt"
    save_state(ckpt, Model(dict(d_model=8, num_blocks=1, num_heads=2, context_length=4, max_token_value=10)))
    assert settings.main([str(ckpt)]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {ckpt} records no training settings; only a checkpoint "
                                       "that train.py wrote has them\n")
    assert settings.main([str(tmp_path / "missing.ckpt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
