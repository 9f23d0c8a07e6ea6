"""NEST: denoising masked token prediction for self-supervised speech pretraining."""
