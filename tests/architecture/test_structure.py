"""The shape of the code base, checked: import direction, no import cycles, short functions and
modules, a torch-free runtime, and one owner per contract.

Imports are read from the source (AST), every ``import`` statement counted, including those inside
functions (a cycle through a deferred import is still two modules that cannot be understood, tested
or changed apart) and those under ``TYPE_CHECKING``. A package that does not exist (yet) is skipped.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "network", "toolchain", "coils", "trainer", "server", "client", "benchmarks", "protos", "deploy")
#: Where the one-owner rules look: every package, and the scripts in tools/.
SCANNED = (*PACKAGES, "tools")
LENGTH_CHECKED = ("engine", "network", "toolchain", "coils", "trainer", "server", "client")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500
# Functions and modules owned by another change in flight (the value names its branch); the
# integrator deletes an entry once that branch is merged. engine/, network/ and toolchain/ have none.
LENGTH_ALLOWED: dict[tuple[str, str], str] = {}
MODULE_LENGTH_ALLOWED: dict[str, str] = {}


def _package_files(packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    """Every Python source file of ``packages`` (generated gRPC code excluded), missing packages skipped."""
    files = []
    for package in packages:
        if (ROOT / package).is_dir():
            files += [p for p in sorted((ROOT / package).rglob("*.py")) if "_pb2" not in p.name]
    return files


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else ():
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
            candidates = bases
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # The longest prefix that is one of ours: "engine.graph.shape" -> engine.graph.
            parts = candidate.split(".")
            for i in range(len(parts), 0, -1):
                prefix = ".".join(parts[:i])
                if prefix in modules:
                    if prefix != name:
                        targets.add(prefix)
                    break
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_walk_sees_real_edges() -> None:
    graph = _graph()
    assert "engine.graph" in graph["engine.backends.onnxruntime"]
    assert "trainer.rundir" in graph["trainer.fit"] and "network.build" in graph["trainer.loop"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other (directly or round a loop): " + "; ".join(
        " <-> ".join(c) for c in cycles)


# CONVENTIONS.md: network, toolchain, trainer, server and benchmarks import engine; engine imports none
# of them; the network (torch) imports no tool built on it; protos imports nothing of ours.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "engine": ("network", "toolchain", "coils", "trainer", "server", "client", "benchmarks", "deploy"),
    "network": ("toolchain", "coils", "trainer", "server", "client", "benchmarks", "deploy"),
    "toolchain": ("coils", "trainer", "server", "client", "benchmarks", "deploy"),
    # The line's words (geometry, line folders, defect records): engine only, so that the server, the
    # trainer's line simulator and the camera side can all import it.
    "coils": ("network", "toolchain", "trainer", "server", "client", "benchmarks", "protos", "deploy"),
    # The camera side installs without the server: it imports engine, coils and protos only.
    "client": ("network", "toolchain", "trainer", "server", "benchmarks", "deploy"),
    "protos": ("engine", "network", "toolchain", "coils", "trainer", "server", "client", "benchmarks", "deploy"),
}


def test_dependencies_point_one_way() -> None:
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in sorted(targets)
             if target.split(".")[0] in FORBIDDEN.get(module.split(".")[0], ())]
    assert not wrong, wrong


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (not inside a function), by their full dotted name."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.add(child.module)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names


def test_toolchain_loads_the_network_only_when_it_needs_it() -> None:
    # `engine info model.onnx` and `engine build` run on a serving install without torch.
    eager = [f"{path.relative_to(ROOT)} imports {name}" for path in _package_files(("toolchain",))
             for name in sorted(_top_level_imports(path)) if name.split(".")[0] in ("network", "torch")]
    assert not eager, eager


# Imported in a fresh interpreter in which torch cannot be imported: what a serving install has.
# argv[1]: the runtime's modules (after them nothing of network/toolchain/trainer may be loaded);
# argv[2]: further modules that must import without torch too.
_TORCH_FREE_PROBE = """
import importlib, json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
failed, loaded = {}, []
for phase, names in enumerate(json.loads(arg) for arg in sys.argv[1:]):
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, not the first
            failed[name] = f"{type(exc).__name__}: {exc}"
    if phase == 0:
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"network", "trainer", "toolchain"})
print(json.dumps({"failed": failed, "loaded": loaded}))
"""


def test_the_runtime_imports_without_torch() -> None:
    runtime = sorted(name for name in _modules() if name.split(".")[0] in ("engine", "coils", "server"))
    tools = sorted(name for name in _modules() if name.split(".")[0] == "toolchain") + ["network.config"]
    assert "engine.backends.onnxruntime" in runtime and "server.serve" in runtime and "toolchain.info" in tools
    done = subprocess.run([sys.executable, "-c", _TORCH_FREE_PROBE, json.dumps(runtime), json.dumps(tools)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failed"], f"these modules need torch (or fail) at import time: {report['failed']}"
    assert not report["loaded"], f"importing engine and server loaded {report['loaded']}"


def _long_functions() -> dict[tuple[str, str], int]:
    long = {}
    for path in _package_files(LENGTH_CHECKED):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[(path.relative_to(ROOT).as_posix(), node.name)] = lines
    return long


def _long_modules() -> dict[str, int]:
    counts = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
              for path in _package_files(LENGTH_CHECKED)}
    return {name: n for name, n in counts.items() if n > MAX_MODULE_LINES}


def test_no_function_is_longer_than_60_lines() -> None:
    long = _long_functions()
    unexpected = {k: v for k, v in long.items() if k not in LENGTH_ALLOWED}
    assert not unexpected, "split these (file, function: lines): " + ", ".join(
        f"{f} {name}: {n}" for (f, name), n in sorted(unexpected.items()))
    stale = [k for k in LENGTH_ALLOWED if k not in long]
    assert not stale, f"no longer too long, delete from LENGTH_ALLOWED: {stale}"


def test_no_module_is_longer_than_500_lines() -> None:
    long = _long_modules()
    unexpected = {k: v for k, v in long.items() if k not in MODULE_LENGTH_ALLOWED}
    assert not unexpected, "split these (file: lines): " + ", ".join(f"{f}: {n}" for f, n in sorted(unexpected.items()))
    stale = [k for k in MODULE_LENGTH_ALLOWED if k not in long]
    assert not stale, f"no longer too long, delete from MODULE_LENGTH_ALLOWED: {stale}"


def test_nothing_is_allowed_in_the_refactored_packages() -> None:
    owned = ("engine/", "network/", "toolchain/")
    assert not [k for k in LENGTH_ALLOWED if k[0].startswith(owned)]
    assert not [k for k in MODULE_LENGTH_ALLOWED if k.startswith(owned)]


# --------------------------------------------------------------------------- one owner per contract


def _code_nodes(path: Path) -> list[ast.AST]:
    """Every AST node of a file, docstrings left out (prose may name what code must not spell out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node for node in ast.walk(tree) if id(node) not in docstrings]


