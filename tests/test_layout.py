"""The package layout: imports run one way, and the flat import paths of earlier releases still work."""

import ast
import importlib
import pathlib

import pytest

import flax_attention
from flax_attention import _compat

PKG = pathlib.Path(flax_attention.__file__).parent
# Lower rank = lower layer; a module may import its own layer and the layers below.
RANK = {"kernels": 0, "functional": 1, "linen": 2, "nnx": 3, "models": 4, "data": 5, "embed": 5, "training": 6}
# The kernels read the mask helpers and input validation, which sit with the functions users call.
KERNEL_MAY_USE = {"flax_attention.functional.masks", "flax_attention.functional._validation"}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "flax_attention" and parts[1] in RANK else None


@pytest.mark.parametrize("sub", sorted(RANK))
def test_imports_run_down_the_layers(sub):
    bad = []
    for path in sorted((PKG / sub).rglob("*.py")):
        for module, names in _imports(path):
            targets = [module] if module != "flax_attention" else [f"flax_attention.{n}" for n in names]
            for target in targets:
                layer = _layer(target)
                if target.startswith("flax_attention.") and target.split(".")[1] in _compat.MOVED:
                    bad.append(f"{path.relative_to(PKG)} uses the old path {target}")
                elif layer is None or RANK[layer] <= RANK[sub]:
                    continue
                elif not (sub == "kernels" and target in KERNEL_MAY_USE):
                    bad.append(f"{path.relative_to(PKG)} ({sub}) imports {target} ({layer})")
            if sub == "kernels" and (_layer(module) == "functional") and module not in KERNEL_MAY_USE:
                bad.append(f"{path.relative_to(PKG)} (kernels) imports {module}")
    assert not bad, "\n".join(bad)


def test_package_root_holds_only_the_front_door():
    assert sorted(p.name for p in PKG.glob("*.py")) == ["__init__.py", "_compat.py"]


@pytest.mark.parametrize("old", sorted(_compat.MOVED))
def test_old_flat_paths_import_the_moved_code(old):
    module = importlib.import_module(f"flax_attention.{old}")
    targets = [importlib.import_module(f"flax_attention.{t}") for t in _compat.MOVED[old]]
    if len(targets) == 1:
        assert module is targets[0]  # the same object: patching the old path patches the code
    for target in targets:
        for name in [n for n in vars(target) if not n.startswith("_")]:
            assert getattr(module, name) is getattr(target, name) or len(targets) > 1


def test_old_paths_of_split_modules_expose_both_halves():
    from flax_attention.additive import AdditiveAttention, additive_scores
    from flax_attention.positions import SinusoidalPositionalEncoding, apply_rotary
    from flax_attention.functional.additive import additive_scores as f
    from flax_attention.functional.positions import apply_rotary as r
    from flax_attention.linen.additive import AdditiveAttention as a
    from flax_attention.linen.positions import SinusoidalPositionalEncoding as p
    assert (AdditiveAttention, additive_scores, SinusoidalPositionalEncoding, apply_rotary) == (a, f, p, r)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        importlib.import_module("flax_attention.positions").nope


def test_renamed_data_and_training_modules_keep_their_old_names():
    import flax_attention.data.tasks as old_tasks
    import flax_attention.training.inspect as old_inspect
    from flax_attention.data import synthetic
    from flax_attention.training import inspector
    assert old_tasks is synthetic and old_inspect is inspector
