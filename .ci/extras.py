"""Each extra installs everything its commands import: proved in a fresh virtual environment per extra.

`python .ci/extras.py [EXTRA ...]` (all of them by default) builds the wheel once, then for each
extra creates an empty environment with uv, installs `lightspan[EXTRA]` from that wheel alone and,
inside it (`--probe EXTRA`):
- imports every module of the extra's packages (top-level imports),
- finds every third-party module those modules import inside functions (lazy imports, which an
  import alone never runs; skipped only under `try: ... except ImportError` or `TYPE_CHECKING`),
- runs the extra's commands with `--help`,
- checks that the bare install's tracing path leaves torch, chDB and ClickHouse clients unimported,
  and that no CUDA build of torch came in (the CPU wheel is on this machine's disk, pinned in
  .ci/constraints.txt).
uv reads no pip configuration, so the wheel folders, indexes and constraints pip is configured
with here are passed to it: it resolves from the same sources as the README's `pip install`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lightspan.instrumentation.frameworks import FRAMEWORKS  # light: the bare install has it

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / ".ci" / "constraints.txt"  # the CPU build of torch, as for CI's pip installs
# What an agent app's process must never load just for tracing.
HEAVY = ("torch", "chdb", "clickhouse_connect", "transformers", "deepspeed", "numpy")


@dataclass(frozen=True)
class Extra:
    # Every module of these packages, and of the packages of ours they import, imports; and what
    # they import inside functions is installed. Name the ones the commands start as processes.
    packages: tuple[str, ...]
    commands: tuple[tuple[str, ...], ...] = ()  # run as `lightspan ...` unless they start with "python"
    framework: str | None = None  # an instrumentation.frameworks name: its instrumentor must enable


# Imports inside functions that are optional by design: module -> {import root: why}.
OPTIONAL = {
    "lightspan.instrumentation.tokens": {
        "openai": "runs only after the app itself imported openai (a post-import hook)",
    },
    "lightspan.store.export": {
        "datasets": "only `lightspan export --format hf`, a command of [train], which brings it",
    },
}
STORE_COMMANDS = (
    ("store", "--help"),
    ("sql", "--help"),
    ("rollouts", "--help"),
    ("show", "--help"),
    ("resources", "--help"),
)

EXTRAS: dict[str, Extra] = {
    "": Extra(
        (
            "lightspan.instrumentation",
            "lightspan.cli",
            "lightspan.semconv",
            "lightspan.types",
            "lightspan.errors",
        ),
        (("--help",), ("--version",)),
    ),
    "store": Extra(("lightspan.store",), STORE_COMMANDS),
    "collector": Extra(
        ("lightspan.collector",), (("collector", "--help"), ("up", "--help"), *STORE_COMMANDS)
    ),
    "train": Extra(
        ("lightspan.trainer",),
        (
            ("train", "--help"),
            ("report", "--help"),
            ("export", "--help"),
            ("python", "-m", "lightspan.trainer", "--help"),
        ),
    ),
    "serve": Extra(("lightspan.serving",), (("serve", "--help"),)),
    # The loop starts the collector, `python -m lightspan.trainer` and `lightspan serve`.
    "loop": Extra(
        ("lightspan.loop", "lightspan.collector", "lightspan.trainer", "lightspan.serving"),
        (
            ("demo", "--help"),
            ("optimize-prompt", "--help"),
            ("collector", "--help"),
            ("train", "--help"),
            ("serve", "--help"),
        ),
    ),
    # One per framework instrumentor, as the registry names its extra.
    **{
        extra: Extra(("lightspan.instrumentation",), framework=name)
        for name, (_, _, extra) in FRAMEWORKS.items()
    },
}


# --- inside the extra's environment --------------------------------------------------------------
def _modules(package: str) -> list[str]:
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + "."):
        if not info.name.endswith(".__main__"):  # running it is what `--help` below does
            names.append(info.name)
    return names


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `try: ... except ImportError` or `if TYPE_CHECKING:`: optional by the code's own say."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = ast.unparse(handler.type) if handler.type else "BaseException"
                if "ImportError" in names or "ModuleNotFoundError" in names:
                    return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        child, parent = parent, parents.get(parent)
    return False


def _imports(module: str) -> set[str]:
    """What `module` may import when its functions run: the third-party modules it imports inside
    functions, unguarded (its top-level imports ran when it was imported), and our packages it
    imports anywhere, so theirs are checked too."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if _guarded(node, parents):
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lightspan":
                found.add(".".join(parts[:2]))
            elif node.col_offset:
                found.add(parts[0])
    return {name for name in found if name not in sys.stdlib_module_names}


