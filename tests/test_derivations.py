"""The formulas of docs/*.md that are code, checked against what they were derived from; and what
every docs page quotes or names (code lines, files, modules, links, tests, functions) checked to exist.

Each test builds the long way round with NumPy (an explicit Jacobian, a one-hot
matrix, the textbook lines, finite differences along one path) and holds the
project's kernel to it, in float64.
"""
import ast
import importlib
import pathlib
import re

import numpy as np
import pytest

from nanograd.adamw import adamw_update
from nanograd.attention import attention_backward, attention_forward, causal_softmax_backward, \
    causal_softmax_forward
from nanograd.cross_entropy import cross_entropy_backward, cross_entropy_forward
from nanograd.embedding import embedding_backward, embedding_forward
from nanograd.layernorm import layernorm_backward, layernorm_forward

# Two formulas that are the same algebra arranged differently agree to the
# rounding of a few float64 operations on numbers of size ~1.
EXACT = dict(rtol=1e-12, atol=1e-14)
# Central differences with H = 1e-6 in float64: truncation error ~H^2 = 1e-12,
# rounding error ~1e-16 / H = 1e-10, on functions and derivatives of size ~1.
H = 1e-6
FD = dict(rtol=1e-6, atol=1e-8)


def numeric_grad(f, x):
    """Central differences of the scalar f() with respect to every element of x, perturbed in place."""
    grad = np.zeros_like(x)  # x's shape
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + H
        up = f()
        x[i] = old - H
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * H)
    return grad


