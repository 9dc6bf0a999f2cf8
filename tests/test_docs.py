"""The documentation cannot rot: its examples run, its API reference is complete, the site builds.

* Every fenced ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs, page by page,
  in order, in one namespace per page (a later block may use an earlier block's names), on CPU.
  Blocks that must not run (multi-host commands, GPU-only calls) use another fence language
  (```` ```bash ````, ```` ```text ````). A block preceded by the line
  ``<!-- docs-test: skip -->`` is not run either (use sparingly, say why beside it).
  A page holding ``<!-- docs-test: devices=8 -->`` runs in a fresh process with 8 simulated CPU
  devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), for its meshes.
* The ``>>>`` examples of the package's docstrings run as doctests.
* The API reference names every public name, and the Sphinx site builds with warnings as
  errors (``-W``), every in-site link reaching an existing anchor and every plot copied.
"""

import doctest
import importlib
import os
import re
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```\s*$", re.M | re.S)
SKIP = "<!-- docs-test: skip -->"
DEVICES = re.compile(r"<!-- docs-test: devices=(\d+) -->")


def python_blocks(path):
    """``[(line, code)]`` of the page's ```` ```python ```` blocks, in order, skip-marked ones left out."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip().splitlines()
        if m.group("lang") != "python" or (before and before[-1].strip() == SKIP):
            continue
        blocks.append((text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group("body"))))
    return blocks


def _page_id(path):
    return str(path.relative_to(ROOT))


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]
# Pages whose examples compile whole models (about 30-45 s of CPU each on the 2-core EPYC VM).
SLOW_PAGES = {"docs/guides/modules.md", "docs/guides/decoding.md", "docs/guides/mesh.md"}


def _run_blocks(path):
    namespace = {"__name__": f"docs_example_{path.stem}"}
    for line, code in python_blocks(path):
        # The file name in a traceback says which page and line the failing block starts on.
        exec(compile(code, f"{_page_id(path)}:{line}", "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if _page_id(p) in SLOW_PAGES else p
                                  for p in PAGES_WITH_CODE], ids=_page_id)
def test_python_examples_run(page):
    m = DEVICES.search(page.read_text(encoding="utf-8"))
    if m is None:
        _run_blocks(page)
        return
    # A fresh process: the device count is fixed when JAX starts, and this one has started.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={m.group(1)}")
    script = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_docs; " \
             f"test_docs._run_blocks(test_docs.ROOT / {_page_id(page)!r})"
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def test_every_page_with_examples_is_collected():
    # The collector finds the blocks it should (a broken fence regex would silently run nothing).
    assert ROOT / "README.md" in PAGES_WITH_CODE
    assert len(PAGES_WITH_CODE) >= 7, [_page_id(p) for p in PAGES_WITH_CODE]
    assert sum(len(python_blocks(p)) for p in PAGES_WITH_CODE) >= 15


def _modules_with_doctests():
    mods = []
    for path in sorted((ROOT / "flax_attention").rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            mods.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return mods


DOCTEST_MODULES = _modules_with_doctests()


@pytest.mark.parametrize("module", DOCTEST_MODULES)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    tests = [t for t in doctest.DocTestFinder().find(mod, module) if t.examples]
    assert tests, f"{module} contains '>>>' but no doctest was found"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {module}"


def test_key_public_functions_have_doctest_examples():
    import flax_attention as fa

    for obj in (fa.scaled_dot_product_attention, fa.chunked_attention, fa.padding_mask, fa.key_mask,
                fa.MultiHeadAttention):
        assert ">>>" in (obj.__doc__ or ""), obj.__name__


def test_api_reference_names_every_public_name():
    import flax_attention

    api = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    # Names re-exported from a module whose page documents all its members count as documented.
    for module in re.findall(r"automodule:: (\S+)\n\s+:members:\s*\n", api):
        mod = importlib.import_module(module)  # autodoc: __all__, else the public names defined there
        names = getattr(mod, "__all__", None) or [n for n, o in vars(mod).items()
                                                   if not n.startswith("_") and getattr(o, "__module__", "") == module]
        api += "".join(f"\n{module}.{n}\n" for n in names)
    missing = [n for n in flax_attention.__all__ if not re.search(rf"\bflax_attention(\.\w+)*\.{n}\s*$", api, re.M)]
    assert not missing, f"not in docs/api: {missing}"
    for module in ("flax_attention.nnx", "flax_attention.models", "flax_attention.training"):
        # automodule with :members: documents the module's __all__.
        assert re.search(rf"automodule:: {re.escape(module)}\n\s+:members:\s*\n", api), module
        assert importlib.import_module(module).__all__


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.imgs = set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.imgs.append(attrs["src"])


@pytest.mark.slow
def test_sphinx_site_builds_without_warnings(tmp_path):
    out_dir = tmp_path / "html"
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          "-d", str(tmp_path / "doctrees"), str(DOCS), str(out_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    print(f"sphinx-build: {time.perf_counter() - start:.1f} s")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]

    pages = {}
    for html in out_dir.rglob("*.html"):
        parser = _Links()
        parser.feed(html.read_text(encoding="utf-8"))
        pages[html.resolve()] = parser
    broken = []
    for html, parser in pages.items():
        for href in parser.hrefs:
            if re.match(r"^[a-z]+:", href) or href.startswith("//"):
                continue  # external
            target, _, anchor = href.partition("#")
            target_path = (html.parent / target).resolve() if target else html
            if target_path.suffix == ".html" and target_path not in pages:
                broken.append(f"{html.name}: {href} (no page)")
            elif anchor and target_path in pages and anchor not in pages[target_path].ids:
                broken.append(f"{html.name}: {href} (no anchor)")
        for src in parser.imgs:
            if not re.match(r"^[a-z]+:", src) and not (html.parent / src).exists():
                broken.append(f"{html.name}: image {src}")
    assert not broken, broken
    # The benchmark plots are in the site.
    bench = pages[(out_dir / "guides" / "benchmarks.html").resolve()]
    assert sum("attention" in Path(s).name and s.endswith(".png") for s in bench.imgs) == 3, bench.imgs


def test_tests_named_in_the_docs_exist():
    # The reliability page names the test behind each guarantee; a renamed test must not leave it stale.
    text = (DOCS / "guides" / "reliability.md").read_text(encoding="utf-8")
    named, current = [], None
    for m in re.finditer(r"`(test_\w+\.py)?::(test_\w+)`|`(test_\w+\.py)` \(|`(test_\w+)`", text):
        if m.group(2):
            current = m.group(1) or current
            named.append((current, m.group(2)))
        elif m.group(3):
            current = m.group(3)
        elif m.group(4) and current:
            named.append((current, m.group(4)))
    assert len(named) >= 40, named
    missing = [f"{f}::{t}" for f, t in named
               if not re.search(rf"^\s*def {t}\(", (ROOT / "tests" / f).read_text(encoding="utf-8"), re.M)]
    assert not missing, missing


def test_readme_links_reach_files():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [t.partition("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t)]
    assert links and not [t for t in links if t and not (ROOT / t).exists()]
