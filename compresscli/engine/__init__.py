"""Running a recipe on a checkpoint: planning (targets, units, memory, mode), the two runners (whole-model and block
by block) sharing one stage runner, the reload check and the report. `run.compress_source` is `compress run`."""
