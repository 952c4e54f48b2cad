"""The image modality: class folders of image files, or Fashion-MNIST's idx files; a
timm backbone; uint8 (N, S, S, 3) arrays; flips and padded crops; a grid of mistakes."""

from __future__ import annotations

import base64
import functools
import gzip
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from graft.base import images, plots
from graft.base.errors import GraftError
from graft.modalities import (
    Built,
    Candidate,
    Source,
    check_folder,
    folder_candidates,
    list_class_folders,
    url_class_files,
    worst_mistakes,
)
from graft.modalities.backbone import PACKAGED, parse_source, preprocessing_config, resolve_architecture
from graft.modalities.backbone import build as build_timm

NAME = "image"
SOURCES = ("fashion-mnist", "imagefolder")
INPUT_COLUMN = "image"  # encoded image bytes (PNG, JPEG, BMP, WebP); base64 over JSON
MANIFEST_COLUMNS = {"width": "Int64", "height": "Int64", "mode": "string"}
SAMPLES = "images"  # what to call the samples in messages
REQUIREMENTS = ("timm", "torchvision", "pillow")  # what the registered model needs beyond torch

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# --- sources -------------------------------------------------------------------------------


def _check_fashion_mnist(path: Path) -> None:
    missing = [n for files in FASHION_MNIST_FILES.values() for n in files if not (path / n).is_file()]
    if missing:
        raise GraftError(
            f"ingest.path: {path}: Fashion-MNIST files not found ({', '.join(missing)}). "
            "Install them with `apt-get install dataset-fashion-mnist` (or `make data`), "
            "or set ingest.path to the folder that holds the idx files."
        )


def check_source(params, path: Path) -> None:
    (_check_fashion_mnist if params.source == "fashion-mnist" else check_folder)(path)


def source_files(params, path: Path) -> tuple[list[Path], tuple[str, ...]]:
    if params.source == "fashion-mnist":
        return [path / n for pair in FASHION_MNIST_FILES.values() for n in pair], FASHION_MNIST_CLASSES
    found, classes, _ = list_class_folders(path, images.IMAGE_EXTENSIONS, SAMPLES)
    return [f for _, _, f in found], classes


def url_wanted(params, entries: dict[str, dict]) -> dict[str, dict]:
    if params.source == "fashion-mnist":
        wanted = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
        missing = [n for n in wanted if n not in entries]
        if missing:
            raise GraftError(f"ingest.path: {params.path}: Fashion-MNIST files not found there ({', '.join(missing)})")
        return {n: entries[n] for n in wanted}
    found = url_class_files(entries, images.IMAGE_EXTENSIONS)
    if not found:
        raise GraftError(f"ingest.path: {params.path}: no images in class sub-folders there "
                         f"(looked for {', '.join(images.IMAGE_EXTENSIONS)})")  # fmt: skip
    return found


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def _png_bytes(pixels: np.ndarray) -> bytes:

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def read_fashion_mnist(root: Path) -> Source:
    """The original idx files, train/test split kept; images become grayscale PNGs."""
    _check_fashion_mnist(root)
    candidates: list[Candidate] = []
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        pixels = _read_idx(root / img_name, 16).reshape(-1, 28, 28)
        labels = _read_idx(root / lbl_name, 8)
        if len(pixels) != len(labels):
            raise GraftError(f"{root / img_name}: {len(pixels)} images but {len(labels)} labels")
        for i, (img, lbl) in enumerate(zip(pixels, labels, strict=True)):
            candidates.append(Candidate(split, FASHION_MNIST_CLASSES[int(lbl)], f"{img_name}#{i}", ".png",
                                        functools.partial(_png_bytes, img)))  # fmt: skip
    return Source(candidates, FASHION_MNIST_CLASSES, [])


def read_source(params, root: Path) -> Source:
    if params.source == "fashion-mnist":
        return read_fashion_mnist(root)
    return folder_candidates(root, images.IMAGE_EXTENSIONS, SAMPLES)


