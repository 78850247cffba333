"""The core keeps the reference page's names and never imports lightning."""

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


def test_core_does_not_import_lightning():
    code = (
        "import sys, lightning_compress.core, lightning_compress.recipe, "
        "lightning_compress.modifiers; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_modifiers_and_pipelines_import_without_transformers():
    """transformers is an optional extra: the package's engine must not need it to import."""
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import lightning_compress.core, lightning_compress.layers, lightning_compress.recipe\n"
        "import lightning_compress.modifiers, lightning_compress.pipelines\n"
        "print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]
