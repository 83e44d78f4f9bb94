"""The kernels' tests end with the largest normwise errors they saw (Triton against float64, and the
torch backend beside it), printed in pytest's terminal summary."""

import sys


def pytest_terminal_summary(terminalreporter):
    module = sys.modules.get("tests.kernels.test_topk_triton")
    errors = getattr(module, "ERRORS", None)
    if not errors:
        return
    terminalreporter.section("largest normwise errors of the top-k losses")
    for key, err in sorted(errors.items()):
        terminalreporter.write_line(f"{key}: {err:.2e}")
