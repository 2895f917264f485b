"""Helpers shared by the tests of every component, imported as `tests.helpers.<module>`.

pytest puts the repository root on `sys.path` (`pythonpath` in pyproject.toml), so these imports
work from any test folder and from `pytest tests/<component>` alike.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
FIXTURES = TESTS / "fixtures"
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"
