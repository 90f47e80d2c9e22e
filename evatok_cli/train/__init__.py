"""Training machinery shared by the tokenizer, router and GPT stages.

``loop.py`` is one plain loop (task, batches, checkpoints, logging); ``dist.py`` injects the
distribution (torchrun env, process group, DDP); ``checkpoints.py`` writes and finds resumable
step directories; ``schedule.py`` holds learning-rate schedules as pure functions of the step.
"""