def _violations(rule, owners: tuple[str, ...]) -> list[str]:
    found = []
    for path in _package_files(SCANNED):
        name = path.relative_to(ROOT).as_posix()
        if name in owners:
            continue
        found += [f"{name}:{node.lineno}: {ast.unparse(node)[:80]}" for node in _code_nodes(path) if rule(node, name)]
    return found


#: The inspection graph's output names: engine/graph.py owns them; everyone else imports them.
OUTPUT_NAMES = ("masks", "counts", "present", "probs")
#: The same words used for something other than a graph output (file, word): why.
OUTPUT_WORDS_ALLOWED: dict[tuple[str, str], str] = {
    ("engine/overlay.py", "present"): "the decision shown to the operator, and an argument's name in an error",
    ("server/console_state.py", "counts"): "a key of the console's JSON state, not a graph tensor",
    ("server/console_state.py", "present"): "a key of the console's JSON state, not a graph tensor",
}


def _is_output_name(node: ast.AST, name: str) -> bool:
    return (isinstance(node, ast.Constant) and node.value in OUTPUT_NAMES
            and (name, node.value) not in OUTPUT_WORDS_ALLOWED)


def test_graph_output_names_are_spelled_only_in_engine_graph() -> None:
    found = _violations(_is_output_name, ("engine/graph.py",))
    assert not found, "use engine.graph (MASKS.name, COUNTS.name, PRESENT.name, PROBS_NAME): " + "; ".join(found)
    stale = [k for k in OUTPUT_WORDS_ALLOWED
             if (ROOT / k[0]).is_file() and f'"{k[1]}"' not in (ROOT / k[0]).read_text(encoding="utf-8")]
    assert not stale, f"delete from OUTPUT_WORDS_ALLOWED: {stale}"


