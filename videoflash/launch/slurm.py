"""Submit a training stage to SLURM: ``python -m videoflash.launch.slurm [launcher args] [training overrides]``.

Examples::

    python -m videoflash.launch.slurm stage=3 nodes=4 gpus_per_node=8 partition=gpu time=2-00:00:00
    python -m videoflash.launch.slurm cluster=mycluster stage=2 nodes=8 name=vf7b --dry-run
    python -m videoflash.launch.slurm cluster=loopback experiment=quickstart stage=1

Arguments:

- ``cluster=NAME`` picks ``configs/launcher/cluster/NAME.yaml`` (default ``generic``): partition,
  account, time limit, GPUs, the cluster's environment (``env``: NCCL_*, ...; ``modules``; ``setup``
  lines), the warning signal's lead time. Any field of :class:`ClusterConfig` can be overridden as
  ``field=value`` or ``cluster.field=value`` (``cluster.env.NCCL_DEBUG=INFO``).
- everything else is a Hydra override for ``python -m videoflash.train`` (``stage=3``,
  ``experiment=...``, ``stage.lr=...``, ``run_root=...``, ``launcher.dist_timeout_min=10``). The job
  sets ``resume=auto launcher=slurm launcher.requeue=false`` itself; those may not be given.
- ``--dry-run`` writes everything and prints the ``sbatch`` command without running it;
  ``--local`` runs the same job script here, without SLURM (one node, ``torchrun --standalone``).

What lands in the run directory (the training's ``run_root``)::

    submit/<time>-stage<N>/job.sbatch     the job script: scripts/slurm/train.sbatch, header filled in
    submit/<time>-stage<N>/env.sh         the cluster environment the job sources
    submit/<time>-stage<N>/config.yaml    the resolved training config, as composed at submission
    submit/<time>-stage<N>/git.txt, git.diff, code/   revision, uncommitted changes, code snapshot
    submit/<time>-stage<N>/sbatch.txt     the sbatch command and the job id
    logs/<job name>-<job id>.out          the job's log (every requeued attempt appends to it)
    logs/<job id>/attempt<K>/<node>/...   per-rank logs of torchrun
    stage<N>/...                          what the engine writes (checkpoints, metrics, export)

Nothing here imports torch: a bad key, a wrong type or a batch that does not split over the ranks
fails in about a second, before anything is submitted.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = REPO_ROOT / "scripts" / "slurm" / "train.sbatch"
CLUSTER_DIR = REPO_ROOT / "configs" / "launcher" / "cluster"
#: What the code snapshot holds (whatever of it exists at the repository root).
SNAPSHOT_ITEMS = ("videoflash", "configs", "data_tools", "pyproject.toml")
#: Training keys the job sets itself (other launcher.* fields may be overridden).
RESERVED_TRAIN_KEYS = ("resume", "launcher", "launcher.requeue")

HEADER_BEGIN, HEADER_END = "# >>> sbatch header", "# <<< sbatch header"
SETTINGS_BEGIN, SETTINGS_END = "# >>> videoflash settings", "# <<< videoflash settings"


class LaunchError(ValueError):
    """A launcher argument or setting that cannot work; the message names it."""


@dataclass
class ClusterConfig:
    """One cluster's way of running a job (``configs/launcher/cluster/*.yaml``)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    reservation: Optional[str] = None
    constraint: Optional[str] = None
    time: str = "24:00:00"  # the job's time limit: [D-]HH:MM:SS, MM, MM:SS, D-HH, D-HH:MM
    nodes: int = 1
    gpus_per_node: int = 8  # GPUs asked for per node; 0 = none (CPU nodes)
    gpu_request: str = "gpus-per-node"  # gpus-per-node (--gpus-per-node=G) | gres (--gres=gpu:G)
    procs_per_node: Optional[int] = None  # ranks per node; null = gpus_per_node (1 when 0)
    cpus_per_task: Optional[int] = None  # cores for a node's task (all its workers); null = default
    mem: Optional[str] = None  # --mem ("0" = all of the node's memory); null = the cluster default
    exclusive: bool = True  # whole nodes
    job_name: Optional[str] = None  # null = vf-<name>-s<stage>
    signal_lead_s: int = 300  # SIGUSR1 this long before the time limit: checkpoint, then requeue
    signal_repeat_s: int = 20  # repeat the warning this often until the step ends
    max_requeues: int = 50  # stop requeueing after this many restarts
    straggler_timeout_s: int = 300  # after one node's task ended, the others get this long
    rdzv_timeout_s: int = 900  # for every node to join the rendezvous
    rdzv_port: Optional[int] = None  # null = derived from the job id
    env: Dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL_*, ...)
    modules: List[str] = field(default_factory=list)  # `module load` each, in order
    setup: List[str] = field(default_factory=list)  # shell lines run first (conda activate, ...)
    python: Optional[str] = None  # interpreter on the nodes; null = the one running this helper
    sbatch_args: List[str] = field(default_factory=list)  # more sbatch options ("--mail-type=FAIL")
    snapshot_code: bool = True  # run (and every requeue) uses a copy of the code taken now

    def ranks_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node()


