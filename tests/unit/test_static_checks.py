"""Static guarantees of the tree: the import layers of docs/architecture.md hold (import-linter contracts in
pyproject.toml: model → transport → router | workers → cluster; routers and workers never import each
other; the client depends on the generated protos only), and the packages type-check (mypy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from static_checks import lint_imports, source_tree, type_check  # noqa: E402


def test_import_contracts_are_kept(tmp_path):
    result = lint_imports(source_tree(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module,back_import", [
    ("transport/wire.py", "from grokserve.router import engine"),  # the contract imports the router
    ("router/dispatcher.py", "from grokserve.workers import server"),  # a router imports a worker
    ("workers/server.py", "from grokserve.cluster import spec"),  # a worker imports the cluster layer
    ("model/dense.py", "from grokserve.transport import wire"),  # the model imports the transport
    ("client/__init__.py", "from grokserve.model import config"),  # the client imports the model
])
def test_a_back_import_breaks_a_contract(tmp_path, module, back_import):
    root = source_tree(tmp_path)
    target = root / "grokserve" / module
    target.write_text(target.read_text() + f"\n{back_import}  # deliberate\n")
    result = lint_imports(root)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-3000:]


def test_packages_type_check(tmp_path):
    result = type_check(source_tree(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
