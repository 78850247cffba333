"""The core keeps the page's names; the engine needs neither lightning nor transformers."""

from __future__ import annotations

import subprocess
import sys

import lightning_compress.core as core

PAGE_NAMES = [
    "CompressionLifecycle",
    "CompressionSession",
    "Data",
    "Event",
    "EventType",
    "Hardware",
    "LifecycleCallbacks",
    "ModelParameterizedLayer",
    "ModifiedState",
    "State",
    "active_session",
    "create_session",
    "reset_session",
]
PAGE_MODULES = [
    "events",
    "helpers",
    "lifecycle",
    "model_layer",
    "session",
    "session_functions",
    "state",
]


def test_every_name_and_module_of_the_page_exists():
    for name in PAGE_NAMES:
        assert name in core.__all__ and getattr(core, name) is not None
    for module in PAGE_MODULES:
        assert hasattr(core, module)


def test_the_engine_imports_without_lightning_and_without_transformers():
    """Nothing below lightning_compress.lightning imports lightning (the design's rule), and
    transformers is an optional extra: the engine imports with both unavailable."""
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "import lightning_compress.core, lightning_compress.layers, lightning_compress.recipe\n"
        "import lightning_compress.modifiers, lightning_compress.pipelines\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]
