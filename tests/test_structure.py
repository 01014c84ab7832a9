"""The architecture's rules, read from the source: imports run downward (the core never imports a
front door, no door imports another, library code never imports the command lines), and each
room does its one job (model.py holds the math; the KV memory is kv.py's; OpenAI's request
mapping is protocol.py's)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
RUNTIME = ROOT / "runtime" / "gpt2np"
CONVERTER = ROOT / "converter" / "gpt2np_convert"
DOORS = ("serve", "ray", "explain", "cli")  # packages under gpt2np that are front doors


def module_name(path: Path) -> str:
    base = RUNTIME.parent if RUNTIME in path.parents else CONVERTER.parent
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The modules `path` imports, absolute (relative imports resolved), at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
    return found


def sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def door_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "gpt2np" and parts[1] in DOORS else None


@pytest.mark.parametrize("path", sources(RUNTIME), ids=lambda p: module_name(p))
def test_imports_run_downward(path):
    name = module_name(path)
    door = door_of(name)
    for target in imports(path):
        other = door_of(target)
        if other is None:
            continue
        if door is None:  # the core
            assert False, f"{name} (the core) imports the front door {target}"
        if other != door:
            # every door's command line may use what all command lines share
            assert target.startswith("gpt2np.cli.common") or target == "gpt2np.cli", \
                f"{name} (door {door}) imports another door: {target}"


@pytest.mark.parametrize("path", sources(RUNTIME) + sources(CONVERTER), ids=lambda p: module_name(p))
def test_library_code_never_imports_the_command_lines(path):
    name = module_name(path)
    if name.startswith("gpt2np.cli") or name.endswith(".cli") or ".cli." in name:
        return  # a command line itself
    bad = [t for t in imports(path) if t == "gpt2np.cli" or t.startswith("gpt2np.cli.") or t.endswith(".cli")
           and t.startswith(("gpt2np", "gpt2np_convert"))]
    assert not bad, f"{name} is library code but imports {bad}"


def test_model_py_holds_the_math_and_kv_py_the_memory():
    tree = ast.parse((RUNTIME / "model.py").read_text(encoding="utf-8"))
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert not [c for c in classes if c.startswith("KV")], classes
    kv = ast.parse((RUNTIME / "kv.py").read_text(encoding="utf-8"))
    assert {"KVCache", "KVArena", "KVPool"} <= {n.name for n in kv.body if isinstance(n, ast.ClassDef)}
    assert "mmap" not in imports(RUNTIME / "model.py")


def test_openais_request_mapping_lives_in_protocol_py():
    """completions.py builds no `Options` itself: the request's `to_options` does."""
    tree = ast.parse((RUNTIME / "serve" / "completions.py").read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Options"]
    assert not calls
    assert "to_options" in (RUNTIME / "serve" / "protocol.py").read_text(encoding="utf-8")


def test_the_engine_asks_the_prefix_cache_and_writes_none_of_its_state():
    """engine.py calls the prefix cache's manager; it assigns nothing on the cache or on a
    sequence's prefix slot, and imports only the two classes it builds."""
    tree = ast.parse((RUNTIME / "engine.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "prefix_cache"
                for a in n.names}
    assert imported <= {"PrefixCache", "PrefixCacheManager"}, imported
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            text = ast.unparse(target)
            assert not (".prefix_cache." in text or ".prefix." in text), f"engine.py writes {text}"


def test_a_sequence_keeps_one_slot_for_the_prefix_cache():
    tree = ast.parse((RUNTIME / "sequence.py").read_text(encoding="utf-8"))
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__init__"
                and "prompt_ids" in [a.arg for a in n.args.args])
    assigned = {t.attr for n in ast.walk(init) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
    assert "prefix" in assigned and not assigned & {"record", "keys", "cached_blocks", "lender", "salt"}


@pytest.mark.parametrize("path", sources(RUNTIME), ids=lambda p: module_name(p))
def test_the_constraint_library_stays_in_its_room(path):
    """llguidance is imported only under structured/; the core reaches that room only through
    `constraint.backend()` (lazily, so a missing extra is its one-line error)."""
    name = module_name(path)
    found = imports(path)
    if not name.startswith("gpt2np.structured"):
        assert not [t for t in found if t.split(".")[0] == "llguidance"], name
        if name != "gpt2np.constraint":
            assert not [t for t in found if t.startswith("gpt2np.structured")], name
    top_level = {a.name for n in ast.parse(path.read_text(encoding="utf-8")).body
                 if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    if name == "gpt2np.constraint":
        assert "structured" not in top_level
