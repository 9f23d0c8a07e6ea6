"""Data: CutSets, noise sets, duration bins, sampler, dataset and datamodule for NEST pretraining."""