CLUSTER_FIELDS = {f.name for f in fields(ClusterConfig)}


# --------------------------------------------------------------------------------------------------
# arguments and the cluster config
# --------------------------------------------------------------------------------------------------
@dataclass
class Args:
    cluster: str = "generic"
    cluster_overrides: List[str] = field(default_factory=list)
    train_overrides: List[str] = field(default_factory=list)
    dry_run: bool = False
    local: bool = False


def parse_args(argv: List[str]) -> Args:
    """Split the command line into launcher settings and training overrides."""
    out = Args()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if arg == "--dry-run":
            out.dry_run = True
            continue
        if arg == "--local":
            out.local = True
            continue
        if arg.startswith("-"):
            raise LaunchError(f"unknown option {arg} (options: --dry-run, --local)")
        key, eq, value = arg.partition("=")
        if not eq:
            raise LaunchError(f"{arg!r} is not key=value")
        bare = key.lstrip("+~")
        if bare == "cluster":
            out.cluster = value
        elif bare.startswith("cluster."):
            out.cluster_overrides.append(f"{bare[len('cluster.'):]}={value}")
        elif bare.split(".", 1)[0] in CLUSTER_FIELDS:
            out.cluster_overrides.append(f"{bare}={value}")
        else:
            if bare in RESERVED_TRAIN_KEYS:
                raise LaunchError(
                    f"{arg}: the job sets resume=auto launcher=slurm launcher.requeue=false itself (a requeued "
                    "job must resume, and only the job script requeues); to start a stage over, use a new run_root"
                )
            out.train_overrides.append(arg)
    return out


