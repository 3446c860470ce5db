"""Does a ZeRO-3 checkpoint of N ranks resume exactly on M ranks through DeepSpeed's universal checkpoint?

    python scripts/slurm/check_universal_resume.py                 # 4 -> 2 ranks, CPU/gloo, ~1-2 min
    python scripts/slurm/check_universal_resume.py --save-ranks 2 --load-ranks 4

Run it after upgrading DeepSpeed, to see whether the repairs documented in docs/scale.md ("On a
different number of ranks") are still needed. A small model with three parameter groups (own
learning rates and weight decay, as the engine's vision / connector / LLM groups), AdamW, a LambdaLR
schedule and gradient clipping:

1. trains K steps on N ranks, saves a ZeRO-3 checkpoint, trains J more steps: the reference;
2. converts the checkpoint with ``deepspeed.checkpoint.ds_to_universal``;
3. loads it on M ranks (``checkpoint.load_universal``) and trains the same J steps, twice: as
   DeepSpeed leaves it, and with the two repairs (each group's own hyperparameters, one ``step``
   tensor per optimizer state).

Every step sees the same global batch whatever the number of ranks, so the final weights and Adam
moments of 3 must equal those of 1 up to float summation order. It prints the largest difference of
each and exits 0 when the repaired load agrees (< 1e-6).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GLOBAL_BATCH = 8


def worker(phase: str, out: Path, steps_before: int, steps_after: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": GLOBAL_BATCH // world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if phase.startswith("load"):
        cfg["checkpoint"] = {"load_universal": True}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        net = Net()
    groups = [
        {"params": list(net.a.parameters()), "lr": 1e-2, "weight_decay": 0.0, "name": "a"},
        {"params": list(net.b.parameters()), "lr": 3e-3, "weight_decay": 0.1, "name": "b"},
        {"params": list(net.c.parameters()), "lr": 5e-3, "weight_decay": 0.01, "name": "c"},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-2)
    engine, opt, _, sched = deepspeed.initialize(
        model=net, optimizer=opt, config=cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    )

    def state() -> dict:
        out_state = {}
        for name, p in engine.module.named_parameters():
            out_state[name] = safe_get_full_fp32_param(p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out_state[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).clone()
        return out_state

    def step(s: int) -> None:
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 1, generator=g)
        per = GLOBAL_BATCH // world
        for i in range(per):
            j = rank * per + i
            loss = ((engine(x[j : j + 1]) - y[j : j + 1]) ** 2).mean()
            engine.backward(loss)
            engine.step()

    start = 0
    if phase.startswith("load"):
        keep = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
        path, _ = engine.load_checkpoint(str(out / "ckpt"), tag="universal")
        assert path is not None, "the universal checkpoint did not load"
        if phase == "load_repaired":
            for g, k, lr in zip(opt.param_groups, keep, sched.get_last_lr()):
                g.update(k)
                g["lr"] = lr
            for st in opt.optimizer.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        start = steps_before
    for s in range(start, steps_before + steps_after):
        step(s)
        if phase == "save" and s == steps_before - 1:
            engine.save_checkpoint(str(out / "ckpt"), tag="sharded")
    final = state()
    if rank == 0:
        torch.save(final, out / f"{phase}.pt")
    dist.barrier()
    dist.destroy_process_group()


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__, *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save-ranks", type=int, default=4)
    ap.add_argument("--load-ranks", type=int, default=2)
    ap.add_argument("--steps-before", type=int, default=3)
    ap.add_argument("--steps-after", type=int, default=2)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        worker(a.phase, Path(a.out), a.steps_before, a.steps_after)
        return 0
    for n in (a.save_ranks, a.load_ranks):
        if GLOBAL_BATCH % n:
            sys.exit(f"{n} ranks do not divide the global batch of {GLOBAL_BATCH}")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        common = ("--out", str(out), "--steps-before", str(a.steps_before), "--steps-after", str(a.steps_after))
        print(f"training {a.steps_before}+{a.steps_after} steps on {a.save_ranks} ranks ...", flush=True)
        torchrun(a.save_ranks, "--phase", "save", *common)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                        "--input_folder", str(out / "ckpt" / "sharded"), "--output_folder", str(out / "ckpt" / "universal"),
                        "--inject_missing_state"], check=True, capture_output=True)
        for phase in ("load_plain", "load_repaired"):
            print(f"resuming on {a.load_ranks} ranks ({phase}) ...", flush=True)
            torchrun(a.load_ranks, "--phase", phase, *common)
        ref = torch.load(out / "save.pt", weights_only=True)  # tensors only: loaded as data
        diffs = {}
        for phase in ("load_plain", "load_repaired"):
            got = torch.load(out / f"{phase}.pt", weights_only=True)
            diffs[phase] = max((ref[k] - got[k]).abs().max().item() for k in ref)
    print(f"\n{a.save_ranks} -> {a.load_ranks} ranks, largest difference to the uninterrupted run after "
          f"{a.steps_after} more steps (weights and Adam moments):")
    print(f"  DeepSpeed's universal load as it is : {diffs['load_plain']:.3e}")
    print(f"  with the two repairs                : {diffs['load_repaired']:.3e}")
    if diffs["load_plain"] < 1e-6:
        print("the plain load agrees: this DeepSpeed version no longer needs the repairs")
    ok = diffs["load_repaired"] < 1e-6
    print("OK" if ok else "FAILED: the repaired universal resume does not agree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
