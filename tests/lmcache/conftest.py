import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for _target

EXAMPLE = Path(__file__).parents[2] / "examples" / "lmcache" / "run_on_cpu.py"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LMCache and the connectors' prefetch tasks are asyncio


def lmcache_installed() -> bool:
    return importlib.util.find_spec("lmcache") is not None


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lmcache_run_on_cpu", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# These run inside the LMCache venv (test_lmcache_venv.py starts them there); in the project's
# venv, where LMCache cannot be installed, they are not collected at all rather than skipped.
collect_ignore = [] if lmcache_installed() else ["test_with_lmcache.py"]