def cluster_options() -> List[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml"))


def load_cluster(name: str, overrides: List[str]) -> ClusterConfig:
    """``configs/launcher/cluster/<name>.yaml`` (or a path) over :class:`ClusterConfig`, then the
    overrides; an unknown key or a wrong type raises :class:`LaunchError` naming it."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CLUSTER_DIR / f"{name}.yaml"
    if not path.is_file():
        raise LaunchError(f"cluster={name}: no {path} (options: {', '.join(cluster_options())})")
    schema = OmegaConf.structured(ClusterConfig)
    try:
        loaded = OmegaConf.load(path)
        if isinstance(loaded.get("time"), int):  # YAML reads an unquoted 24:00:00 as a number
            raise LaunchError(f"{path}: time: quote it (time: \"24:00:00\"); YAML read it as {loaded.time}")
        cfg = OmegaConf.merge(schema, loaded)
    except OmegaConfBaseException as err:
        raise LaunchError(f"{path}: {getattr(err, 'full_key', '')}: {str(err).splitlines()[0]}") from err
    str_fields = {f.name for f in fields(ClusterConfig) if f.type in ("str", "Optional[str]")}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            if key in str_fields:  # taken as typed: `time=24:00:00` is no number
                patch = OmegaConf.create({key: None if value in ("null", "None") else value})
            else:
                patch = OmegaConf.from_dotlist([item])
            cfg = OmegaConf.merge(cfg, patch)
        except OmegaConfBaseException as err:
            raise LaunchError(f"cluster.{key}={value}: {str(err).splitlines()[0]}") from err
    try:
        c: ClusterConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise LaunchError(f"cluster.{getattr(err, 'full_key', '')}: {str(err).splitlines()[0]}") from err
    check_cluster(c)
    return c


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_s(spec: str) -> int:
    """SLURM's --time formats in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = _TIME.match(spec.strip())
    if not m:
        raise LaunchError(f"cluster.time={spec!r} is not a SLURM time (e.g. 2-00:00:00, 12:00:00, 90)")
    days, a, b, c = m.groups()
    if days is not None:
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if b is None:
        return int(a) * 60
    if c is None:
        return int(a) * 60 + int(b)
    return int(a) * 3600 + int(b) * 60 + int(c)


def check_cluster(c: ClusterConfig) -> None:
    for key in ("nodes", "signal_lead_s", "signal_repeat_s", "straggler_timeout_s", "rdzv_timeout_s"):
        if getattr(c, key) < 1:
            raise LaunchError(f"cluster.{key} must be >= 1, got {getattr(c, key)}")
    if c.gpus_per_node < 0:
        raise LaunchError(f"cluster.gpus_per_node must be >= 0, got {c.gpus_per_node}")
    if c.procs_per_node is not None and c.procs_per_node < 1:
        raise LaunchError(f"cluster.procs_per_node must be >= 1, got {c.procs_per_node}")
    if c.gpus_per_node and c.ranks_per_node() > c.gpus_per_node:
        raise LaunchError(f"cluster.procs_per_node={c.procs_per_node} exceeds gpus_per_node={c.gpus_per_node}")
    if c.gpu_request not in ("gpus-per-node", "gres"):
        raise LaunchError(f"cluster.gpu_request={c.gpu_request!r} is not one of gpus-per-node, gres")
    if c.max_requeues < 0:
        raise LaunchError(f"cluster.max_requeues must be >= 0, got {c.max_requeues}")
    limit = time_limit_s(c.time)
    if c.signal_lead_s >= limit:
        raise LaunchError(
            f"cluster.signal_lead_s={c.signal_lead_s} is not shorter than the time limit {c.time} ({limit} s)"
        )
    if c.signal_lead_s > 65535:
        raise LaunchError("cluster.signal_lead_s: SLURM takes at most 65535 s")
    for k in c.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(k)):
            raise LaunchError(f"cluster.env: {k!r} is not a variable name")


