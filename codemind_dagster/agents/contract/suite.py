"""Renders the contract test suite of an intent: static test modules plus the intent as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from codemind_dagster.domain.intent import Intent

SUITE_DIR = "contract_tests"
_HERE = Path(__file__).resolve().parent
# Template module (shipped in this package) -> file name inside the suite directory.
TEMPLATES = {
    "template_test_contract_api.py": "test_contract_api.py",
    "template_contract_support.py": "contract_support.py",
}
# The platform layer every release runs in front of the app (GET /metrics); the suite checks it with the
# service's own routes, so it ships a copy, as the runtime does (resources/runtime.py).
PLATFORM_LAYER = _HERE.parents[1] / "resources" / "service_support.py"
PLATFORM_MODULE = "codemind_service.py"


def render_contract_suite(intent: Intent) -> dict[str, str]:
    """Relative path -> file text of a pytest suite checking spec v1 section 2 against any code bundle.

    Copy the files next to a bundle (which provides `service.app.create_app`) and run
    `python -m pytest tests contract_tests` from the bundle root.
    """
    files = {f"{SUITE_DIR}/{target}": (_HERE / source).read_text(encoding="utf-8")
             for source, target in TEMPLATES.items()}
    files[f"{SUITE_DIR}/{PLATFORM_MODULE}"] = PLATFORM_LAYER.read_text(encoding="utf-8")
    files[f"{SUITE_DIR}/intent.json"] = json.dumps(intent.canonical(), indent=2, sort_keys=True) + "\n"
    return dict(sorted(files.items()))
