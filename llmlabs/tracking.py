"""Where a run's metrics go: RUN/metrics.jsonl always, TensorBoard (--tensorboard, RUN/tb) and Weights &
Biases (--wandb, RUN/wandb) when asked. Every row goes through Metrics.write, and one list of scalars
(SCALARS) feeds both trackers, so metrics.jsonl, TensorBoard and wandb never disagree on what a run
logged. Only rank 0 makes a Metrics.

wandb: the project is $WANDB_PROJECT (default llmlabs); with no network set WANDB_MODE=offline, and
`wandb sync RUN/wandb/offline-run-*` uploads later. A resumed run continues the same wandb run: its id
is kept in RUN/wandb-id. wandb takes steps in increasing order only, so the steps a resume repeats
(those after the checkpoint that the stopped run had logged) keep their first values there;
metrics.jsonl, rewound to the checkpoint, holds the run as it continued."""
import json
import os
import secrets
from pathlib import Path

from llmlabs.common import LabError, print0

MOE_SCALARS = ("moe_load_cv", "moe_load_max", "moe_load_min", "moe_bias_spread", "moe_routed")
SCALARS = ("loss", "lr_mult", "tok_per_sec", "mfu", "val_bpb", "val_caption_bpb", "val_text_bpb", "core", *MOE_SCALARS)


class Metrics:
    def __init__(self, run_dir, cfg: dict, resume_step: int | None = None):
        """resume_step: a resumed run's checkpoint step; rows after it are dropped (truncate)."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate(self.path, resume_step)
        self.tb = self.wandb = None
        if cfg.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LabError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if cfg.get("wandb"):
            self.wandb = _wandb_run(self.run_dir, cfg)

    def write(self, row: dict):
        """Append `row` (it has a "step") to metrics.jsonl and its SCALARS to the trackers."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: row[k] for k in SCALARS if row.get(k) is not None}  # mfu is None on a CPU
        if self.tb and scalars:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb and scalars:
            self.wandb.log(scalars, step=row["step"])

    def close(self, summary: dict | None = None):
        """Flush and close the trackers; `summary` (the run's summary block) becomes wandb's summary."""
        if self.tb:
            self.tb.close()
        if self.wandb:
            if summary:
                self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
            import wandb

            # finish() can return before wandb's service process has written the run file (seen on a
            # loaded CPU: a run file read right after held 0-3 of 4 rows); teardown waits for it
            wandb.teardown()


def _wandb_run(run_dir: Path, cfg: dict):
    try:
        import wandb
    except ImportError:
        raise LabError("--wandb needs the wandb package: pip install wandb (no network: also set "
                       "WANDB_MODE=offline)") from None
    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # wandb-style 8 chars
    id_file.write_text(run_id)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llmlabs"), name=run_dir.name, dir=str(run_dir),
                     config=cfg, id=run_id, resume="allow")
    print0(f"wandb: run {run_id} ({'offline, sync later' if os.environ.get('WANDB_MODE') == 'offline' else 'online'})")
    return run


def truncate(path: Path, step: int):
    """On resume, drop rows written after the checkpoint, so metrics.jsonl reads as one clean run. A
    last line cut off by a kill mid-write is dropped too; a broken line before it is an error."""
    if not path.exists():
        return
    lines = path.read_text().rstrip("\n").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise LabError(f"{path} line {i + 1} is not JSON ({line[:60]!r}): delete that line, then resume "
                               "again") from None
            print0(f"{path}: dropped its torn last line ({line[:60]!r}), written when the run was killed")
            break
        if row["step"] <= step:
            rows.append(line)
    path.write_text("".join(r + "\n" for r in rows))
