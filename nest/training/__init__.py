"""A training run, the only package that imports Lightning (and only in the modules that say so below).

Import order, plain torch first: distributed, allocator -> sync_batchnorm -> step, meters, optim, syncs, flops ->
sources -> preflight (imports Lightning's registries only to check names) -> lightning_private -> module, data,
saving -> run. Nothing is
imported here, so that plain-torch users (nest.calibrate) do not pay for Lightning.
"""
