"""Settings of ``dishtrack train`` (torch-free, so the CLI builds its flags from them quickly)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str
    out: str
    trays: str | None = Field(None, description="CSV image,tray (default: trays.csv next to the labels)")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of trays held out for validation")
    val_fold: int = Field(0, ge=0, description="which block of val_fraction of the (seed-shuffled) trays is "
                          "held out: folds 0 .. 1/val_fraction - 1 cross-validate (bench/dish_cv.py)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_images: int | None = Field(None, ge=1)
    # localiser
    localiser: str | None = Field(None, description="a dish checkpoint whose localiser is reused as is (best "
                                  "trained on the same split): only the classifier is trained, which saves the "
                                  "localiser phases (3 of 10 minutes on 2 CPU cores)")
    loc_size: int = Field(352, ge=128, le=1024, multiple_of=32)
    loc_epochs_head: int = Field(2, ge=0, description="localiser epochs with the trunk frozen")
    loc_epochs_finetune: int = Field(4, ge=0, description="localiser epochs fine-tuning all weights")
    loc_lr_head: float = Field(2e-3, gt=0)
    loc_lr_finetune: float = Field(4e-4, gt=0)
    layer_decay: float = Field(0.5, gt=0, le=1)
    loc_frozen_stages: int = Field(1, ge=0, le=4, description="earliest of the 4 trunk stages kept frozen while "
                                   "fine-tuning the localiser (saves their backward pass)")
    batch_size: int = Field(8, ge=1)
    # classifier
    crop_size: int = Field(192, ge=64, le=320, multiple_of=32,
                           description="classifier input side (128 -> 192: mAP +0.01-0.04, docs/dish_accuracy.md)")
    crop_long_side: int = Field(512, ge=128, le=2048)
    freeze_blocks: int = Field(8, ge=0, le=16, description="EfficientNet-Lite0 blocks kept frozen (of 16)")
    cls_views: int = Field(3, ge=1, le=32, description="augmented views of every box for the classifier")
    cls_epochs: int = Field(4, ge=0, description="classifier fine-tuning epochs")
    cls_lr: float = Field(1e-3, gt=0)
    exemplar_weight: float = Field(0.0, ge=0, le=1, description="share of the exemplar memory's nearest-neighbour "
                                   "vote in each box's dish probabilities (the memory is stored either way). "
                                   "Cross-validated: 0.5 -> photos +1 tray of 62, checkout videos -4")
    # run control
    patience: int = Field(3, ge=1, description="epochs without validation gain before a phase stops")
    resume: bool = False
    progress: bool = True

    @classmethod
    def as_saved(cls, saved: dict, keys) -> dict:
        """Settings saved by an earlier run (a checkpoint's meta, a ``.state`` fingerprint), for
        comparing with today's on ``keys``: a field added since reads as its default."""
        return {**{k: f.default for k, f in cls.model_fields.items() if k in keys}, **saved}