def inspect(data: bytes) -> dict[str, Any]:
    info = images.inspect(data)
    return {"width": info.width, "height": info.height, "mode": info.mode, "error": info.error}


# --- the data gate ---------------------------------------------------------------------------

leak_key = "sha256"  # identical bytes: one image


def expectations(df, params, context) -> list[tuple[str, Any]]:
    """Row checks of images (``context``: the run's other params; images need none)."""
    import great_expectations.expectations as gxe  # Great Expectations: ~3.7 s of import, paid by the data gate only

    return [
        # A corrupt or truncated file would crash training halfway, or be dropped unseen.
        ("every image decodes", gxe.ExpectColumnValuesToBeNull(column="error")),
        ("width within bounds", gxe.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_side, max_value=params.max_side)),
        ("height within bounds", gxe.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_side, max_value=params.max_side)),
        # Data leaks: the same image in train and test inflates the test score.
        ("no image in both train and test", gxe.ExpectColumnValuesToBeInSet(column="in_train_and_test", value_set=[False])),
    ]  # fmt: skip


# --- model inputs ----------------------------------------------------------------------------


def check_backbone(backbone) -> None:
    """Cheap: ``load_pretrained.source`` names a kind of image backbone (before a run starts)."""
    kind, value = parse_source(backbone.source)
    if kind == "packaged" and value not in PACKAGED:
        raise GraftError(f"params.yaml: load_pretrained.source packaged:{value}: known packaged image weights: "
                         f"{', '.join(PACKAGED)}")  # fmt: skip


def input_spec(pre, backbone, assets: Path) -> dict[str, Any]:
    """How raw bytes become pixels: preprocess's size and resizing, the backbone's
    interpolation (mean and std are added by ``build``, from the same config)."""
    interpolation = preprocessing_config(resolve_architecture(backbone)).interpolation
    return {"image_size": pre.image_size, "interpolation": interpolation, "resize": pre.resize}


def describe_input(spec: dict[str, Any]) -> str:
    return f"{spec['image_size']}px ({spec['interpolation']})"


class Encoder:
    """Encoded image bytes -> a uint8 (S, S, 3) array: preprocess and the registered model
    both go through it, so serving sees the pixels training saw."""

    def __init__(self, spec: dict[str, Any], assets: Path | None = None):
        self.spec = spec
        size = int(spec["image_size"])
        self.shape, self.dtype = (size, size, 3), np.uint8

    def encode(self, data: bytes) -> np.ndarray:
        s = self.spec
        return images.load_rgb_array(data, int(s["image_size"]), s["interpolation"], s["resize"])

    def batch(self, values) -> np.ndarray:
        rows = [self.encode(_as_bytes(v)) for v in values]
        return np.stack(rows) if rows else np.zeros((0, *self.shape), self.dtype)


def _as_bytes(value) -> bytes:

    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # JSON transports (the REST scoring server) send base64
        return base64.b64decode(value)
    raise TypeError(f"column '{INPUT_COLUMN}' must hold encoded image bytes, got {type(value).__name__}")


def from_raw(data: bytes) -> bytes:
    return data


def build(params, num_classes: int, spec: dict[str, Any], assets: Path) -> Built:
    architecture = resolve_architecture(params)
    backbone = build_timm(params, num_classes=num_classes, seed=params.seed)
    pre = preprocessing_config(architecture)
    return Built(backbone.model, params.source, architecture, backbone.weights_sha256,
                 {**spec, "mean": list(pre.mean), "std": list(pre.std)})  # fmt: skip


def create(cfg, model_dir: Path | None = None):
    import timm  # timm (with torch): ~4 s of import, paid where a model is built

    return timm.create_model(cfg.architecture, num_classes=len(cfg.classes), drop_rate=cfg.drop_rate)


