"""`llmlabs auto <init|baseline|run|loop|confirm|promote|report>`: the autoresearch commands (program.md
tells an agent how to use them)."""
import json
import os

from llmlabs import flags
from llmlabs.auto import runner
from llmlabs.auto.surface import RESEARCH_SURFACE
from llmlabs.auto.ledger import clean
from llmlabs.auto.session import init_session, locate
from llmlabs.auto.stats import DEFAULT_ALPHA, DEFAULT_BASELINES, MIN_BASELINES
from llmlabs.common import LabError, make_dir


def add_args(p):
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{init,baseline,run,loop,confirm,promote,report}")

    def cmd(name, help_):
        s = sub.add_parser(name, help=help_, description=help_)
        if name != "init":
            s.add_argument("--tag", help="the session (default: the one whose worktree you are in, or the only one)")
        if name in ("baseline", "loop", "confirm", "promote"):
            g = s.add_argument_group("workers as SLURM jobs (through submitit: pip install 'llmlabs[sweep]')")
            g.add_argument("--slurm", type=flags.positive_int, metavar="N",
                           help="N workers whose runs are SLURM jobs of one GPU each, on any node (the session "
                                "directory must be on a shared filesystem); instead of --gpus")
            g.add_argument("--partition", help="SLURM partition (with --slurm)")
            g.add_argument("--slurm-minutes", type=flags.positive_int,
                           help="a run's job time limit (default: the session's timeout + 10 minutes)")
            g.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                           help="local: submitit runs the jobs on this machine (to try a setup without a cluster)")
        return s

    s = cmd("init", "start a session: branch auto/TAG in its own worktree, ledger, harness fingerprint")
    s.add_argument("--tag", required=True, help="session name; the branch is auto/TAG")
    s.add_argument("--data", help="a prepared data directory or corpus name (default: the pystdlib corpus at vocab 8192)")
    s.add_argument("--time-budget", type=flags.positive_float, default=300.0, help="seconds of training per experiment")
    s.add_argument("--timeout", type=flags.positive_float, help="hard wall-clock limit per run (default 1.5 x budget + 180 s)")
    s.add_argument("--train-args", default="", help='further fixed `llmlabs train` flags, e.g. "--depth 8 --device cuda"')
    s.add_argument("--alpha", type=flags.fraction, default=DEFAULT_ALPHA,
                   help="false-keep rate of the keep rule: a no-op change is kept with this probability")
    s.add_argument("--baselines", type=flags.positive_int, default=DEFAULT_BASELINES,
                   help=f"baseline runs (unchanged code, new seeds) before the first decision; at least {MIN_BASELINES}")
    s.add_argument("--no-compile-cache", action="store_true",
                   help="give every run an empty torch.compile cache of its own instead of the session's shared one "
                        "(slower: each run compiles from scratch; for measuring what the cache saves)")
    s.add_argument("--repeat-near", type=flags.count, default=1,
                   help="extra seeds for a marginal keep (within one sigma_d beyond the threshold)")

    s = cmd("baseline", "measure the noise: the unchanged frontier commit under several seeds")
    s.add_argument("--repeats", type=flags.positive_int, help="runs, one seed each (default: as many as the session still needs)")
    s.add_argument("--gpus", help="spread the runs over these GPUs, e.g. 0,1,2,3")

    s = cmd("run", "commit the working change, train it under the budget, keep or discard it")
    s.add_argument("-m", "--message", required=True, help="what this experiment tries (one line)")
    s.add_argument("--seed", type=flags.count, help="first seed (default: one no run of the session has used)")

    s = cmd("loop", "call an agent once per iteration and run its change, until --iterations, --hours, "
                    "--plateau or Ctrl-C")
    s.add_argument("--agent", required=True, help='a command ("claude -p", prompt on stdin or {prompt_file}) '
                                                  "or openai:URL for an OpenAI-compatible chat endpoint")
    s.add_argument("--model", help="model name for --agent openai:URL")
    s.add_argument("--key-env", default="OPENAI_API_KEY", help="environment variable holding the endpoint's key")
    s.add_argument("--agent-timeout", type=flags.positive_float, default=1800.0, help="seconds one agent turn may take")
    s.add_argument("--agent-rw", action="append", default=[], metavar="PATH",
                   help="a path the sandboxed command agent may write besides its worktree, e.g. ~/.claude "
                        "(its own state); repeatable")
    s.add_argument("--iterations", type=flags.count, default=0,
                   help="iterations per worker, an agent's turn and its experiment each (0: no limit)")
    s.add_argument("--hours", type=flags.positive_float,
                   help="start no new iteration after this many hours of wall time (one under way finishes)")
    s.add_argument("--plateau", type=flags.positive_int, metavar="N",
                   help="stop after N experiments in a row, over all workers, without a keep (discard, crash "
                        "and invalid count; an iteration where the agent changed nothing does not)")
    s.add_argument("--gpus", help="one worker per GPU, each in its own worktree, e.g. 0,1,2,3")
    s.add_argument("--baseline-repeats", type=flags.positive_int,
                   help="seeds of the baseline when the session has fewer baseline runs than it needs "
                        "(default: as many as it still needs)")

    s = cmd("confirm", "re-run the best kept commit and the start on the held-out test split")
    s.add_argument("--seeds", type=flags.positive_int, default=3, help="runs per commit")
    s.add_argument("--gpus", help="spread the runs over these GPUs")

    s = cmd("promote", "after confirm: each kept change removed in turn on the test split (its share of the gain), "
                       "then branch promote/TAG of the load-bearing ones and a draft sweep spec")
    s.add_argument("--seeds", type=flags.positive_int, default=3, help="runs per change removed (on the seeds confirm uses)")
    s.add_argument("--gpus", help="spread the runs over these GPUs")
    s.add_argument("--out", help="directory for promote.md and promote-TAG.toml (default: the session directory)")

    s = cmd("report", "progress plot, kept changes, crashes and time, findings.md; --json for agents")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--out", help="directory for report.png, report.md and findings.md (default: the session directory)")


