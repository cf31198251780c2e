"""The Chinchilla scaling law L(N, D) = E + A / N^alpha + B / D^beta, fitted the way Hoffmann et al.
fitted it (arXiv 2203.15556, approach 3), with bootstrap intervals, the compute-optimal allocation
it implies, and the plots and table of `llmlabs sweep fit`.

The fit minimises sum_i Huber_delta(log L_pred(N_i, D_i) - log L_i) over (log A, log B, log E,
alpha, beta), L_pred written as a log-sum-exp (Hoffmann et al. eq. 2-3, delta = 1e-3). A Huber loss
with so small a delta is nearly an L1 loss: a few bad runs (a diverged cell) pull on it little.
Where it starts from differs from the paper, for speed:
- Starts: Hoffmann et al. run L-BFGS from a grid of 4,500 points. Here the model's linearity is
  used instead: for fixed exponents, L = E + A x + B y is linear in (E, A, B), so over a 30 x 30
  grid of (alpha, beta) the relative-error least-squares (E, A, B >= 0) is one NNLS each (900 in
  ~40 ms), and the best few distinct grid points start the Huber fit.
- Optimiser: BFGS, not L-BFGS-B. With 5 parameters L-BFGS's memory covers the whole space, so the
  two agree; but scipy's L-BFGS-B makes tiny BLAS calls every iteration, and on the 2-core machine
  with other work on it OpenBLAS's threads made that ~20 ms an iteration of this objective against
  BFGS's ~0.8 ms (5-dimensional Rosenbrock: 0.66 s against 0.02 s; 0.013 s with
  OPENBLAS_NUM_THREADS=1, which a library cannot set once numpy is loaded).
Besiroglu et al. (arXiv 2404.10102) refitted Chinchilla's own points and found the paper's intervals
far too narrow: intervals here come from a bootstrap over the runs (resample them with replacement,
refit from scratch, seeding included), percentiles 5 and 95.

Compute-optimal: with C = 6 N D, minimising L(N, C / 6N) over N gives (Hoffmann et al. eq. 4)
    N_opt = G (C/6)^(beta / (alpha + beta)),  D_opt = (C/6) / N_opt,  G = (alpha A / (beta B))^(1 / (alpha + beta)),
so the ratio D_opt / N_opt changes with C unless alpha = beta: it is reported at given budgets."""
import json
import time
from pathlib import Path

import numpy as np

PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3
EXPONENT_GRID = np.linspace(0.05, 1.5, 30)  # alpha and beta values the NNLS seeding tries
MIN_CELLS_TO_FIT = 6  # five parameters: at least one run more than the law has
STARTS = 3  # distinct seeds the Huber fit starts from (a seed is distinct 0.2 away in alpha + beta)


def law(N, D, p):
    """L(N, D) for a parameter dict p (keys PARAMS)."""
    return p["E"] + p["A"] / np.asarray(N, float) ** p["alpha"] + p["B"] / np.asarray(D, float) ** p["beta"]


