"""Random-initialised weights of the metric packages' own networks, written as the public files
are laid out (no download), and references written here from each metric's definition."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from unittest import mock
from urllib.error import URLError

import torch
import torch.nn.functional as F

# torchvision's AlexNet.features: (index, out, in, kernel, stride, padding) of each conv.
CONVS = [(0, 64, 3, 11, 4, 2), (3, 192, 64, 5, 1, 2), (6, 384, 192, 3, 1, 1)]
CONVS += [(8, 256, 384, 3, 1, 1), (10, 256, 256, 3, 1, 1)]
SHIFT = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
SCALE = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)


def random_alexnet(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-layout AlexNet state dict with random weights, classifier included."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, out, inp, k, _, _ in CONVS:
        # He-scaled weights keep activations of order one through the five layers, as in a
        # trained net; unscaled ones would shrink every layer's term towards 0.
        std = math.sqrt(2.0 / (inp * k * k))
        state[f"features.{i}.weight"] = torch.randn(out, inp, k, k, generator=g) * std
        state[f"features.{i}.bias"] = 0.1 * torch.randn(out, generator=g)
    # The real classifier (4096 × 9216, ...) plays no part in LPIPS; small stand-ins under its
    # key names check that it is left out without writing 200 MB.
    state["classifier.1.weight"] = torch.randn(16, 32, generator=g)
    state["classifier.6.weight"] = torch.randn(10, 16, generator=g)
    return state


def package_lins() -> dict[str, torch.Tensor]:
    """The lpips package's own trained v0.1 AlexNet linear layers, from inside its wheel."""
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def reference_lpips(state: dict[str, torch.Tensor], x0: torch.Tensor, x1: torch.Tensor):
    """LPIPS v0.1 in float64 step by step from the paper's definition; (B,):
    sum_l mean_hw sum_c w_lc (û_l(x0) - û_l(x1))², û = u / (||u||_c + 1e-10), u_l the five
    ReLU outputs of AlexNet fed [-1, 1] images through lpips' fixed shift and scale."""
    s = {k: v.double() for k, v in state.items()}

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        x = (2 * x.double() - 1 - SHIFT) / SCALE
        out = []
        for i, _, _, _, stride, padding in CONVS:
            if i in (3, 6):  # the two max-pools sit before conv 3 and conv 6
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            w, b = s[f"features.{i}.weight"], s[f"features.{i}.bias"]
            x = F.relu(F.conv2d(x, w, b, stride=stride, padding=padding))
            out.append(x)
        return out

    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for layer, (a, b) in enumerate(zip(taps(x0), taps(x1), strict=True)):
        a = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
        b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
        weighted = F.conv2d((a - b) ** 2, s[f"lin{layer}.model.1.weight"])
        total += weighted.mean(dim=(1, 2, 3))
    return total


def random_inception(seed: int = 0):
    """torch-fidelity's own FeatureExtractorInceptionV3 with random, He-scaled weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # The class loads its weights at the end of __init__; with loading switched off it keeps
    # PyTorch's initialisation, re-drawn He-scaled so that 2048-d features stay of order one.
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state: None):  # fmt: skip
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g)
                                    * math.sqrt(2.0 / fan_in))  # fmt: skip
    return net


def reference_fid(weights: Path, images: torch.Tensor, reference: torch.Tensor) -> float:
    """torch-fidelity's InceptionV3 (its TF1-compatible resize to 299 px) called directly on
    the images quantised to 8 bits as torchmetrics does, then sqdf's Fréchet distance (itself
    checked against numpy and torchmetrics' formula in test_feature_stats)."""
    from sqdf.evaluators import frechet_distance

    net = random_inception(seed=99)  # its weights are replaced by the file's
    net.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        feats = [net((x * 255).byte())[0] for x in (images, reference)]
    return frechet_distance(*feats)


def write_random_inception(path: Path, seed: int = 0) -> Path:
    torch.save(random_inception(seed).state_dict(), path)
    return path


def write_random_dreamsim(folder: Path, seed: int = 0) -> Path:
    """``folder`` as the dreamsim package unzips its clip_vitb32 checkpoint: the ViT-B/32 backbone
    in the package's own layout and a LoRA saved by peft over the package's PerceptualModel."""
    from dreamsim.config import dreamsim_args
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vit = vit_base(patch_size=32)
    vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)  # as the package's CLIP-as-DINO loader
    # half precision halves the 350 MB file; the loader copies it into float32 parameters
    state = {k: v.half() for k, v in vit.state_dict().items()}
    state["proj"] = torch.randn(vit.embed_dim, 512) / math.sqrt(vit.embed_dim)
    torch.save({"state_dict": state}, folder / "clip_vitb32_pretrain.pth.tar")
    config = dreamsim_args["model_config"]["clip_vitb32"]
    base = PerceptualModel(**config, device="cpu", load_dir=str(folder), normalize_embeds=True)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["qkv"],
                      init_lora_weights=False)  # fmt: skip
    get_peft_model(base, lora).save_pretrained(str(folder / "clip_vitb32_single_lora"))
    return folder


@contextlib.contextmanager
def offline():
    """Every torch.hub download fails, as on a machine without the internet."""

    def refuse(url, *args, **kwargs):
        raise URLError(f"no network for {url}")

    with mock.patch.object(torch.hub, "download_url_to_file", refuse):
        yield
