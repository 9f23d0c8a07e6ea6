"""HuBERT-style iterations through the NEST pipeline: k-means labels as data, the same model and loss."""
import pytest

from nest.config import load_config
from nest.errors import ConfigError
from nest.kmeans import KMeansOptions, run_kmeans
from nest.training.run import train
from tests.conftest import ROOT, tiny_overrides

SMALL = KMeansOptions(n_init=1, batch_size=2000, max_iter=10)  # fairseq's defaults are for hours of audio


def label(tiny_corpus, out, **kwargs):
    run_kmeans(tiny_corpus["train"], out / "train", sample_fraction=1.0, options=SMALL, **kwargs)
    run_kmeans(tiny_corpus["dev"], out / "dev", model_path=str(out / "train" / "kmeans.pt"), features=None,
               checkpoint=kwargs.get("checkpoint"))


def kmeans_config(tiny_corpus, labels, exp, classes, books, **extra):
    return load_config(ROOT / "configs" / "nest_tiny.yaml", tiny_overrides(tiny_corpus, exp, **{
        "data.train_cuts": labels / "train" / "cuts.jsonl.gz", "data.val_cuts": labels / "dev" / "cuts.jsonl.gz",
        "model.targets": "kmeans", "model.quantizer.num_classes": classes, "model.quantizer.num_books": books,
        "data.num_workers": 0, "trainer.max_steps": 6, "trainer.val_check_interval": 6, "trainer.limit_val_batches": 2,
        "trainer.log_every_n_steps": 3, **extra}))


def test_mfcc_labels_then_encoder_labels_train_end_to_end(tiny_corpus, tmp_path):
    label(tiny_corpus, tmp_path / "km1", features="mfcc", clusters=8)
    first = train(kmeans_config(tiny_corpus, tmp_path / "km1", tmp_path / "iter1", classes=8, books=8))
    assert first["steps"] == 6 and first["last_loss"] is not None and first["skipped_steps"] == 0
    ckpt = tmp_path / "iter1" / "checkpoints" / "last.ckpt"
    label(tiny_corpus, tmp_path / "km2", features="encoder", checkpoint=str(ckpt), layer=1, clusters=12)
    second = train(kmeans_config(tiny_corpus, tmp_path / "km2", tmp_path / "iter2", classes=12, books=1))
    assert second["steps"] == 6 and second["last_loss"] is not None
    from nest.io import load_model

    assert load_model(tmp_path / "iter2" / "checkpoints" / "last.ckpt").quantizer is None  # targets are data


def test_labels_that_do_not_fit_the_model_fail_at_start_up(tiny_corpus, tmp_path):
    label(tiny_corpus, tmp_path / "km", features="mfcc", clusters=8)
    with pytest.raises(ConfigError, match=r"have 8 clusters but model.quantizer.num_classes=9: set "
                                          r"model.quantizer.num_classes=8"):
        train(kmeans_config(tiny_corpus, tmp_path / "km", tmp_path / "e", classes=9, books=8))
    with pytest.raises(ConfigError, match=r"8 labels per token but model.quantizer.num_books=1"):
        train(kmeans_config(tiny_corpus, tmp_path / "km", tmp_path / "e", classes=8, books=1))
    with pytest.raises(ConfigError, match=r"has no 'targets'"):
        train(kmeans_config(tiny_corpus, tmp_path / "km", tmp_path / "e", classes=8, books=8,
                            **{"data.train_cuts": tiny_corpus["train"]}))
