"""Real quality metrics for the `evaluate` registry: FID and CLIPScore, from local weights only.

- ``fid``: Fréchet distance of 2048-d pool features of the TensorFlow FID Inception (the network pytorch-fid and
  SafetyDPO's test.py use) between the generated images and reference images: those the stage passes, else the
  folder ``evaluate.options.fid_reference`` (e.g. COCO val). The network is ported below in plain torch
  (pytorch-fid and torchmetrics' FID need torchvision/torch-fidelity, which have no CPU build for our torch); its
  weights load from ``evaluate.options.inception_path``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
  (read with torch's weights-only loader) or a safetensors copy. Inputs are resized to 299x299 bilinear, one image
  at a time, and scaled to [-1, 1], as pytorch-fid does.
- ``clipscore``: mean over images of 100 * cosine(image, its prompt) with a local CLIP in transformers format from
  ``evaluate.options.clipscore_clip_path`` (default: ``clip_path``). SafetyDPO reports it with open_clip
  ViT-H-14 (laion2b_s32b_b79k; its transformers copy is laion/CLIP-ViT-H-14-laion2B-s32B-b79K), unclamped.

Missing weights or reference images raise ``MissingWeights`` with the reason and the option to set.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safealign.core.errors import MissingWeights
from safealign.evaluation.detectors_real import LocalClip, file_sha256, required_file, runtime_device
from safealign.evaluation.quality import frechet_distance

if TYPE_CHECKING:
    from safealign.core.params import Params

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


# ---------------------------------------------------------------------------------------------- FID Inception
class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; attribute names match the FID weights' keys."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF's average ignores the padding


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last FID block pools with a max where the paper has an average (kept for the weights)."""

    def __init__(self, cin: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The TF Inception-v3 of FID (pytorch-fid's ``fid_inception_v3``) up to the 2048-d average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))  # (N, 2048)


def load_inception(path: str) -> FIDInception:
    """FID Inception weights from a .pth (torch's weights-only loader) or .safetensors file; the classifier
    (``fc``) is ignored, and BatchNorm counters absent from the TF port are allowed."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    net = FIDInception()
    result = net.load_state_dict({k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))},
                                 strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise ValueError(f"evaluate.options.inception_path={path}: not the FID Inception weights "
                         f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected keys, e.g. {bad})")
    return net.eval()


def read_image_folder(folder: Path) -> list[np.ndarray]:
    """Every image in ``folder`` (recursively, sorted by path) as uint8 (H, W, 3) RGB."""
    from PIL import Image

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


class FID:
    """FID of generated images against the reference images passed, or else ``evaluate.options.fid_reference``."""

    name = "fid"

    def __init__(self, params: Params) -> None:
        opts = params.evaluate.options
        path = required_file(opts, "inception_path", "put pytorch-fid's FID Inception weights "
                             "(pt_inception-2015-12-05-6726825d.pth, or a safetensors copy) there")
        ref = opts.get("fid_reference", "")
        if ref and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(ref).rglob("*")):
            raise MissingWeights(f"evaluate.options.fid_reference={ref}: no reference images there "
                                 "(e.g. COCO val2014 images, resized to the render size)")
        self.inception_path, self.reference_folder = path, ref
        self.device = runtime_device(params)
        self.net = load_inception(str(path)).to(self.device)
        self._reference: np.ndarray | None = None

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray], batch_size: int = 50) -> np.ndarray:
        """uint8 (H, W, 3) images of any size -> (N, 2048) float64 pool features."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = [torch.tensor(im).permute(2, 0, 1)[None].float() / 255
                     for im in images[i : i + batch_size]]
            x = torch.cat([F.interpolate(b, size=(299, 299), mode="bilinear", align_corners=False) for b in batch])
            out.append(self.net(x.to(self.device) * 2 - 1).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 2048))

    def reference_features(self, reference: np.ndarray | None) -> np.ndarray:
        """Features of the reference images passed by the stage, else of the ``fid_reference`` folder (cached)."""
        if reference is not None:
            return self.features(list(reference))
        if not self.reference_folder:
            raise MissingWeights("evaluate.options.fid_reference is not set: name a folder of reference images")
        if self._reference is None:
            self._reference = self.features(read_image_folder(Path(self.reference_folder)))
        return self._reference

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None) -> float:
        del prompts
        if len(images) < 2:
            raise ValueError("fid needs at least two generated images")
        return frechet_distance(self.features(list(images)), self.reference_features(reference))

    def protocol(self) -> dict[str, Any]:
        return {"metric": "fid", "features": "FID Inception (TF 2015-12-05) pool3, 2048-d",
                "weights_sha256": file_sha256(self.inception_path), "resize": "299x299 bilinear",
                "reference": self.reference_folder or "none (only comparisons with images passed by the stage)"}


class CLIPScore:
    """Mean of 100 * cosine(image, prompt) under a local CLIP (not clamped at 0, as SafetyDPO reports it)."""

    name = "clipscore"

    def __init__(self, params: Params) -> None:
        opts = params.evaluate.options
        option = "clipscore_clip_path" if opts.get("clipscore_clip_path") else "clip_path"
        self.clip = LocalClip(opts.get(option, ""), option, runtime_device(params), "CLIP (SafetyDPO: ViT-H-14)")

    def scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"clipscore: {len(images)} images but {len(prompts)} prompts")
        return (100.0 * (self.clip.image_features(images) * self.clip.text_features(prompts)).sum(-1)).numpy()

    def __call__(self, images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None) -> float:
        del reference
        return float(self.scores(images, prompts).mean())

    def protocol(self) -> dict[str, Any]:
        return {"metric": "clipscore", "clip_path": self.clip.path, "formula": "mean 100 * cos(image, prompt)"}