def _objective(theta, logN, logD, logL, delta):
    """Sum of Huber losses of the log residuals, and its gradient in theta = (log A, log B, log E, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    r = top + np.log(s) - logL
    loss = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta)  # dHuber/dr
    share = w / s                  # d log L_pred / d (each term)
    grad = np.array([(g * share[0]).sum(), (g * share[1]).sum(), (g * share[2]).sum(),
                     -(g * share[0] * logN).sum(), -(g * share[1] * logD).sum()])
    return loss, grad


def _seeds(N, D, L, k=STARTS):
    """The k best distinct (alpha, beta) of EXPONENT_GRID by NNLS relative error, as starting thetas."""
    from scipy.optimize import nnls

    one, tried = np.ones_like(L), []
    for alpha in EXPONENT_GRID:
        for beta in EXPONENT_GRID:
            coef, rnorm = nnls(np.stack([1 / L, N ** -alpha / L, D ** -beta / L], axis=1), one)
            tried.append((rnorm, alpha, beta, coef))
    seeds = []
    for _, alpha, beta, (E, A, B) in sorted(tried, key=lambda t: t[0]):
        if all(abs(alpha - s[3]) + abs(beta - s[4]) > 0.2 for s in seeds):
            seeds.append(np.log(np.maximum([A, B, E], 1e-12)).tolist() + [alpha, beta])
        if len(seeds) == k:
            break
    return [np.array(s) for s in seeds]


def fit(N, D, L, delta=HUBER_DELTA):
    """Fit the law to runs (N, D, L); returns the parameters (keys PARAMS) and "huber", the loss."""
    from scipy.optimize import minimize

    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    logs = (np.log(N), np.log(D), np.log(L), delta)
    best = min((minimize(_objective, s, args=logs, jac=True, method="BFGS", options={"gtol": 1e-9})
                for s in _seeds(N, D, L)), key=lambda r: r.fun)
    a, b, e, alpha, beta = (float(t) for t in best.x)
    with np.errstate(over="ignore"):  # a resample with no N (or D) trend runs its A (or B) off to inf
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta,
                "huber": float(best.fun)}


def warnings(p, L, intervals, budgets):
    """What the cells do not determine, in words: a fit can match every cell and still say nothing
    about the law (few cells, short runs, a narrow range of N or D)."""
    out = []
    if p["E"] < 0.01 * np.min(L):
        out.append(f"E fitted ~0 ({p['E']:.3g}): these cells show no floor, so E and the exponents trade off freely")
    elif "E" in intervals and intervals["E"][0] < 0.01 * np.min(L):
        lo, hi = intervals["E"]
        out.append(f"E's 5-95% interval reaches ~0 ({lo:.3g} .. {hi:.3g}): resamples of these cells fit no floor, "
                   "so the floor and the exponents are not pinned down")
    for k, what in (("alpha", "N (model size)"), ("beta", "D (tokens)")):
        if p[k] > 2:
            out.append(f"{k} = {p[k]:.3g} > 2: the {what} term is spent inside the sweep (it sets apart its smallest "
                       "value from the rest); the cells do not determine how loss scales with it")
        elif p[k] < 0.02:
            out.append(f"{k} = {p[k]:.3g}: loss barely moves with {what} in these cells")
    spans = [intervals[f"ratio@{c:.3g}"] for c in budgets if f"ratio@{c:.3g}" in intervals]
    if any(not lo > 0 or hi / lo > 100 for lo, hi in spans):
        out.append("the 5-95% interval of D_opt/N_opt spans more than 100x: no compute-optimal ratio can be read "
                   "from these cells")
    return out


def compute_optimal(p, C):
    """(N_opt, D_opt, D_opt / N_opt) at compute C = 6 N D (arrays where C is one)."""
    C = np.asarray(C, float)
    G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / (p["alpha"] + p["beta"]))
    n_opt = G * (C / 6) ** (p["beta"] / (p["alpha"] + p["beta"]))
    d_opt = C / 6 / n_opt
    return n_opt, d_opt, d_opt / n_opt


def bootstrap(N, D, L, samples=200, seed=0, budgets=()):
    """Refit `samples` resamples of the runs (with replacement). Returns {name: (5th, 95th percentile)}
    for PARAMS and, per budget C in `budgets`, "ratio@C" (D_opt / N_opt there)."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(samples):
        idx = rng.integers(0, len(N), len(N))
        p = fit(N[idx], D[idx], L[idx])
        rows.append([p[k] for k in PARAMS] + [float(compute_optimal(p, c)[2]) for c in budgets])
    if not rows:
        return {}
    lo, hi = np.percentile(np.array(rows), [5, 95], axis=0)
    names = list(PARAMS) + [f"ratio@{c:.3g}" for c in budgets]
    return {k: (float(a), float(b)) for k, a, b in zip(names, lo, hi)}


# ---------------------------------------------------------------------------------------------
# plots (matplotlib, Agg) and the table

def _group_path(Ns, Ds):
    """log D = c + s log N through a budget group's runs (s = 0 for one model size): tokens budgets give
    s = 0, FLOP budgets s ~ -1, a tokens-per-parameter ratio s = 1."""
    x, y = np.log(Ns), np.log(Ds)
    if np.ptp(x) == 0:
        return lambda n: np.exp(y.mean()) * np.ones_like(n)
    s, c = np.polyfit(x, y, 1)
    return lambda n: np.exp(c + s * np.log(n))