def sandbox_line() -> str:
    from llmlabs.auto import sandbox

    if sandbox.available():
        return "sandbox: bubblewrap (agent: its worktree only; training and evaluation: no network, no held-out data)"
    return ("sandbox: none, bubblewrap is not usable here (" + sandbox.why_not() + "): agent unsandboxed; training "
            "and evaluation are guarded by the harness's file guard only")


def _workers(session, args, default_worker="main"):
    gpus = args.gpus
    if args.slurm:
        if gpus:
            raise LabError("--gpus and --slurm both say where runs go: give one of them")
        return _slurm_workers(session, args)
    if args.partition or args.slurm_minutes or args.cluster != "slurm":
        raise LabError("--partition, --slurm-minutes and --cluster are for --slurm N: add it, or drop them")
    if not gpus:
        return [session.worker(default_worker)]
    try:
        ids = [int(g) for g in gpus.split(",")]
    except ValueError:
        raise LabError(f"--gpus {gpus!r}: give GPU indices separated by commas, e.g. 0,1,2") from None
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise LabError(f"--gpus {gpus!r}: each GPU once, indices >= 0 (never two experiments on one GPU)")
    return [session.worker(f"gpu{i}") for i in ids]


def _slurm_workers(session, args):
    """args.slurm workers sharing one submitit executor; each run is a job of one GPU (runs.train)."""
    try:
        import submitit
    except ImportError:
        raise LabError("--slurm needs submitit: pip install 'llmlabs[sweep]' (or pip install submitit)") from None
    ex = submitit.AutoExecutor(folder=str(session.dir / "slurm"), cluster=args.cluster)
    params = {"timeout_min": args.slurm_minutes or int(session.timeout / 60) + 10, "gpus_per_node": 1, "nodes": 1,
              "tasks_per_node": 1, "name": f"auto-{session.tag}"}
    if args.partition:
        params["slurm_partition"] = args.partition
    ex.update_parameters(**params)
    workers = [session.worker(f"slurm{i}") for i in range(args.slurm)]
    for w in workers:
        w.executor = ex
    return workers


