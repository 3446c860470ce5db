"""The training engine: ``python -m videoflash.train stage=N ...`` (see docs/training.md).

Modules: ``cli`` (the Hydra entry), ``distributed`` (ranks, process group, multi-GPU self-launch),
``trainer`` (setup and the step loop), ``stages`` (freezing, parameter groups, LR schedule, where a
stage starts), ``ds_config`` (the DeepSpeed JSON from typed fields), ``checkpoint`` (atomic, resumable
checkpoints), ``export`` (the stage-end HF export), ``preemption`` (signals, requeue), ``metrics`` and
``flops`` (what a step reports). Importing this package imports nothing heavy.
"""