def plot_curves(points, p, png):
    """val_bpb against N per budget group, each with the fitted law along the group's own path (D as
    a function of N through its runs); a star marks a curve's minimum where it lies inside the drawn
    range (for FLOP budgets: the isoFLOP minimum)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (group, rows) in enumerate(_groups(points).items()):
        Ns, Ds, Ls = (np.array([r[k] for r in rows], float) for k in ("N", "D", "loss"))
        ax.scatter(Ns, Ls, color=f"C{i}", s=18, zorder=3, label=group or "all")
        grid = np.geomspace(Ns.min() / 2, Ns.max() * 2, 200)
        curve = law(grid, _group_path(Ns, Ds)(grid), p)
        ax.plot(grid, curve, color=f"C{i}", lw=1)
        k = int(np.argmin(curve))
        if 0 < k < len(grid) - 1:
            ax.plot(grid[k], curve[k], "*", color=f"C{i}", ms=12, mec="k", zorder=4)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labels at 2e5, 3e5, ... overlap
    ax.set_xlabel("N (scaling parameters)")
    ax.set_ylabel("val_bpb")
    ax.set_title("runs and the fitted L(N, D) along each budget (*: fitted minimum)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, png)


def plot_predicted(points, p, png):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for i, (group, rows) in enumerate(_groups(points).items()):
        obs = np.array([r["loss"] for r in rows])
        ax.scatter(law([r["N"] for r in rows], [r["D"] for r in rows], p), obs, color=f"C{i}", s=18, label=group or "all")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("predicted val_bpb")
    ax.set_ylabel("measured val_bpb")
    ax.legend(fontsize=8)
    _save(fig, png)


def _groups(points):
    groups = {}
    for r in points:
        groups.setdefault(r["group"], []).append(r)
    return groups


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, png):
    from llmlabs.plots import _save as save  # temporary name + rename: a kill never leaves half a PNG

    fig.tight_layout()
    save(fig, png)


def table(points, p, intervals, budgets, head, notes=()):
    """The fit as markdown: `head` lines, the runs with predicted and measured loss, the parameters
    with their bootstrap intervals, and the compute-optimal allocation at each budget."""
    def iv(k):
        return f"{intervals[k][0]:.4g} .. {intervals[k][1]:.4g}" if k in intervals else "n/a"

    lines = [*head, "", "| cell | N | D (tokens) | C = 6ND | D/N | measured val_bpb | fitted | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in points:
        pred = float(law(r["N"], r["D"], p))
        lines.append(f"| {r['cell']} | {r['N']:,} | {r['D']:,} | {6 * r['N'] * r['D']:.3g} | {r['D'] / r['N']:.3g} | "
                     f"{r['loss']:.4f} | {pred:.4f} | {100 * (pred / r['loss'] - 1):+.2f}% |")
    lines += ["", "| parameter | fit | 5-95% bootstrap |", "|---|---|---|"]
    lines += [f"| {k} | {p[k]:.4g} | {iv(k)} |" for k in PARAMS]
    lines += ["", "| C (FLOPs, 6ND) | N_opt | D_opt | D_opt/N_opt | 5-95% bootstrap |", "|---|---|---|---|---|"]
    for c in budgets:
        n, d, ratio = compute_optimal(p, c)
        lines.append(f"| {c:.3g} | {n:.3g} | {d:.3g} | {ratio:.3g} | {iv(f'ratio@{c:.3g}')} |")
    if notes:
        lines += ["", "Warnings:", *[f"- {w}" for w in notes]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# `llmlabs sweep fit`: the cells' run directories -> fit, intervals, table, plots next to the spec

def cell_point(cell_dir):
    """(N, D, val_bpb) of a finished cell: N = scaling parameters (llmlabs.scaling.scaling_params, the
    count nanochat found gives the cleanest laws) of the model in its newest checkpoint, D = its exact
    training tokens, both cached in CELL/point.json. The loss is val_bpb, the lab's metric: bits per
    byte are nats per token times one constant of the val split (tokens / bytes / ln 2), so fitting
    them instead of the loss scales E, A and B by that constant and changes neither exponent nor the
    compute-optimal allocation."""
    from llmlabs import checkpoint
    from llmlabs.common import LabError, atomic_write_json
    from llmlabs.config import GPTConfig
    from llmlabs.scaling import scaling_params

    summary = json.loads((cell_dir / "summary.json").read_text())
    if "val_bpb" not in summary:
        raise LabError(f"{cell_dir} has no val_bpb in its summary.json (run with --eval-split none or test?): "
                       f"score it with `llmlabs eval {cell_dir}`, or drop that flag from the spec")
    cache = cell_dir / "point.json"
    if cache.exists() and cache.stat().st_mtime >= (cell_dir / "summary.json").stat().st_mtime:
        return json.loads(cache.read_text())
    state = checkpoint.load_newest(cell_dir)["state"]
    point = {"N": scaling_params(GPTConfig(**state["model_config"])), "D": int(state["tokens_done"]),
             "loss": summary["val_bpb"]}
    atomic_write_json(cache, point)
    return point


def fit_sweep(spec, sweep_dir, samples):
    from llmlabs.common import LabError, atomic_write_json
    from llmlabs.sweep import is_done, one_corpus

    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    done = [c for c in spec.cells if is_done(sweep_dir / "cells" / c.name)]
    corpus = one_corpus(sweep_dir, [c.name for c in done])  # cells of two corpora are refused first
    if len(done) < MIN_CELLS_TO_FIT:
        raise LabError(f"{sweep_dir}: {len(done)} of {len(spec.cells)} cells are done; the fit needs at least "
                       f"{MIN_CELLS_TO_FIT}: `llmlabs sweep run {spec.path}` first")
    others = [k for k in spec.grid if k != "depth"]  # a budget group: the cells that share every other axis
    points = []
    for cell in done:
        group = ", ".join(f"{k}={cell.values[k]:g}" if isinstance(cell.values[k], float) else f"{k}={cell.values[k]}"
                          for k in others)
        points.append({"cell": cell.name, "group": group, **cell_point(sweep_dir / "cells" / cell.name)})
    N, D, L = (np.array([r[k] for r in points], float) for k in ("N", "D", "loss"))
    p = fit(N, D, L)
    C = 6 * N * D
    budgets = [float(C.min()), float(np.exp(np.log(C).mean())), float(C.max())]
    print(f"fitting {len(points)} cells; bootstrap {samples} resamples ...", flush=True)
    intervals = bootstrap(N, D, L, samples=samples, budgets=budgets)
    out = spec.path.with_name(spec.path.stem)
    files = {k: Path(f"{out}-{k}") for k in ("fit.md", "fit.json", "curves.png", "predicted.png")}
    head = [f"# Sweep {spec.name}: L(N, D) = E + A/N^alpha + B/D^beta", "",
            f"Spec {spec.path.name} (sha256 {spec.sha256[:16]}), started {manifest['started']} at commit "
            f"{manifest['commit']}; {len(done)} of {len(spec.cells)} cells done; fitted "
            f"{time.strftime('%Y-%m-%d %H:%M')} with `llmlabs sweep fit` ({samples} bootstrap resamples).",
            "", "Hypotheses (preregistered):", *[f"- {h}" for h in spec.hypotheses], "",
            f"Success criteria (preregistered): {spec.success}", "",
            "L = val_bpb; N = scaling parameters (block matrices + lm_head); D = training tokens; C = 6ND. "
            "Fit: Hoffmann et al. approach 3 (Huber 1e-3 on log residuals), llmlabs/scaling_fit.py.", "", corpus + "."]
    notes = warnings(p, L, intervals, budgets)
    files["fit.md"].write_text(table(points, p, intervals, budgets, head, notes))
    atomic_write_json(files["fit.json"], {"params": p, "intervals": intervals, "points": points, "bootstrap": samples,
                                          "warnings": notes,
                                          "compute_optimal": [dict(zip(("C", "N_opt", "D_opt", "ratio"),
                                                                       (c, *map(float, compute_optimal(p, c)))))
                                                              for c in budgets]})
    plot_curves(points, p, files["curves.png"])
    plot_predicted(points, p, files["predicted.png"])
    print(f"E {p['E']:.4g}  A {p['A']:.4g}  B {p['B']:.4g}  alpha {p['alpha']:.3f}  beta {p['beta']:.3f}")
    for c in budgets:
        n, d, ratio = compute_optimal(p, c)
        iv = intervals.get(f"ratio@{c:.3g}")
        print(f"C {c:.3g}: N_opt {n:.3g}, D_opt {d:.3g}, D_opt/N_opt {ratio:.3g}" +
              (f" (5-95%: {iv[0]:.3g} .. {iv[1]:.3g})" if iv else ""))
    for w in notes:
        print(f"warning: {w}")
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0