def softmax_rows(z):
    """softmax over the last axis, with the row max subtracted; exp(-inf) = 0 handles the mask."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))  # z's shape
    return e / e.sum(axis=-1, keepdims=True)  # z's shape


def causal_preatt(rng, lead, T):
    """Random scores (*lead, T, T) of size ~1."""
    return rng.standard_normal((*lead, T, T))  # (*lead, T, T)


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_code_quoted_in_the_docs_is_in_the_code():
    """Every line of every ```python block of docs/*.md is a line of nanograd/ or transformer/ (indentation aside),
    so a page cannot go on quoting code that was changed or removed."""
    code = {line.strip() for folder in ("nanograd", "transformer") for path in (ROOT / folder).rglob("*.py")
            for line in path.read_text().splitlines()}
    quoted = [(page.name, line.strip()) for page in sorted((ROOT / "docs").glob("*.md"))
              for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
              for line in block.splitlines() if line.strip()]
    assert len(quoted) >= 20  # the pages of docs/README.md quote their kernels
    missing = [f"{page}: {line}" for page, line in quoted if line not in code]
    assert not missing, "docs quote code that is not there:\n" + "\n".join(missing)



# --- every page: the files, modules, functions and tests it names exist ---------------------

PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
# What counts as a reference (anything else on a page is prose and is not checked):
# a path under one of the repository's folders, anywhere on the page: nanograd/fast/kernels.py, tests/,
FOLDER_PATH = re.compile(r"(?<![\w/.-])((?:nanograd|transformer|tests|benchmarks|docs)/[\w./-]*)")
# a bare Python file name, anywhere: train.py, bench_cpu.py (the repository has a file of that name),
BARE_FILE = re.compile(r"(?<![\w/.-])([\w-]+\.py)\b")
# a dotted module path, anywhere: nanograd.fast.kernels, python -m transformer.plot, nanograd.block.PLAIN_KERNELS,
MODULE = re.compile(r"(?<![\w/.-])((?:nanograd|transformer)(?:\.[A-Za-z_]\w*)+)")
# a relative markdown link, and its #anchor if it has one: [model](model.md#backward),
LINK = re.compile(r"\]\((?!\w+://)([^)#\s]*)(?:#([^)\s]*))?\)")
# and, inside `inline code` only: a test name (test_resume_is_bit_identical, also tests/test_x.py::test_y),
TEST = re.compile(r"(?:(tests/test_\w+\.py)::)?(?<![\w/])(test_\w+)(?![\w.])")
# Class.member (Model.backward, FastAdamW.start) when Class is a class of the repository,
CLASS_MEMBER = re.compile(r"([A-Z]\w*)\.(\w+)(?:\(.*\))?")
# and a snake_case name alone or called: adamw_update, causal_softmax_backward(datt, att).  A bare
# name counts only when each of its words has two letters or more, so c_n, S_n and dout_n (math) do not.
NAME = re.compile(r"([a-z]\w*_\w*)(\(.*\))?")


def python_files():
    return [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def code_names():
    """Every name the code outside tests/ defines or uses (functions, classes, variables, attributes,
    arguments, identifier-like strings), the test functions and their files, and each class of the two
    packages with its module and self.attributes (scripts are not imported: they would run)."""
    names, tests, classes = set(), {}, {}
    for path in python_files():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        in_tests = path.parent.name == "tests"  # their names are tests, not what the pages explain
        for node in ast.walk(ast.parse(path.read_text())):
            if in_tests:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    tests.setdefault(node.name, set()).add(path.relative_to(ROOT).as_posix())
                continue
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
                if isinstance(node, ast.ClassDef) and path.relative_to(ROOT).parts[0] in ("nanograd", "transformer"):
                    attributes = {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute)
                                  and isinstance(a.ctx, ast.Store) and isinstance(a.value, ast.Name)
                                  and a.value.id == "self"}
                    classes.setdefault(node.name, []).append((module, attributes))
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[-1])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)
    return names, tests, classes


def top_level_names(path):
    """What a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names |= {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                      if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_path_exists(dotted, classes):
    """nanograd.a.b.c: the longest prefix that is a module file of the repository (looked up as a file,
    not imported: an installed copy elsewhere must not answer for it), then a name it defines, then
    a member of that name when it is a class."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if not module.is_file():
            continue
        rest = parts[i:]
        if not rest:
            return True
        if rest[0] not in top_level_names(module):
            return False
        return len(rest) == 1 or (len(rest) == 2 and rest[0] in classes and class_has(classes, *rest))
    return False


def class_has(classes, cls, member):
    """member is an attribute of a class of that name (its own or inherited: transformer.book_torch's
    Model has torch's state_dict), or assigned as self.member in it or a base."""
    for module, _ in classes[cls]:
        try:
            klass = getattr(importlib.import_module(module), cls)
        except ImportError:  # book_torch without torch: nothing to check it against
            return True
        if hasattr(klass, member) or any(member in attributes for base in klass.__mro__
                                         for _, attributes in classes.get(base.__name__, [])):
            return True
    return False


def anchors(page):
    """The #anchors GitHub gives a page's headings: lowercase, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def missing_references(pages):
    """(page, kind, text) for every reference on the pages whose target does not exist."""
    names, tests, classes = code_names()
    basenames = {p.name for p in python_files()}
    missing = []
    for page in pages:
        text = page.read_text()
        where = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name
        missing += [(where, "path", p) for p in FOLDER_PATH.findall(text) if not (ROOT / p.rstrip(".")).exists()]
        missing += [(where, "file", f) for f in BARE_FILE.findall(text) if f not in basenames]
        missing += [(where, "module", m) for m in MODULE.findall(text) if not module_path_exists(m, classes)]
        for target, anchor in LINK.findall(text):
            linked = page.parent / target if target else page
            if not linked.exists():
                missing.append((where, "link", target))
            elif anchor and (not linked.is_file() or anchor not in anchors(linked)):
                missing.append((where, "link", f"{target}#{anchor}"))
        for span in re.findall(r"`([^`\n]+)`", text):
            for file, test in TEST.findall(span):
                if test not in tests or (file and file not in tests[test]):
                    missing.append((where, "test", f"{file}::{test}" if file else test))
            member = CLASS_MEMBER.fullmatch(span)
            if member and member[1] in classes and not class_has(classes, *member.groups()):
                missing.append((where, "member", span))
            name = NAME.fullmatch(span)
            if (name and not span.startswith("test_") and (name[2] or min(map(len, name[1].split("_"))) >= 2)
                    and name[1] not in names):
                missing.append((where, "name", span))
    return missing


def test_what_the_docs_name_exists():
    """Every file path, module path, link, test, Class.member and function name on a docs page is in
    the repository: renaming or deleting one fails here until the page follows."""
    missing = missing_references(PAGES)
    assert not missing, "docs name what is not there:\n" + "\n".join(f"{p}: {kind} {t}" for p, kind, t in missing)


def test_the_reference_check_sees_each_kind_of_reference(tmp_path):
    """A page naming one missing thing of each kind gets one complaint for each, and prose and
    things that exist get none."""
    page = tmp_path / "page.md"
    page.write_text(
        "Gone: `nanograd/gone.py`, [x](gone.md), [y](.#top), [z](#nowhere), python -m nanograd.gone_module, nanograd.block.gone_attr,\n"
        "`Model.gone_method`, `gone_function(x)`, `gone_name`, `test_gone`, `tests/test_block.py::test_gone2`,\n"
        "`tests/test_block.py::test_what_the_docs_name_exists` and gone_file.py.\n"
        "Prose: c_n, `S_n`, `dout_n`, `sqrt(v)`, `x.shape`, e.g. this, `Wq.reshape(NH * hs, C)`, nanograd-transformer.\n"
        "There: nanograd/block.py, tests/, `Model.backward`, `FastModel.head_ready`, `block_forward(x)`,\n"
        "`attention_backward`, nanograd.block.PLAIN_KERNELS, transformer.model.Model.backward, python -m\n"
        "transformer.plot, nanograd.gradcheck.check_kernel, `test_what_the_docs_name_exists`, train.py,\n"
        "[here](#the-pages-own-heading), [there](page.md#the-pages-own-heading).\n"
        "## The page's own heading\n")
    assert missing_references([page]) == [
        ("page.md", "path", "nanograd/gone.py"), ("page.md", "file", "gone_file.py"),
        ("page.md", "module", "nanograd.gone_module"), ("page.md", "module", "nanograd.block.gone_attr"),
        ("page.md", "link", "gone.md"), ("page.md", "link", ".#top"), ("page.md", "link", "#nowhere"),
        ("page.md", "member", "Model.gone_method"),
        ("page.md", "name", "gone_function(x)"), ("page.md", "name", "gone_name"), ("page.md", "test", "test_gone"),
        ("page.md", "test", "tests/test_block.py::test_gone2"),
        ("page.md", "test", "tests/test_block.py::test_what_the_docs_name_exists")]


# --- attention.md -------------------------------------------------------------------------

def test_softmax_jacobian_is_diag_a_minus_outer_a():
    """J_ik = da_i/dz_k = delta_ik a_i - a_i a_k, by finite differences of the softmax itself."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal(6)  # (T,)
    a = softmax_rows(z)  # (T,)
    J = np.diag(a) - np.outer(a, a)  # (T, T)
    J_numeric = np.stack([numeric_grad(lambda: softmax_rows(z)[i], z) for i in range(6)])  # (T, T)
    np.testing.assert_allclose(J, J_numeric, **FD)
    np.testing.assert_allclose(J, J.T, **EXACT)  # symmetric, so J^T d = J d
    np.testing.assert_allclose(J.sum(axis=1), 0, atol=1e-15)  # a shift of every z changes nothing


def test_causal_softmax_backward_equals_explicit_jacobian():
    """a * (d - sum(a * d)) is J^T d with J = diag(a) - a a^T built row by row; masked entries get 0."""
    rng = np.random.default_rng(1)
    lead, T = (2, 3), 5
    att = causal_softmax_forward(causal_preatt(rng, lead, T))  # (2, 3, T, T)
    datt = rng.standard_normal(att.shape)  # (2, 3, T, T)
    expected = np.empty_like(att)  # (2, 3, T, T)
    for row in np.ndindex(*lead, T):
        a, d = att[row], datt[row]  # (T,) each
        J = np.diag(a) - np.outer(a, a)  # (T, T)
        expected[row] = J.T @ d  # (T,)
    dpreatt = causal_softmax_backward(datt, att)  # (2, 3, T, T)
    np.testing.assert_allclose(dpreatt, expected, **EXACT)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (T, T)
    assert np.all(dpreatt[..., future] == 0)  # exactly 0 above the diagonal
    assert np.all(datt[..., future] != 0)  # although the upstream gradient is not


def test_causal_softmax_backward_matches_finite_differences():
    """Finite differences over every score, masked ones included (their gradient is 0)."""
    rng = np.random.default_rng(2)
    preatt = causal_preatt(rng, (2,), 4)  # (2, T, T)
    datt = rng.standard_normal(preatt.shape)  # (2, T, T)
    numeric = numeric_grad(lambda: float((datt * causal_softmax_forward(preatt)).sum()), preatt)
    np.testing.assert_allclose(causal_softmax_backward(datt, causal_softmax_forward(preatt)), numeric, **FD)


def test_attention_dx_sums_the_three_projection_paths():
    """x feeds q, k and v: dx is the sum of the gradients along each path (each one alone is not)."""
    rng = np.random.default_rng(3)
    B, T, C, NH = 2, 3, 4, 2
    hs = C // NH
    x = rng.standard_normal((B, T, C))  # (B, T, C)
    Wq, Wk, Wv = (rng.standard_normal((NH, hs, C)) for _ in range(3))  # (NH, hs, C) each
    dout = rng.standard_normal((B, T, C))  # (B, T, NH*hs)
    xq, xk, xv = x.copy(), x.copy(), x.copy()  # (B, T, C) each: one copy of x per path

    def loss():
        """sum(dout * attention) with q, k, v each projected from its own copy of x (no dropout)."""
        q, k, v = (np.einsum("btc,hsc->bhts", xc, W) for xc, W in ((xq, Wq), (xk, Wk), (xv, Wv)))  # (B, NH, T, hs) each
        att = causal_softmax_forward(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs))  # (B, NH, T, T)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, NH*hs) heads side by side
        return float((dout * y).sum())

    paths = [numeric_grad(loss, copy) for copy in (xq, xk, xv)]  # 3 x (B, T, C)
    _, cache = attention_forward(x, Wq, Wk, Wv, train=False)
    dx = attention_backward(dout, cache)[0]  # (B, T, C)
    np.testing.assert_allclose(dx, sum(paths), **FD)
    for i in range(3):  # leaving out any one path is far off
        assert np.abs(dx - (sum(paths) - paths[i])).max() > 1e-3


# --- cross_entropy.md ---------------------------------------------------------------------

def ce_case(seed, N=6, V=5):
    """Logits (N, V) of size ~3 and targets (N,) with repeats."""
    rng = np.random.default_rng(seed)
    return 3 * rng.standard_normal((N, V)), rng.integers(0, V, size=N) % 3  # (N, V), (N,)


def test_cross_entropy_backward_is_softmax_minus_onehot_over_n():
    logits, targets = ce_case(4)
    N, V = logits.shape
    dloss = 0.7
    _, cache = cross_entropy_forward(logits, targets)
    onehot = np.eye(V)[targets]  # (N, V)
    expected = dloss * (softmax_rows(logits) - onehot) / N  # (N, V)
    np.testing.assert_allclose(cross_entropy_backward(dloss, cache), expected, **EXACT)


def test_cross_entropy_backward_equals_jacobian_vector_product():
    """The same gradient through the softmax Jacobian: d = dloss/dp = -onehot / (N p_y) per row, then J^T d."""
    logits, targets = ce_case(5)
    N, V = logits.shape
    p = softmax_rows(logits)  # (N, V)
    expected = np.empty_like(p)  # (N, V)
    for n in range(N):
        d = -np.eye(V)[targets[n]] / (N * p[n, targets[n]])  # (V,) d(-mean log p_y)/dp for row n
        J = np.diag(p[n]) - np.outer(p[n], p[n])  # (V, V)
        expected[n] = J.T @ d  # (V,)
    _, cache = cross_entropy_forward(logits, targets)
    np.testing.assert_allclose(cross_entropy_backward(1.0, cache), expected, **EXACT)


def test_cross_entropy_backward_matches_finite_differences():
    logits, targets = ce_case(6)
    dloss = -1.3
    numeric = numeric_grad(lambda: dloss * float(cross_entropy_forward(logits, targets)[0]), logits)
    _, cache = cross_entropy_forward(logits, targets)
    np.testing.assert_allclose(cross_entropy_backward(dloss, cache), numeric, **FD)


def test_any_row_shift_leaves_softmax_and_loss_unchanged():
    """The fast path's shift: by the target's logit, each row's sum is at least 1 and the loss is its log."""
    logits, targets = ce_case(7)
    N = logits.shape[0]
    loss, cache = cross_entropy_forward(logits, targets)
    target_logit = logits[np.arange(N), targets]  # (N,)
    for shift in (target_logit, np.random.default_rng(8).uniform(-50, 50, N)):  # (N,) one number per row
        shifted_loss, shifted_cache = cross_entropy_forward(logits - shift[:, None], targets)
        np.testing.assert_allclose(shifted_loss, loss, **EXACT)
        np.testing.assert_allclose(cross_entropy_backward(1.0, shifted_cache), cross_entropy_backward(1.0, cache),
                                   **EXACT)  # (softmax - onehot) / N: the same softmax
    S = np.exp(logits - target_logit[:, None]).sum(axis=1)  # (N,) the target's term is exp(0) = 1
    assert np.all(S >= 1)
    np.testing.assert_allclose(np.log(S).mean(), loss, **EXACT)  # loss = mean_n(log S_n + shift - target_logit)


# --- embedding.md -------------------------------------------------------------------------

def embedding_case():
    """ids (B, T) with repeats, a table (V, C) and an upstream gradient (B, T, C)."""
    rng = np.random.default_rng(9)
    idx = np.array([[3, 1, 3, 0], [1, 3, 2, 3]])  # (B, T) id 3 four times, id 1 twice, id 4 never
    return idx, rng.standard_normal((5, 3)), rng.standard_normal((2, 4, 3))  # (B, T), (V, C), (B, T, C)


def test_embedding_is_a_onehot_product_and_its_gradient_a_scatter_add():
    idx, W, dout = embedding_case()
    V, C = W.shape
    onehot = np.eye(V)[idx.reshape(-1)]  # (B*T, V)
    out, cache = embedding_forward(idx, W)
    np.testing.assert_array_equal(out.reshape(-1, C), onehot @ W)
    expected = onehot.T @ dout.reshape(-1, C)  # (V, C)
    dW = embedding_backward(dout, cache)  # (V, C)
    np.testing.assert_allclose(dW, expected, **EXACT)
    np.testing.assert_array_equal(dW[4], 0)  # an id that never appears


def test_fancy_index_increment_drops_repeated_ids():
    """`dW[idx] += dout` keeps one position's row per id: right for ids seen once, wrong for repeats."""
    idx, W, dout = embedding_case()
    V, C = W.shape
    ids, rows = idx.reshape(-1), dout.reshape(-1, C)  # (B*T,), (B*T, C)
    naive = np.zeros((V, C))  # (V, C)
    naive[ids] += rows
    right = embedding_backward(dout, embedding_forward(idx, W)[1])  # (V, C)
    np.testing.assert_allclose(naive[[0, 2, 4]], right[[0, 2, 4]], **EXACT)  # ids seen once or never
    for v in (1, 3):  # repeated: only one of the positions' rows survived
        assert not np.allclose(naive[v], right[v])
        assert any(np.array_equal(naive[v], rows[n]) for n in np.flatnonzero(ids == v))


# --- adamw.md -----------------------------------------------------------------------------

SETTINGS = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-3, weight_decay=0.1)  # eps large: its place shows


def test_adamw_update_is_the_bias_corrected_textbook_form():
    """torch's rearranged code, p -= lr/(1-b1^t) * m/(sqrt(v)/sqrt(1-b2^t) + eps), over 6 steps,
    equals the lines of docs/adamw.md; the paper's eps-on-sqrt(v) form needs eps*sqrt(1-b2^t)."""
    rng = np.random.default_rng(10)
    lr, b1, b2, eps, wd = SETTINGS.values()
    p, m, v = rng.standard_normal(7), np.zeros(7), np.zeros(7)  # (7,) each
    p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()  # (7,) each
    for t in range(1, 7):
        g = rng.standard_normal(7) * 10.0 ** rng.integers(-4, 1, 7)  # (7,) gradients of many sizes
        p_before = p_ref.copy()  # (7,)
        adamw_update(p, g, m, v, lr, b1, b2, eps, wd, t)
        p_ref *= 1 - lr * wd  # 1. decoupled decay
        m_ref = b1 * m_ref + (1 - b1) * g  # 2. first moment
        v_ref = b2 * v_ref + (1 - b2) * g * g  # 3. second moment
        m_hat, v_hat = m_ref / (1 - b1 ** t), v_ref / (1 - b2 ** t)  # 4. bias corrections
        p_ref -= lr * m_hat / (np.sqrt(v_hat) + eps)  # 5. the update
        np.testing.assert_allclose(p, p_ref, **EXACT)
        np.testing.assert_allclose(m, m_ref, **EXACT)
        np.testing.assert_allclose(v, v_ref, **EXACT)
        decayed, step_size = p_before * (1 - lr * wd), lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)  # the paper's form
        paper = decayed - step_size * m_ref / (np.sqrt(v_ref) + eps)  # (7,) eps added to sqrt(v), not sqrt(v_hat)
        assert np.abs(paper - p_ref).max() > 1e-4  # another optimizer
        paper = decayed - step_size * m_ref / (np.sqrt(v_ref) + eps * np.sqrt(1 - b2 ** t))  # (7,)
        np.testing.assert_allclose(paper, p_ref, **EXACT)


