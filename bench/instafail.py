"""A pytest plugin for bench/gpu_suite.sh: each failure's traceback printed when it happens, not in
the summary at the end, which a device call's time limit may cut off (at 81130ab and 03e7972 two
failures on the H200 left only their names).

    python3 -m pytest -p instafail ...   (bench/ on PYTHONPATH)
"""


def pytest_runtest_logreport(report):
    if report.failed:
        print(f"\n--- {report.nodeid} failed ({report.when}):\n{report.longreprtext}\n", flush=True)
