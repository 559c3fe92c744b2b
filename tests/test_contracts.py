"""The callbacks' contracts: a module that lacks what a callback needs is refused at fit start, by name."""

from __future__ import annotations

import pytest

from sdtune.contracts import (
    ClassificationData,
    CountsBadSamples,
    Exportable,
    HasTrainableParameters,
    ImageData,
    Sampleable,
    UsesStorage,
    require,
)
from sdtune.latent.classifier import Classifier
from sdtune.models import SDFineTune


def test_sd_finetune_offers_everything_the_callbacks_need() -> None:
    model = SDFineTune(pretrained="tiny")
    for protocol in (Exportable, HasTrainableParameters, Sampleable):
        require(model, protocol, "test")
        assert isinstance(model, protocol)


def test_a_classifier_is_checkpointable_but_refused_by_the_sample_grid_with_the_missing_names() -> None:
    classifier = Classifier()
    require(classifier, Exportable, "PeriodicCheckpoint")
    require(classifier, HasTrainableParameters, "EMA")

    class Bare:
        pass

    with pytest.raises(ValueError, match=r"PeriodicCheckpoint needs .* Bare lacks export_files, model_for_export"):
        require(Bare(), Exportable, "PeriodicCheckpoint")
    with pytest.raises(ValueError, match=r"SampleGrid needs .* lacks noise_scheduler, text_encoder, tokenizer"):
        require(classifier, Sampleable, "SampleGrid")


def test_datamodules_declare_what_they_offer_the_callbacks_and_the_classifier() -> None:
    from sdtune.data.datamodule import ShardDataModule
    from sdtune.latent.classification_data import ClassificationDataModule

    shards, labelled = ShardDataModule("unused", resolution=96), ClassificationDataModule("unused")
    assert isinstance(shards, ImageData) and shards.resolution == 96
    assert isinstance(shards, CountsBadSamples) and isinstance(shards, UsesStorage)
    assert not isinstance(shards, ClassificationData)
    assert isinstance(labelled, ClassificationData) and isinstance(labelled, UsesStorage)
    assert not isinstance(labelled, ImageData | CountsBadSamples)
