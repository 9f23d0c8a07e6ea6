"""NEST pretraining, in layers: each imports only the layers below it (tests/test_layers.py enforces it).

    commands       train_cli, prepare_cli, calibrate, extract, summary, kmeans/, probe/ (and checkpoint, the
                   documented import path of nest.io's API)
    training/      a training run: preflight, the guarded step, meters, the LightningModule (the only
                   package that imports Lightning)
    config/        the run configuration: schema, loading, value checks, --help text
    io/            checkpoints: ours, and NeMo's through one adapter (nest.io.nemo)
    objectives/    NEST and Wav2vec-BERT over a shared preprocessor + encoder; the table of objectives
    model/         torch-only blocks, each beside its config: features, masking, quantizer, conformer, heads
    errors         every exception type

``cuts`` (the data) sits beside them and never imports ``nest``; config and above may import it.
"""

# Bottom to top; a module of nest belongs to the first entry that is its name or a prefix of it, and
# everything else in nest is a command.
LAYERS = ("nest.errors", "nest.model", "nest.objectives", "nest.io", "nest.config", "nest.training")
