"""A real two-node SLURM cluster on loopback for the tests (import the fixture into the test module).

``slurm_cluster`` (module scope) installs slurm-wlm and munge when missing
(``scripts/slurm/install_deps.sh``, apt-get), starts a private munged, a slurmctld and two slurmd
"nodes" (node1, node2: 2 CPUs each, NodeAddr 127.0.0.1) with ``scripts/slurm/loopback_cluster.sh``,
all state in a temporary directory, and stops every daemon by its pid file afterwards, also when
a test failed. It needs root (the daemons and apt-get); without root the tests that use it skip
with that reason. CI runs as root, so there they run.

Every wait has a timeout; a job that overstays it is cancelled and the test fails with the tail of
the job's log.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
CLUSTER_SCRIPT = SLURM_SCRIPTS / "loopback_cluster.sh"
INSTALL_SCRIPT = SLURM_SCRIPTS / "install_deps.sh"

#: States after which a job runs no more (a requeued job passes through PENDING instead).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the loopback SLURM cluster needs root (apt-get, munged, slurmctld, slurmd); CI runs as root"
)


def ensure_slurm_installed() -> None:
    """slurm-wlm and munge, installed with apt-get when missing (root)."""
    r = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        pytest.fail(f"installing slurm-wlm/munge failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


class LoopbackCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # -- daemons ------------------------------------------------------------------------------
    def start(self, nodes: int = 2, cpus: int = 2) -> None:
        r = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(self.root), str(nodes), str(cpus)],
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"starting the loopback cluster failed:\n{r.stdout}\n{r.stderr}")

    def stop(self) -> None:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(self.root)], capture_output=True, text=True, timeout=180)

    # -- commands -----------------------------------------------------------------------------
    def cmd(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, NodeList, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id))
        info = {}
        for tok in re.findall(r"(\S+?)=(\S*)", out):
            info.setdefault(tok[0], tok[1])
        return info

    def log_tail(self, job_id: str, lines: int = 80) -> str:
        try:
            path = Path(self.job(job_id).get("StdOut", ""))
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""
        except Exception as err:  # noqa: BLE001 - only for messages
            return f"(no log: {err})"

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, job_id: str | None = None,
                   interval: float = 0.5) -> float:
        """Poll ``predicate`` until true; returns the seconds it took. On timeout the job (if given)
        is cancelled and the test fails with its log."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate():
                return time.monotonic() - start
            time.sleep(interval)
        tail = ""
        if job_id is not None:
            tail = self.log_tail(job_id)
            self.cmd("scancel", str(job_id), check=False)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- job log ---\n{tail}")

    def wait_done(self, job_id: str, timeout: float) -> dict:
        """Wait until the job runs no more (requeues are waited through); its final ``job()``."""
        box = {}

        def done() -> bool:
            box["info"] = self.job(job_id)
            return box["info"].get("JobState") in TERMINAL

        self.wait_until(done, timeout, f"job {job_id} to end", job_id=job_id, interval=1.0)
        return box["info"]

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """What SLURM does ``--signal=B:USR1@T`` before the time limit: signal the batch shell."""
        self.cmd("scancel", "--batch", f"--signal={sig}", str(job_id))

    def slurmctld_log(self, lines: int = 40) -> str:
        path = self.root / "log" / "slurmctld.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A running loopback cluster: 2 nodes x 2 CPUs, partition ``loop``; torn down afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the loopback SLURM cluster needs root (apt-get, munged, slurmctld, slurmd); CI runs as root")
    ensure_slurm_installed()
    cluster = LoopbackCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start(nodes=2, cpus=2)
        yield cluster
    finally:
        cluster.stop()
