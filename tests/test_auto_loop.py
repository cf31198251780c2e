"""findings.md from ledger rows: one line per experiment, the kept chain, confirmation runs."""
from llmlabs.auto.findings import experiments, render


def row(commit, status, bpb="", parent="s", **kw):
    return {"commit": commit, "status": status, "val_bpb": str(bpb), "parent": parent, "description": f"d-{commit}",
            "delta": "", "sigma": "", "reason": "", **kw}


def test_findings_table_chain_and_confirmation():
    rows = [row("s", "baseline", 1.50), row("s", "baseline", 1.52), row("s", "crash", parent="s", reason="out of memory"),
            row("a", "keep", 1.40, delta="-0.11", sigma="0.02"), row("a", "keep", 1.42, delta="-0.11", sigma="0.02"),
            row("b", "discard", 1.45, parent="a", delta="0.04", sigma="0.02", description="x | y"),
            row("c", "crash", parent="a", reason="RuntimeError: boom", result_sha="f00", chain="?"),
            row("d", "invalid", parent="a", reason="harness files changed: llmlabs/evaluate.py"),
            row("e", "keep", 1.30, parent="a", delta="-0.11", sigma="0.022"),
            row("s", "test", 1.55), row("e", "test", 1.35), row("e", "test", 1.37),
            row("e", "confirmed", parent="s", delta="-0.20", sigma="0.02", reason="held-out")]
    assert [e["commit"] for e in experiments(rows)] == ["a", "b", "c", "d", "e"]  # baseline rows are not experiments
    md = render(rows, tag="t", time_budget=300, train_args=["--depth", "8"], start="s")
    assert "budget 300 s per run; train flags `--depth 8`" in md
    assert "start s: val_bpb 1.5100 -> best e: val_bpb 1.3000 (-0.2100); 5 experiments: 2 keep, 1 discard" in md
    exp, chain = md.split("## Experiments")[1].split("## The kept chain")
    assert "| a | d-a | 1.4100 (2 runs) | -0.1100 | -5.5 | keep |" in exp
    assert "| b | x \\| y | 1.4500 | +0.0400 | +2.0 | discard |" in exp
    assert "| c | d-c | - | - | - | crash: RuntimeError: boom |" in exp
    assert "invalid: harness files changed: llmlabs/evaluate.py" in exp and "out of memory" not in md
    chain, conf = chain.split("## Confirmation")
    assert chain.strip().splitlines()[2:] == ["| s | the starting commit | 1.5100 | | |",
                                              "| a | d-a | 1.4100 | -0.1000 | -0.1000 |",
                                              "| e | d-e | 1.3000 | -0.1100 | -0.2100 |"]
    assert "| s | d-s | 1 | 1.5500 | - |" in conf
    assert "| e | d-e | 2 | 1.3600 | confirmed delta -0.2000 t -10.0 (held-out) |" in conf
