"""The parity suite runs JAX in float64 and float32 in one process: x64 must be on before
JAX starts (float32 runs pass explicit float32 arrays, so the flag does not change them)."""
import os

os.environ["JAX_ENABLE_X64"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_terminal_summary(terminalreporter):
    """Print the observed worst error of every case next to its tolerance (margins)."""
    rows = []
    for rep in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for k, v in getattr(rep, "user_properties", []):
            if k == "margins":
                rows.append(v)
    if rows:
        terminalreporter.section("parity margins (observed worst error / tolerance)")
        for r in sorted(rows):
            terminalreporter.write_line(r)
