"""The repository around the code: what git ignores, how quiet the tests are, the torch pin."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"  # README's test command


@pytest.mark.parametrize("path", ["attention/block0_head0.png", "model", "model/model.ckpt",
                                  "model.metrics.jsonl", "run.metrics.png", "model/model.run.lock"])
def test_outputs_of_the_commands_are_ignored_by_git(path):
    """Issue 13.3 and 13.4: inspect's attention/, a checkpoint saved with --out model, metrics
    files beside a checkpoint in the repository root, a lock left by a killed run."""
    result = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO, timeout=30)
    assert result.returncode == 0, f"{path} is not ignored by .gitignore"


def test_pytest_is_quiet_about_skips_unless_asked(tmp_path):
    """Issue 13.6: the project's pytest settings print no line per skipped test; -rs lists them."""
    (tmp_path / "test_skip.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('i', range(3))\n"
        "def test_skipped(i):\n    pytest.skip('CuPy is not installed')\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
               "--rootdir", str(tmp_path), str(tmp_path / "test_skip.py")]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert "3 skipped" in quiet.stdout, quiet.stdout + quiet.stderr
    assert "CuPy is not installed" not in quiet.stdout, quiet.stdout
    listed = subprocess.run(command + ["-rs"], capture_output=True, text=True, timeout=120)
    assert re.search(r"^SKIPPED \[3\] .*CuPy is not installed$", listed.stdout, re.M), listed.stdout


def test_every_suggestion_to_install_torch_is_pinned():
    """Issue 13.8: installing torch without its version fetches whatever is newest (and a CUDA build)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=30,
                           check=True).stdout.split()
    unpinned = []
    for name in files:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".toml", ".txt", ".cfg") or not path.is_file():
            continue  # (.ci/run matches README's command with a pattern, it suggests nothing)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in re.finditer(r"pip install (?:-\S+ )*torch\b(==[0-9][\w.]*)?", line):
                if match[1] != "==2.13.0":
                    unpinned.append(f"{name}:{number}: {line.strip()}")
    assert unpinned == []


def test_nanograd_never_imports_transformer():
    """Issue 20: the layers point down.  nanograd is the library, transformer is built on it;
    an import the other way, at any depth or indentation, would make the bottom layer depend on the top."""
    import ast
    upward = []
    for path in sorted((REPO / "nanograd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            upward += [f"{path.relative_to(REPO)}:{node.lineno} imports {name}"
                       for name in names if name.split(".")[0] in ("transformer", "train", "inference")]
    assert upward == []
