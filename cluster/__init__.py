"""rankpm.cluster: Ray runs the engine's training loop as DeepSpeed ranks.

Kept light on purpose: ``import rankpm.cluster`` does not import ray; the modules do
(launch: train_on_ray; jobs: submit and follow Ray jobs).
"""