def _is_rename(node: ast.AST, name: str) -> bool:
    """``os.replace``/``os.rename``/``shutil.move``, or ``path.replace(target)``/``path.rename(target)``
    (one positional argument: ``str.replace`` takes two, ``dataclasses.replace`` is excluded by name)."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return False
    owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
    if owner in ("os", "shutil"):
        return node.func.attr in ("replace", "rename", "move")
    return (node.func.attr in ("replace", "rename") and owner != "dataclasses" and len(node.args) == 1
            and not node.keywords)


def test_files_are_replaced_only_by_engine_files() -> None:
    found = _violations(_is_rename, ("engine/files.py",))
    assert not found, "write through engine.files.atomic_write / atomic_path: " + "; ".join(found)


_DEVICE_WORDS = ("auto", "cpu", "cuda", "cuda:")


def _names_device(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return "device" in text and ".type" not in text


def _is_device_parsing(node: ast.AST, name: str) -> bool:
    """A device string taken apart by hand: ``device.startswith("cuda")``, ``device.split(":")``,
    ``device == "cpu"`` (a torch.device's ``.type`` is not a string to parse)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        args = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if node.func.attr == "startswith" and any(a in _DEVICE_WORDS for a in args):
            return True
        return node.func.attr in ("split", "rsplit", "partition") and ":" in args and _names_device(node.func.value)
    if isinstance(node, ast.Compare):
        sides = [node.left, *node.comparators]
        words = [s for s in sides if isinstance(s, ast.Constant) and s.value in _DEVICE_WORDS]
        return bool(words) and any(_names_device(s) for s in sides if not isinstance(s, ast.Constant))
    return False


def test_device_strings_are_parsed_only_in_engine_devices() -> None:
    found = _violations(_is_device_parsing, ("engine/devices.py",))
    assert not found, "use engine.devices (parse_device, is_cuda, cuda_index): " + "; ".join(found)


def test_the_owner_rules_catch_what_they_forbid() -> None:
    def nodes(source: str) -> list[ast.AST]:
        return list(ast.walk(ast.parse(source)))

    assert any(_is_output_name(n, "x.py") for n in nodes('out["masks"]'))
    assert not any(_is_output_name(n, "x.py") for n in nodes("out[graph.MASKS.name]"))
    assert any(_is_rename(n, "x.py") for n in nodes("tmp.replace(path)"))
    assert any(_is_rename(n, "x.py") for n in nodes("os.replace(tmp, path)"))
    assert not any(_is_rename(n, "x.py") for n in nodes('s.replace("a", "b"); dataclasses.replace(cfg, a=1)'))
    assert any(_is_device_parsing(n, "x.py") for n in nodes('self.device.startswith("cuda")'))
    assert any(_is_device_parsing(n, "x.py") for n in nodes('int(self.device.split(":")[1])'))
    assert any(_is_device_parsing(n, "x.py") for n in nodes('variant.device == "cpu"'))
    assert not any(_is_device_parsing(n, "x.py") for n in nodes('x.device.type == "cuda"; kind == "cuda"'))