# --------------------------------------------------------------------------------------------------
# the training config
# --------------------------------------------------------------------------------------------------
def compose_training(overrides: List[str], world_size: int):
    """Compose and validate the training config as the job will (resume/launcher as the job sets
    them); check that the global batch splits over ``world_size`` ranks. Returns (raw, typed,
    accumulation steps)."""
    from videoflash.config import ConfigError, compose, validate
    from videoflash.train.ds_config import gradient_accumulation_steps

    try:
        raw = compose([*overrides, "resume=auto", "launcher=slurm", "launcher.requeue=false"], check=False)
        typed = validate(raw)
    except ConfigError as err:
        raise LaunchError(f"config error: {err}") from err
    except Exception as err:  # Hydra's composition errors (unknown key, wrong type, missing option)
        raise LaunchError(f"config error: {str(err).strip()}") from err
    sp = typed.train.sequence_parallel
    if world_size % sp:
        raise LaunchError(f"train.sequence_parallel={sp} does not divide the {world_size} ranks (nodes x procs_per_node) "
                          "into sequence-parallel groups")
    try:  # the ranks of one sequence-parallel group share their samples: the batch splits over the others
        accum = gradient_accumulation_steps(typed.stage.global_batch_size, typed.stage.micro_batch_size, world_size // sp)
    except ValueError as err:
        hint = f" / train.sequence_parallel={sp}" if sp > 1 else ""
        raise LaunchError(f"{err} (ranks = nodes x procs_per_node{hint})") from err
    return raw, typed, accum


# --------------------------------------------------------------------------------------------------
# the run directory
# --------------------------------------------------------------------------------------------------
def git_info(repo: Path) -> tuple[str, str]:
    """(summary text, diff of uncommitted changes) of ``repo``, or a note when it is no git checkout."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)
        return r.stdout if r.returncode == 0 else ""

    head = git("rev-parse", "HEAD").strip()
    if not head:
        return "no git revision (not a git checkout)\n", ""
    status = git("status", "--porcelain")
    lines = [
        f"{head}{' (with uncommitted changes: see git.diff and code/)' if status.strip() else ''}",
        f"branch: {git('rev-parse', '--abbrev-ref', 'HEAD').strip()}",
        f"describe: {git('describe', '--always', '--dirty').strip()}",
        "status:",
        status.rstrip(),
    ]
    return "\n".join(lines) + "\n", git("diff", "HEAD")


def snapshot_code(repo: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for item in SNAPSHOT_ITEMS:
        src = repo / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore, symlinks=True)
        elif src.is_file():
            shutil.copy2(src, dest / item)


def sbatch_header(c: ClusterConfig, job_name: str, log_dir: Path, workdir: Path) -> List[str]:
    opts = [
        f"--job-name={job_name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",
        f"--time={c.time}",
        "--requeue",
        f"--signal=B:USR1@{c.signal_lead_s}",
        "--open-mode=append",
        f"--output={log_dir}/%x-%j.out",
        f"--chdir={workdir}",
    ]
    if c.gpus_per_node > 0:
        opts.append(f"--gpus-per-node={c.gpus_per_node}" if c.gpu_request == "gpus-per-node" else f"--gres=gpu:{c.gpus_per_node}")
    for key, flag in (("partition", "partition"), ("account", "account"), ("qos", "qos"),
                      ("reservation", "reservation"), ("constraint", "constraint"), ("mem", "mem"),
                      ("cpus_per_task", "cpus-per-task")):
        value = getattr(c, key)
        if value is not None:
            opts.append(f"--{flag}={value}")
    if c.exclusive:
        opts.append("--exclusive")
    opts.extend(c.sbatch_args)
    for o in opts:
        if "\n" in o:
            raise LaunchError(f"sbatch option {o!r} holds a line break")
    return [f"#SBATCH {o}" for o in opts]


def env_script(c: ClusterConfig) -> str:
    lines = ["# The cluster environment of this job (configs/launcher/cluster/*.yaml), sourced by job.sbatch."]
    if c.modules:
        lines.append("if command -v module >/dev/null 2>&1 || type module >/dev/null 2>&1; then")
        lines += [f"    module load {shlex.quote(m)}" for m in c.modules]
        lines.append("else")
        lines.append('    echo "[videoflash] no `module` command: skipping module loads" >&2')
        lines.append("fi")
    lines += list(c.setup)
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(c.env.items())]
    return "\n".join(lines) + "\n"


def replace_block(text: str, begin: str, end: str, body: List[str]) -> str:
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise LaunchError(f"{TEMPLATE}: markers {begin!r} / {end!r} not found")
    return text[: i + len(begin)] + "\n" + "".join(line + "\n" for line in body) + text[j:]


def render_job(template: str, header: List[str], settings: Dict[str, str], train_overrides: List[str]) -> str:
    body = [f"export {k}={shlex.quote(v)}" for k, v in settings.items()]
    # The training overrides, unless the job was submitted with arguments of its own.
    body.append(f"[[ $# -gt 0 ]] || set -- {' '.join(shlex.quote(a) for a in train_overrides)}")
    text = replace_block(template, HEADER_BEGIN, HEADER_END, header)
    return replace_block(text, SETTINGS_BEGIN, SETTINGS_END, body)


@dataclass
class Prepared:
    submit_dir: Path
    job_script: Path
    run_dir: Path
    log_dir: Path
    job_name: str
    cluster: ClusterConfig


def prepare(args: Args, now: Optional[float] = None) -> Prepared:
    """Validate everything and write the run directory's submission files; submits nothing."""
    c = load_cluster(args.cluster, args.cluster_overrides)
    world = c.world_size()
    raw, typed, accum = compose_training(args.train_overrides, world)
    run_dir = Path(typed.run_root).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    submit_dir = run_dir / "submit" / f"{stamp}-stage{typed.stage.id}"
    n = 1
    while submit_dir.exists():
        n += 1
        submit_dir = run_dir / "submit" / f"{stamp}-stage{typed.stage.id}-{n}"
    log_dir = run_dir / "logs"
    submit_dir.mkdir(parents=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    job_name = c.job_name or f"vf-{typed.name}-s{typed.stage.id}"

    # What is submitted, as it was at submission.
    resolved = OmegaConf.to_yaml(raw, resolve=True)
    (submit_dir / "config.yaml").write_text(resolved)
    summary, diff = git_info(REPO_ROOT)
    (submit_dir / "git.txt").write_text(summary)
    if diff:
        (submit_dir / "git.diff").write_text(diff)
    code_dir = ""
    if c.snapshot_code:
        snapshot_code(REPO_ROOT, submit_dir / "code")
        code_dir = str(submit_dir / "code")
    (submit_dir / "env.sh").write_text(env_script(c))
    (submit_dir / "cluster.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(c)))

    # Relative paths in the config (data.root, ...) mean the same in the job: it runs where this ran.
    train_overrides = [a for a in args.train_overrides if a.split("=", 1)[0].lstrip("+~") != "run_root"]
    settings = {
        "VF_RUN_DIR": str(run_dir),
        "VF_PYTHON": c.python or sys.executable,
        "VF_ENV_FILE": str(submit_dir / "env.sh"),
        "VF_CODE_DIR": code_dir,
        "VF_PROCS_PER_NODE": str(c.ranks_per_node()),
        "VF_RDZV_PORT": "" if c.rdzv_port is None else str(c.rdzv_port),
        "VF_RDZV_TIMEOUT": str(c.rdzv_timeout_s),
        "VF_STRAGGLER_TIMEOUT": str(c.straggler_timeout_s),
        "VF_MAX_REQUEUES": str(c.max_requeues),
        "VF_SIGNAL_REPEAT": str(c.signal_repeat_s),
        "VF_SUBMIT_DIR": str(submit_dir),
    }
    header = sbatch_header(c, job_name, log_dir, Path.cwd())
    if not TEMPLATE.is_file():
        raise LaunchError(f"the job script template {TEMPLATE} is missing (run from a source checkout)")
    job = submit_dir / "job.sbatch"
    job.write_text(render_job(TEMPLATE.read_text(), header, settings, train_overrides))
    job.chmod(0o755)

    s = typed.stage
    sp = typed.train.sequence_parallel
    split = f"{world} ranks" if sp == 1 else f"{world // sp} data-parallel ranks (sequence parallel {sp})"
    print(f"[videoflash] stage {s.id} ({s.name}) on {c.nodes} node(s) x {c.ranks_per_node()} rank(s) = {world} ranks; "
          f"global batch {s.global_batch_size} = micro-batch {s.micro_batch_size} x {split} x "
          f"{accum} accumulation step(s)", flush=True)
    print(f"[videoflash] run dir {run_dir}; submission files in {submit_dir}", flush=True)
    return Prepared(submit_dir, job, run_dir, log_dir, job_name, c)


def submit(p: Prepared) -> str:
    """``sbatch --parsable`` the job script; returns the job id."""
    cmd = ["sbatch", "--parsable", str(p.job_script)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as err:
        raise LaunchError("sbatch is not on PATH: submit from a SLURM login node (or use --local / --dry-run)") from err
    if r.returncode != 0:
        raise LaunchError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    (p.submit_dir / "sbatch.txt").write_text(f"{shlex.join(cmd)}\njob {job_id}\n")
    return job_id


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        p = prepare(args)
        if args.local:
            print(f"[videoflash] running {p.job_script} here (no SLURM)", flush=True)
            return subprocess.call(["bash", str(p.job_script)])
        if args.dry_run:
            (p.submit_dir / "sbatch.txt").write_text(f"sbatch --parsable {p.job_script}\n(dry run: not submitted)\n")
            print(f"[videoflash] dry run: submit with  sbatch {p.job_script}", flush=True)
            return 0
        job_id = submit(p)
    except LaunchError as err:
        print(f"videoflash.launch.slurm: {err}", file=sys.stderr)
        return 2
    log = p.log_dir / f"{p.job_name}-{job_id}.out"
    print(f"[videoflash] submitted job {job_id}: log {log}", flush=True)
    print(f"[videoflash] watch: squeue -j {job_id}; tail -f {log}   stop: scancel {job_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
