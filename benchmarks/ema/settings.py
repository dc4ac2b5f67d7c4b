"""What every row shares: the optimizer, the decays, the rows' names; paths."""

import os

LEARNING_RATE = 1e-2
DECAY = 0.99
DECAYS = (0.99, 0.999)
UPDATE_EVERY = 10
ADAM = "optax adam"
OURS = "moving_average(adam)"
OURS_EVERY = f"moving_average(adam, update_every={UPDATE_EVERY})"
OFFLOAD = "moving_average(adam, offload=True)"
OFFLOAD_EVERY = f"moving_average(adam, offload=True, update_every={UPDATE_EVERY})"
FLOOR = "floor: flat e + (1-d)(p-e)"
SCALE = "STREAM scale b = s*a"
TRIAD = "STREAM triad a = b + s*c"

# The entry point (the memory runs start it again) and the results' folder.
BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(BENCHMARKS, "bench_ema.py")
RESULTS = os.path.join(BENCHMARKS, "results")
