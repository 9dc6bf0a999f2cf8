"""The package layout: every subpackage has a layer, and imports run down the layers only, never back."""

import ast
import pathlib
import sys

import pytest

import flax_attention

PKG = pathlib.Path(flax_attention.__file__).parent
# Lower rank = lower layer. A module may import its own subpackage and the layers strictly below it:
# training -> embed -> data -> models -> nnx -> linen -> functional -> kernels -> core.
RANK = {"core": 0, "kernels": 1, "functional": 2, "linen": 3, "nnx": 4, "models": 5, "data": 6, "embed": 7,
        "training": 8}


def _imports(path):
    """``(absolute module, imported names)`` for every import in ``path``, relative ones resolved."""
    package = ".".join(("flax_attention",) + path.relative_to(PKG).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _targets(module, names):
    """The package modules an import statement reaches (``from flax_attention import x`` reaches ``x``)."""
    if module == "flax_attention":
        return [f"flax_attention.{n}" if n in RANK else "flax_attention" for n in names]
    return [module] if module.split(".")[0] == "flax_attention" else []


def _violations(sub):
    for path in sorted((PKG / sub).rglob("*.py")):
        for module, names in _imports(path):
            for target in _targets(module, names):
                parts = target.split(".")
                if len(parts) == 1:
                    yield f"{path.relative_to(PKG)} imports the package root, which imports every layer"
                elif parts[1] not in RANK:
                    yield f"{path.relative_to(PKG)} imports {target}, which is in no layer"
                elif parts[1] != sub and RANK[parts[1]] >= RANK[sub]:
                    yield f"{path.relative_to(PKG)} ({sub}) imports {target} ({parts[1]}, not below {sub})"


def test_every_subpackage_has_a_layer():
    found = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert found == set(RANK), f"unranked: {sorted(found - set(RANK))}, missing: {sorted(set(RANK) - found)}"


@pytest.mark.parametrize("sub", sorted(RANK))
def test_imports_run_down_the_layers(sub):
    bad = list(_violations(sub))
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The layer check itself: an upward, a root, and a relative upward import are each reported."""
    fake = tmp_path / "flax_attention"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "bad.py").write_text(
        "from flax_attention.functional import masks\nfrom flax_attention import causal_mask\n"
        "from ..functional.attention import masked_softmax\nfrom flax_attention.core import checks\n"
        "from . import flash\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    bad = list(_violations("kernels"))
    assert len(bad) == 3, bad
    assert "imports flax_attention.functional (functional" in bad[0] and "package root" in bad[1]
    assert "flax_attention.functional.attention" in bad[2]


def test_package_root_holds_only_the_front_door():
    assert sorted(p.name for p in PKG.glob("*.py")) == ["__init__.py"]