def test_first_step_is_lr_times_the_sign_whatever_the_scale():
    """With the bias corrections, step 1 moves each weight by lr * g / (|g| + eps), about lr."""
    lr, b1, b2, _, _ = SETTINGS.values()
    g = np.array([1e-2, -1.0, 50.0])  # (3,)
    p = np.zeros(3)  # (3,)
    adamw_update(p, g, np.zeros(3), np.zeros(3), lr, b1, b2, 1e-8, 0.0, 1)
    np.testing.assert_allclose(p, -lr * np.sign(g), rtol=1e-6)  # eps / |g| <= 1e-6


def test_zero_gradient_decays_by_a_fraction_unlike_adam_with_l2():
    """AdamW: p * (1 - lr*wd) exactly.  Adam + L2 (g = wd*p through the moments): a step of ~lr towards 0."""
    lr, b1, b2, eps, wd = SETTINGS.values()
    p0 = np.array([0.5, -2.0, 8.0])  # (3,)
    p = p0.copy()  # (3,)
    adamw_update(p, np.zeros(3), np.zeros(3), np.zeros(3), lr, b1, b2, eps, wd, 1)
    np.testing.assert_array_equal(p, p0 * (1 - lr * wd))
    g_l2 = wd * p0  # (3,) the L2 term as a gradient
    m_hat, v_hat = g_l2, g_l2 ** 2  # (3,) each: step 1's bias-corrected moments
    adam_l2 = p0 - lr * m_hat / (np.sqrt(v_hat) + eps)  # (3,)
    np.testing.assert_allclose(p0 - adam_l2, lr * np.sign(p0), rtol=0.05)  # the same step for every size
    assert np.abs(adam_l2 - p).max() > 1e-2