def to_input(batch: np.ndarray, cfg, device, channels_last: bool = True):
    """uint8 (N, H, W, 3) images to normalised float (N, 3, H, W) on ``device``."""
    import torch  # torch: ~2 s of import, paid where a model runs

    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg.input["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.input["std"], device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


TEST_VIEWS = ("hflip",)  # test-time augmentation: the views predictions may average over


def test_views(x, how: str) -> list:
    """The model inputs whose predictions are averaged at test time: the image alone, or
    (``hflip``) the image and its mirror image, as training's flips taught the model."""
    return [x, x.flip(3)] if how == "hflip" else [x]


def rescale(x, size: int):
    """A batch of model inputs at ``size`` x ``size`` pixels (progressive resizing trains on
    smaller images first). Antialiased, so shrinking averages pixels rather than skipping them."""
    import torch  # torch: ~2 s of import, paid where a model runs
    import torch.nn.functional as F  # torch: ~2 s of import, paid where a model runs

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else out


def augment(batch: np.ndarray, rng: np.random.Generator, p) -> np.ndarray:
    """Random horizontal flip, padded random crop and random erasing, on uint8 (N, H, W, 3)."""
    out = batch.copy()
    n, h, w, _ = out.shape
    if p.hflip:
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, ::-1]
    pad = p.crop_padding
    if pad:
        padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        dy, dx = rng.integers(0, 2 * pad + 1, n), rng.integers(0, 2 * pad + 1, n)
        for i in range(n):
            out[i] = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    if p.randaug_ops:  # drawn only when asked, like erasing below
        _rand_augment(out, rng, p.randaug_ops, p.randaug_magnitude)
    if p.erase_prob:  # drawn only when asked, so the other settings' random streams stay as they were
        for j in np.flatnonzero(rng.random(n) < p.erase_prob):
            _erase(out[j], rng)
    return out


def _rand_augment(batch: np.ndarray, rng: np.random.Generator, ops: int, magnitude: int) -> None:
    """RandAugment (Cubuk et al., 2020), in place: each image gets ``ops`` operations drawn
    from timm's set (rotate, shear, translate, colour, contrast, solarize, ...), each applied
    with probability 0.5 at a strength drawn around ``magnitude`` (timm's
    ``rand-m{magnitude}-n{ops}-mstd0.5``, the recipe of its ImageNet trainings).

    timm draws from the process-wide ``random`` and ``np.random``; those are seeded here
    from the epoch's generator and put back afterwards, so a batch's augmentation depends
    only on (seed, epoch) like the flips and crops (a resumed or distributed run draws the
    same) and nothing else in the process sees its state move."""

    transform = _rand_augment_transform(ops, magnitude, batch.shape[1])
    seeds = rng.integers(0, 2**32, size=2)
    saved = random.getstate(), np.random.get_state()
    try:
        random.seed(int(seeds[0]))
        np.random.seed(int(seeds[1]))
        for i in range(len(batch)):
            batch[i] = np.asarray(transform(Image.fromarray(batch[i])))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


@functools.lru_cache(maxsize=4)
def _rand_augment_transform(ops: int, magnitude: int, size: int):
    from timm.data.auto_augment import rand_augment_transform  # timm (with torch): imported where used

    # timm's hyper-parameters for an image of this size (its create_transform does the
    # same): translations up to 45% of the side, gaps filled with mid-grey.
    return rand_augment_transform(f"rand-m{magnitude}-n{ops}-mstd0.5", {"translate_const": int(size * 0.45),
                                                                         "img_mean": (128, 128, 128)})  # fmt: skip


def _erase(image: np.ndarray, rng: np.random.Generator, tries: int = 10) -> None:
    """Random erasing (Zhong et al., 2020), in place: a rectangle covering 2% to 1/3 of the
    image, of aspect ratio 0.3 to 3.3 (log-uniform), filled with uniform noise, as the paper
    and timm's RandomErasing do. A shape that does not fit is drawn again, ``tries`` times."""
    h, w, c = image.shape
    for _ in range(tries):
        area = rng.uniform(0.02, 1 / 3) * h * w
        ratio = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        eh, ew = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < eh < h and 0 < ew < w:
            y0, x0 = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            image[y0 : y0 + eh, x0 : x0 + ew] = rng.integers(0, 256, (eh, ew, c), dtype=np.uint8)
            return