def probe(name: str) -> None:
    extra = EXTRAS[name]
    import lightspan

    assert "site-packages" in lightspan.__file__, f"lightspan from {lightspan.__file__}, not the install"
    # The extra's packages, and every package of ours they import.
    packages, seen = list(extra.packages), set(extra.packages)
    while packages:
        for module in _modules(packages.pop()):
            importlib.import_module(module)
            imports = _imports(module) - set(OPTIONAL.get(module, {}))
            ours = {m for m in imports if m.startswith("lightspan.")}
            packages += sorted(ours - seen)
            seen |= ours
            missing = sorted(m for m in imports - ours if not importlib.util.find_spec(m))
            assert not missing, f"{module} imports {missing} in functions, which [{name}] does not install"
    if name == "":
        lightspan.instrument  # noqa: B018 - the attribute access is the import under test
        from lightspan.cli import build_parser

        build_parser()  # every component's subcommands register without their dependencies
        loaded = [m for m in HEAVY if m in sys.modules]
        assert not loaded, f"tracing and the CLI parser imported {loaded}"
    if extra.framework:
        from opentelemetry.sdk.trace import TracerProvider

        from lightspan.instrumentation import frameworks

        enabled = frameworks.enable(frameworks.resolve([extra.framework]), TracerProvider())
        assert enabled, f"no instrumentor enabled for {extra.framework}"
    cuda = sorted(
        d.metadata["Name"] for d in importlib.metadata.distributions() if "nvidia" in d.metadata["Name"]
    )
    assert not cuda, f"CUDA wheels installed: {cuda}"
    for command in extra.commands:
        argv = [sys.executable, *command[1:]] if command[0] == "python" else ["lightspan", *command]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout}{result.stderr}"


# --- the driver ----------------------------------------------------------------------------------
def uv_sources() -> list[str]:
    """pip's configured wheel folders, indexes and constraints as uv arguments."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    flags = {"find-links": "--find-links", "extra-index-url": "--extra-index-url", "index-url": "--index-url"}
    flags["constraint"] = "--constraint"
    args: list[str] = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        option = flags.get(key.rsplit(".", 1)[-1])
        for item in value.strip("'\"").split() if option else ():
            if item not in args:
                args += [option, item]
    # pip takes the best version from any index; uv's default trusts the first index that has a
    # package, which the partial local mirrors here would fail.
    return [*args, "--index-strategy", "unsafe-best-match"]


def run(names: list[str]) -> None:
    uv = shutil.which("uv") or sys.exit("uv is not installed (pip install uv; it is in the [dev] extra)")
    sources = uv_sources()
    with tempfile.TemporaryDirectory(prefix="lightspan-extras-") as tmp:
        start = time.monotonic()
        subprocess.run([uv, "build", "-q", "--wheel", "--out-dir", tmp, str(REPO)], check=True)
        (wheel,) = Path(tmp).glob("lightspan-*.whl")
        print(f"extras: built {wheel.name} in {time.monotonic() - start:.0f} s", flush=True)
        for name in names:
            venv = Path(tmp, name or "bare")
            start = time.monotonic()
            subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
            python = str(venv / "bin" / "python")
            requirement = f"lightspan{f'[{name}]' if name else ''} @ {wheel.as_uri()}"
            install = [uv, "pip", "install", "-q", "--python", python, "-c", str(CONSTRAINTS), *sources]
            subprocess.run([*install, requirement], check=True)
            installed = time.monotonic()
            env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
            env.pop("PYTHONPATH", None)
            # From an empty folder, so nothing in the repository shadows the installed package.
            probe_run = subprocess.run(
                [python, str(Path(__file__).resolve()), "--probe", name], cwd=tmp, env=env, check=False
            )
            if probe_run.returncode:
                sys.exit(f"extras: [{name}] failed its check")
            done = time.monotonic()
            print(
                f"extras: [{name or 'bare'}] ok: install {installed - start:.0f} s, checks {done - installed:.0f} s",
                flush=True,
            )
            shutil.rmtree(venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help=f"default: all ({', '.join(n or 'bare' for n in EXTRAS)})")
    parser.add_argument("--probe", metavar="EXTRA", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe)
        return
    names = ["" if n == "bare" else n for n in args.extras] or list(EXTRAS)
    unknown = [n for n in names if n not in EXTRAS]
    if unknown:
        parser.error(f"unknown extras {unknown}; known: bare, {', '.join(n for n in EXTRAS if n)}")
    run(names)


if __name__ == "__main__":
    main()