def run(args):
    try:
        return _run(args)
    except KeyboardInterrupt:  # runs are killed, an uncommitted change is handed back (runner.experiment)
        print("\ninterrupted: no row was written for the experiment in flight; run the command again to go on")
        return 130


def _run(args):
    if args.cmd == "init":
        s = init_session(os.getcwd(), args.tag, data=args.data, time_budget=args.time_budget, timeout=args.timeout,
                         train_args=args.train_args, alpha=args.alpha, repeat_near=args.repeat_near,
                         baselines=args.baselines, compile_cache=not args.no_compile_cache)
        print(f"session {s.tag}: {s.dir}\nbranch auto/{s.tag} from {s.base[:12]}, worktree {s.worker('main').path}\n"
              f"fingerprint {s.cfg['fingerprint'][:16]} ({len(s.cfg['expected']['harness'])} harness files, "
              f"data {s.data}, budget {s.time_budget:g} s, timeout {s.timeout:g} s)\n"
              f"keep rule: one-sided t-test at alpha {s.alpha:g} after {s.baselines} baseline runs\n"
              f"research surface (the only files an experiment may change): {', '.join(RESEARCH_SURFACE)}\n"
              f"{sandbox_line()}\n"
              f"next: llmlabs auto baseline")
        return 0
    session, worker = locate(os.getcwd(), args.tag)
    if args.cmd == "baseline":
        rows = runner.baseline(session, _workers(session, args, worker), args.repeats)
        vals = ", ".join(f"{r['val_bpb']:.6f}" if r["val_bpb"] is not None else r["status"] for r in rows)
        print(f"baseline {rows[0]['commit']}: val_bpb {vals}; sigma {rows[0]['sigma']:.6f} (all baseline runs so far)"
              if rows[0]["sigma"] is not None else f"baseline {rows[0]['commit']}: val_bpb {vals}")
    elif args.cmd == "run":
        out = runner.experiment(session, session.worker(worker), args.message, args.seed)
        print("---")
        for k in ("status", "commit", "val_bpb", "delta", "sigma", "parent", "memory_gb", "wall_s", "run", "reason"):
            print(f"{k + ':':<11}{clean(out[k])}")
    elif args.cmd == "loop":
        from llmlabs.auto.agents import make_agent
        from llmlabs.auto.loop import loop

        agent = make_agent(args.agent, args.model, args.key_env, args.agent_timeout,
                           hide=[session.dir, session.data], rw=[os.path.expanduser(p) for p in args.agent_rw])
        loop(session, _workers(session, args, worker), agent, args.iterations, args.baseline_repeats,
             hours=args.hours, plateau=args.plateau)
    elif args.cmd == "confirm":
        res = runner.confirm(session, _workers(session, args, worker), args.seeds)
        for name in ("start", "best"):
            c = res["commits"][name]
            print(f"{name:<6}{c['commit']}  test_bpb {c['mean']:.6f} +- {c['std']:.6f} over {len(c['test_bpb'])} seeds")
        print(f"difference {res['diff']:+.6f} +- {res['se']:.6f} (standard error), Welch t = {res['t']:.2f}, "
              f"one-sided p = {res['p']:.3g}: {res['verdict']} (alpha {res['alpha']:g})")
    elif args.cmd == "promote":
        from llmlabs.auto.promote import promote

        workers = _workers(session, args, worker)
        res = promote(session, workers, args.seeds, make_dir(args.out or session.dir, "--out"))
        print(res["md"].read_text() + f"\ntable: {res['md']}")
    elif args.cmd == "report":
        from llmlabs.auto.report import write_report

        summary, png, md, findings = write_report(session, args.out)
        print(json.dumps(summary, indent=2) if args.json
              else md.read_text() + f"\nplot: {png}\ntable: {md}\nfindings: {findings}")
    return 0