MIXABLE = True  # fine_tune.mixup_alpha, cutmix_alpha, erase_prob and randaug_ops apply


def mix(batch: np.ndarray, rng: np.random.Generator, p) -> tuple[np.ndarray, tuple[np.ndarray, float] | None]:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) of a training batch, uint8
    (N, H, W, 3), with a permutation of itself; with ``lam ~ Beta(a, a)``: mixup blends
    ``lam * x + (1 - lam) * x[perm]``, CutMix pastes a box of ``x[perm]`` covering ``1 - lam``
    of the image (lam then is the share actually kept, the box being clipped at the
    edges). Returns the batch and (perm, lam), or the batch untouched and None when
    fine_tune asks for neither. Both asked for: each batch takes one, at even odds."""
    asked = [(kind, a) for kind, a in (("mixup", p.mixup_alpha), ("cutmix", p.cutmix_alpha)) if a > 0]
    if not asked:
        return batch, None
    kind, a = asked[int(rng.random() < 0.5)] if len(asked) == 2 else asked[0]
    lam = float(rng.beta(a, a))
    perm = rng.permutation(len(batch))
    if kind == "mixup":
        return np.rint(lam * batch + (1.0 - lam) * batch[perm]).astype(batch.dtype), (perm, lam)
    _, h, w, _ = batch.shape
    cut = np.sqrt(1.0 - lam)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = np.clip([cy - int(h * cut) // 2, cy + int(h * cut) // 2], 0, h)
    x0, x1 = np.clip([cx - int(w * cut) // 2, cx + int(w * cut) // 2], 0, w)
    out = batch.copy()
    out[:, y0:y1, x0:x1] = batch[perm, y0:y1, x0:x1]
    return out, (perm, 1.0 - float((y1 - y0) * (x1 - x0)) / (h * w))


# --- people ----------------------------------------------------------------------------------


def present_mistakes(x: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: list[str], prepared: Path,
                     out_dir: Path, names: dict[str, str] | None = None, k: int = 16) -> list[Path]:  # fmt: skip
    """The ``k`` wrong predictions made with the highest confidence, as a grid, each
    titled with its file as the source names it (``names``: manifest id -> path)."""
    plt = plots.pyplot()
    pred = probs.argmax(1)
    worst = worst_mistakes(y, probs, k)
    ids = np.load(prepared / "test_ids.npy")
    cols = 4
    rows = max(1, int(np.ceil(len(worst) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst, strict=False):
        ax.imshow(x[i])
        name = (names or {}).get(str(ids[i]), str(ids[i]))
        name = name if len(name) <= 28 else "..." + name[-25:]  # the end of a path says most
        ax.set_title(f"{name}\ntrue {classes[y[i]]}\npred {classes[pred[i]]} ({probs[i, pred[i]]:.2f})", fontsize=9)
    if len(worst) == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center")
    fig.suptitle("most confident mistakes (test)")
    path = out_dir / "worst_mistakes.png"
    plots.save_png(fig, path)
    return [path]


def input_columns(path: Path, text_column: str | None = None) -> dict[str, dict[str, str]]:
    """Other columns of ``graft predict``'s input, by sample name: images come as files, with none."""
    return {}


def read_inputs(path: Path, text_column: str | None = None) -> list[tuple[str, Any]]:
    """``graft predict``'s input: an image, or a folder searched recursively for images.
    Returns (name, load) pairs; ``load()`` reads one sample: (raw value, error or "")."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in images.IMAGE_EXTENSIONS)
    if not files:
        raise GraftError(f"{path}: no images found ({', '.join(images.IMAGE_EXTENSIONS)})")

    def load(f: Path):
        data = f.read_bytes()
        return data, ("" if images.inspect(data).error is None else "cannot decode image")

    return [(str(f), lambda f=f: load(f)) for f in files]
