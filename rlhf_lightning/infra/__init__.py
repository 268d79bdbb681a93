"""Infrastructure off the data path: how a run is launched, sharded, logged, checkpointed, stopped and reported.

- `errors.py`: the exceptions the CLI prints as one line (`ConfigError`, `TrainingFailure` and its kinds).
- `nonfinite.py`: `NonFiniteGuard` (NaN/inf losses and gradients never reach the weights), `check_finite_model`.
- `checkpoints.py`: atomic checkpoint writes, the periodic `last.ckpt`, `error.ckpt` on failure, RNG streams.
- `shutdown.py`: `GracefulShutdown` (SIGTERM/SIGINT save the last completed step and exit 128 + signal).
- `parallel.py`: FSDP2 / DDP through Lightning strategies, and sampling from a sharded policy.
- `loggers.py`: `RunLogger`, the TensorBoard logger whose folder follows `default_root_dir`.
- `messages.py`: one-line messages for command-line and config mistakes.
- `cpu_allocator.py`: glibc malloc settings that reuse freed CPU memory between steps.
"""
