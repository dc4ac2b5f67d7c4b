"""Compile-only analysis of averaging steps for TPU pods and NVIDIA GPUs.

The modules build, without the hardware, what a training job on an
accelerator compiles: ``targets`` (deviceless TPU topologies and GPU
TargetConfigs, as meshes), ``model`` (a Llama-like decoder and its logical
sharding rules), ``rows`` (the optimizer configurations compared: adam alone,
the hand-fused EMA, ``optax_ema``'s transforms), ``metrics`` (what a compiled
program says: memory, traffic, fusions, collectives, host transfers) and
``matrix`` (the run over targets x programs x rows, and its tables). Run
``python -m benchmarks.accel --help`` from the repository root.

Nothing here imports libtpu or the CUDA plugin at import time: a target is
only resolved when it is compiled for, so the modules import (and the
``cpu`` target runs) in any environment.
"""
