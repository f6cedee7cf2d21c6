"""Data: open-set splits (:mod:`openset`), sources (:mod:`digits` bundled,
:mod:`tfds_sources` CIFAR-10/100 via tfds, :mod:`imagenet30` from a folder), on-device
augmentation (:mod:`augment`) and on-device index sampling (:mod:`sampling`)."""
