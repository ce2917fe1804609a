"""The package's source files each stage runs: the code dependencies both orchestrators declare.

A stage runs its module (`STAGE_MODULES`) and every module of the package that one imports, followed through every
`import` statement anywhere in a file (inside functions and under `if` too, as lca's CUDA-only kernels are imported).
The variant registry (variants/__init__.py) is neither listed nor followed: a stage runs one variant, not all seven,
and adding a variant there must not re-run the others (a variant's name is in its own file, @register, so renaming
it re-runs its stages). The modules one variant runs (its file and what it imports) are `variant_sources`; the
`sources` stage writes them out with their digests (sources.json), and train, evaluate and profile depend on that
file. So those stages re-run when, and only when, their own variant's code changed, under DVC too, whose `foreach`
stages cannot list different files per variant. The GPU benchmark runs every variant, so it follows the registry.

Paths are relative to the project root, where both orchestrators run (the package lives in its src/attnbench,
installed editable); the manifest digests the files at those paths. cli.py, which only parses the command line and
calls a stage, is left out: editing it re-runs nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .files import file_digest, read_json, write_json

PACKAGE = "attnbench"
PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[1]
REGISTRY_MODULE = f"{PACKAGE}.variants"
STAGE_MODULES = {
    "fetch": ["data", "sample"],  # sample: the default corpus, data the package ships
    "prepare": ["data"],
    "sources": ["sources"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "profile": ["profile", "variants.mha"],  # mha: every variant's profile times mha's layer as its reference row
    "report": ["report"],
    "benchmark": ["benchmark"],
}


def module_path(module: str) -> Path | None:
    """The file of a module of the package (or a folder of data it ships, one without Python files), None for a
    module outside it."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return base if base.is_dir() and not any(base.glob("*.py")) else None


def imported_modules(module: str, path: Path) -> set[str]:
    """The package's modules that `path` (module `module`) imports, by absolute or relative name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join(anchor + ([node.module] if node.module else []))
            # `from .x import y`: y is a module of package x, or a name defined in module x
            found.update(f"{base}.{alias.name}" if module_path(f"{base}.{alias.name}") else base for alias in node.names)
    return {name for name in found if module_path(name) is not None}


def closure(modules: list[str], follow_registry: bool = False) -> list[str]:
    """Repository-relative paths of `modules` and every module of the package they import, sorted."""
    seen: dict[str, Path] = {}  # module -> its file or data folder
    stack = list(modules)
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        path = seen[module] = module_path(module)
        if path is None:
            raise ValueError(f"{module}: not a module of {PACKAGE} (under {PACKAGE_DIR})")
        if path.suffix == ".py" and (module != REGISTRY_MODULE or follow_registry):
            stack.extend(imported_modules(module, path) - seen.keys())
    paths = (path for module, path in seen.items() if module != REGISTRY_MODULE or follow_registry)
    files = (file for path in paths for file in ([path] if path.is_file() else sorted(path.iterdir())) if file.is_file())
    return sorted(file.relative_to(ROOT).as_posix() for file in files)


def stage_sources(stage: str) -> list[str]:
    """The files stage `stage` runs, except the modules of its variant (`variant_sources`)."""
    if stage not in STAGE_MODULES:
        raise ValueError(f"stage {stage!r}: not one of {', '.join(STAGE_MODULES)}")
    return closure([f"{PACKAGE}.{name}" for name in STAGE_MODULES[stage]], follow_registry=stage == "benchmark")


def variant_sources(entry: str) -> list[str]:
    """The files a params entry's variant runs (`mha-seed1`: mha's): its module and the package's modules it imports."""
    from .variants import REGISTRY, parse_entry

    return closure([REGISTRY[parse_entry(entry)[0]].__module__])


def write_manifest(variant: str, out: Path) -> tuple[dict, bool]:
    """sources.json: each file `variant_sources` lists, with the sha256 of that path under the working directory
    (the project root); written atomically, and only if it changed, so that its time stamp moves only with the code
    (Snakemake re-runs what follows a newer file). Returns the manifest and whether it was written."""
    files = variant_sources(variant)
    if missing := [path for path in files if not Path(path).is_file()]:
        raise FileNotFoundError(f"{missing[0]}: not under {Path.cwd()}; run the sources stage in the project root")
    manifest = {"variant": variant, "files": {path: file_digest(path) for path in files}}
    if Path(out).is_file() and read_json(out) == manifest:
        return manifest, False
    write_json(out, manifest)
    return manifest, True
