"""Static checks on grokserve's packages: the import-layer contracts (import-linter) and types (mypy).

The editable install maps top-level folders onto the `grokserve.*` namespace with an import hook that
neither tool can walk, so both run on a plain copy of the Python sources laid out as `grokserve/...` in a
temporary folder. Configuration lives in pyproject.toml ([tool.importlinter], [tool.mypy]).

    python scripts/static_checks.py imports     # lint-imports
    python scripts/static_checks.py types       # mypy
    python scripts/static_checks.py             # both
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# top-level folder → grokserve subpackage (pyproject's [tool.setuptools.package-dir])
PACKAGES = {"model": "model", "transport": "transport", "router": "router", "workers": "workers",
            "cluster": "cluster", "client": "client", "v1": "proto/grokserve/v1"}


def source_tree(root: Path) -> Path:
    """Copy the packages' Python sources to root/grokserve/<package>; returns `root`."""
    package = root / "grokserve"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, folder in PACKAGES.items():
        shutil.copytree(REPO / folder, package / name,
                        ignore=shutil.ignore_patterns("demo", "__pycache__", "*.proto"))
    return root


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        raise SystemExit(f"{name} is not installed (it is part of the [test] extra)")
    return str(exe)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("lint-imports"), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                          cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def type_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("mypy"), "--config-file", str(REPO / "pyproject.toml"), "--cache-dir",
                           str(root / ".mypy_cache"), "-p", "grokserve"], cwd=root, capture_output=True, text=True,
                          env={"MYPYPATH": str(root), "PATH": "/usr/bin:/bin"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", nargs="?", choices=("imports", "types", "all"), default="all")
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = source_tree(Path(tmp))
        for name, run in (("imports", lint_imports), ("types", type_check)):
            if args.check in (name, "all"):
                result = run(root)
                print(result.stdout, end="")
                print(result.stderr, end="", file=sys.stderr)
                failed |= result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
