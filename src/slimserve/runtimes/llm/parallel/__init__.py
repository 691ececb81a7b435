"""Model-parallel generation: one model split over P pipeline stages x T tensor ranks, each a
worker process holding only its shard (plan.py: the split; shard.py: lazy slices from the
safetensors files; worker.py: a stage's forward; group.py: the driver's side, which the
generation engine drives each step like a local model; local.py: the workers as local
processes, the default launcher of runtimes/launch.py; on Ray, cluster/ray_group.py)."""