# --- layernorm.md -------------------------------------------------------------------------

@pytest.mark.parametrize("C", [2, 6])
def test_layernorm_three_paths_each_match_finite_differences(C):
    """xhat_j = (x_j - mean(x')) * rstd(x''): the gradient along each copy of x is one term of dx."""
    rng = np.random.default_rng(11 + C)
    eps = 1e-5
    x = rng.standard_normal((3, C))  # (N, C)
    w, b = rng.standard_normal(C), rng.standard_normal(C)  # (C,) each
    dout = rng.standard_normal((3, C))  # (N, C)
    dxhat = dout * w  # (N, C)
    x_direct, x_mean, x_rstd = x.copy(), x.copy(), x.copy()  # (N, C) each

    def loss():
        """sum(dxhat * xhat), xhat built from the three copies of x."""
        mean = x_mean.mean(axis=-1, keepdims=True)  # (N, 1)
        var = ((x_rstd - x_rstd.mean(axis=-1, keepdims=True)) ** 2).mean(axis=-1, keepdims=True)  # (N, 1)
        return float((dxhat * (x_direct - mean) / np.sqrt(var + eps)).sum())

    rstd = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + eps)  # (N, 1)
    xhat = (x - x.mean(axis=-1, keepdims=True)) * rstd  # (N, C)
    terms = [rstd * dxhat,  # (1) direct
             -rstd * dxhat.mean(axis=-1, keepdims=True),  # (2) via the mean
             -rstd * xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)]  # (3) via rstd
    for term, copy in zip(terms, (x_direct, x_mean, x_rstd)):
        np.testing.assert_allclose(numeric_grad(loss, copy), np.broadcast_to(term, x.shape), **FD)
    _, cache = layernorm_forward(x, w, b, eps=eps)
    dx = layernorm_backward(dout, cache)[0]  # (N, C)
    np.testing.assert_allclose(dx, sum(terms), **EXACT)
