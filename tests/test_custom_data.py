"""dataset=custom's conversion of what the user's function returns: every accepted form gives the same
uint8 splits, and the spec is measured from the training images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.checks import ConfigError
from cnnlab.data.custom import convert, spec_of

G = torch.Generator().manual_seed(0)
IMAGES = torch.randint(0, 256, (12, 3, 5, 7), generator=G, dtype=torch.uint8)  # N x C x H x W, not square
LABELS = torch.arange(12) % 3


class ListDataset:
    """torchvision-style: items are (image, label); optional class names."""

    def __init__(self, items: list, classes: list[str] | None = None) -> None:
        self.items, self.classes = items, classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def pil(i: int) -> Image.Image:
    return Image.fromarray(IMAGES[i].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("form", ["tensors", "numpy_nhwc", "pil_dataset", "to_tensor_dataset", "data_targets"])
def test_every_accepted_form_gives_the_same_splits(form: str) -> None:
    if form == "tensors":
        train = (IMAGES, LABELS)
    elif form == "numpy_nhwc":
        train = (IMAGES.permute(0, 2, 3, 1).numpy(), LABELS.numpy())
    elif form == "pil_dataset":
        train = ListDataset([(pil(i), int(LABELS[i])) for i in range(12)], ["a", "b", "c"])
    elif form == "to_tensor_dataset":  # torchvision.transforms.ToTensor: float C x H x W in [0, 1]
        train = ListDataset([(IMAGES[i].float() / 255, int(LABELS[i])) for i in range(12)])
    else:  # torchvision's MNIST/CIFAR keep the arrays as .data and .targets
        train = ListDataset([], ["a", "b", "c"])
        train.data, train.targets, train.transform = IMAGES.permute(0, 2, 3, 1).numpy(), LABELS.tolist(), None
    loaded = convert({"train": train, "test": (IMAGES[:4], LABELS[:4])}, "mydata.load")
    assert loaded.train.images.dtype == torch.uint8 and torch.equal(loaded.train.images, IMAGES)
    assert torch.equal(loaded.train.labels, LABELS) and loaded.train.labels.dtype == torch.int64
    assert loaded.classes == (("a", "b", "c") if form in ("pil_dataset", "data_targets") else ("0", "1", "2"))


def test_one_channel_images_and_a_tuple_with_class_names() -> None:
    gray = IMAGES[:, 0]  # N x H x W
    loaded = convert(((gray, LABELS), (gray[:3], LABELS[:3]), ["x", "y", "z"]), "f")
    assert loaded.train.images.shape == (12, 1, 5, 7) and loaded.classes == ("x", "y", "z")
    assert loaded.val is None


def test_the_spec_is_measured_on_the_training_images() -> None:
    loaded = convert({"train": (IMAGES, LABELS), "test": (IMAGES, LABELS), "val": (IMAGES[:2], LABELS[:2])}, "f")
    spec = spec_of(loaded)
    x = IMAGES.double() / 255
    assert (spec.channels, spec.height, spec.width, spec.num_classes) == (3, 5, 7, 3)
    assert spec.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert spec.std == pytest.approx(x.std(dim=(0, 2, 3), correction=0).tolist(), abs=1e-5)
    assert len(loaded.val) == 2


@pytest.mark.parametrize(("result", "message"), [
    ({"train": (IMAGES, LABELS)}, "needs 'train' and 'test'"),
    ({"train": (IMAGES, LABELS), "test": (IMAGES, LABELS), "extra": 1}, "with keys"),
    (42, "returned int"),
    ({"train": (IMAGES.float(), LABELS), "test": (IMAGES, LABELS)}, "images are float32"),
    ({"train": (IMAGES, LABELS.float()), "test": (IMAGES, LABELS)}, "labels are float32"),
    ({"train": (IMAGES, LABELS - 1), "test": (IMAGES, LABELS)}, "labels range -1..1, outside 0..2"),
    ({"train": (IMAGES, LABELS), "test": (IMAGES[:, :, :4], LABELS)}, "splits differ in image shape"),
    ({"train": (IMAGES[:, :2], LABELS), "test": (IMAGES, LABELS)}, "give N x C x H x W"),
    ({"train": (IMAGES[:0], LABELS[:0]), "test": (IMAGES, LABELS)}, "is empty"),
    ({"train": ListDataset([(pil(0), 0), (pil(1).resize((3, 3)), 1)]), "test": (IMAGES, LABELS)}, "images differ in size"),
    ({"train": ListDataset([pil(0)]), "test": (IMAGES, LABELS)}, "must give (image, label) pairs"),
    ({"train": ((IMAGES, LABELS, LABELS)), "test": (IMAGES, LABELS)}, "tuple of 3 arrays; give (images, labels)"),
])
def test_bad_data_is_refused_with_what_was_found(result, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert(result, "mydata.load")


def test_normalized_floats_are_named_as_such() -> None:
    with pytest.raises(ConfigError, match="look normalized"):
        convert({"train": (np.full((2, 1, 4, 4), -0.5, dtype=np.float32), [0, 1]), "test": (IMAGES, LABELS)}, "f")
