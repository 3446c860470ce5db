"""Launching training jobs on clusters (see docs/scale.md).

``python -m videoflash.launch.slurm stage=3 nodes=4 gpus_per_node=8 partition=gpu`` composes and
validates the training config, writes the job script (``scripts/slurm/train.sbatch`` with its
header filled from ``configs/launcher/cluster/<cluster>.yaml``), the resolved config, the code
revision and a snapshot of the code into the run directory, and submits the job with ``sbatch``.

This package sits beside the entry points: it imports ``videoflash.config`` (and the engine's
light ``ds_config`` for batch sizing) and nothing imports it.
"""
