"""`convexadam_reg`: training-free deformable registration on frozen features with ConvexAdam (the
"DINO + ConvexAdam" rows of Tables 15-16 of "DINOv3 Meets Medical Imaging", arXiv 2509.06467;
recipe of DINO-Reg, Song, Xu and Yan, MICCAI 2024; optimiser of Siebert, Hansen and Heinrich,
"Fast 3D registration with accurate optimisation and little learning", Learn2Reg 2021).

Per pair (fixed = ES, moving = ED frame of one patient/view):
1. features: `dino` = the encoder's patch-token maps of every slice (stacked to a volume for 3D),
   reduced by one PCA fitted on the fixed and moving tokens together to `n_components` (24, as
   DINO-Reg), upsampled bilinearly to the image grid and L2-normalised per voxel; `mind` = MIND-SSC
   of the image (the package's MINDSSC); `dino+mind` concatenates both (Table 16, ACDC).
   `use_mask` zeroes features outside each image's foreground (DINO-Reg masks the background).
2. coupled convex optimisation on a grid of `grid_sp` voxels over displacements of +-`disp_hw` grid
   cells (convexAdam's `correlate` + `coupled_convex`), forward and backward, made inverse
   consistent (`inverse_consistency`);
3. Adam instance optimisation (`niter` steps, diffusion regulariser `lambda_weight`, on a grid of
   `grid_sp_adam` voxels): the loop of convexAdam's `convex_adam_pt`, which the package only runs
   on MIND it computes itself, written here once for any feature volume.

2D images (CAMUS) run as thin volumes: the image repeated over 3 x grid_sp planes (the cost volume's box filter needs 3 grid cells per axis), with the
through-plane displacement held at zero (out-of-plane candidates of the cost volume are excluded,
and the Adam step never moves that component). Defaults are ConvexAdam's (lambda 1.25, grid 6,
half-width 4, 80 iterations, Adam grid 2, MIND radius 1 / dilation 2). Device-agnostic: float32 on
whatever device `device` resolves to (the package's nnUNet variant assumes CUDA; not used).
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from tasks.dense import FeatureSource, Pair, Sample
from tasks.protocols.base import register_protocol
from tasks.protocols.dense_base import Registration, TrainingFreeHead
from tasks.protocols.optim import Adam
from tasks.targets.pairs import warp_image, warp_labels


@functools.cache
def _convex_adam() -> Any:
    """convexAdam's utilities, imported on first use: the package pulls nibabel and costs ~0.3 s,
    which every process that imports the protocol registry (each Tune trial, each driver) would
    otherwise pay for registrations it never runs."""
    with warnings.catch_warnings():  # the package runs warnings.filterwarnings("ignore") on import: keep it local
        from convexAdam import convex_adam_utils
    return convex_adam_utils

# dino+mind3d: DINO alone on 2D images, DINO + MIND on volumes: the paper's choice per table (Table 15
# drops MIND on CAMUS, where MIND fails on ultrasound; Table 16 concatenates it on ACDC).
FEATURES = ("dino", "mind", "dino+mind", "dino+mind3d")


def pca_pair(fixed: torch.Tensor, moving: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, C, h, w) token maps of both images -> (S, k, h, w) each, on one PCA basis fitted on the
    tokens of both together (exact: eigenvectors of the C x C covariance, so deterministic)."""
    s_f, c = fixed.shape[:2]
    tok = torch.cat([fixed.permute(0, 2, 3, 1).reshape(-1, c), moving.permute(0, 2, 3, 1).reshape(-1, c)])
    tok = tok.double()
    mu = tok.mean(0, keepdim=True)
    x = tok - mu
    _, vecs = torch.linalg.eigh(x.T @ x)
    basis = vecs[:, -k:].flip(1)  # largest variance first
    proj = (x @ basis).float()
    n_f = fixed.shape[0] * fixed.shape[2] * fixed.shape[3]

    def back(p: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return p.reshape(ref.shape[0], ref.shape[2], ref.shape[3], k).permute(0, 3, 1, 2).contiguous()

    return back(proj[:n_f], fixed), back(proj[n_f:], moving)


def _thin(vol: torch.Tensor, planes: int) -> torch.Tensor:
    """(1, C, 1, H, W) -> (1, C, H, W, planes): a 2D image as a thin volume for the 3D blocks."""
    return vol[:, :, 0, :, :, None].expand(-1, -1, -1, -1, planes).contiguous()


def convex_step(ff: torch.Tensor, fm: torch.Tensor, grid_sp: int, disp_hw: int, ic: bool,
                planar: bool) -> torch.Tensor:
    """Coupled convex optimisation (forward, and backward + inverse consistency when `ic`) on
    feature volumes (1, C, H, W, D): the dense displacement (1, 3, H, W, D) in voxels."""
    cau = _convex_adam()
    H, W, D = ff.shape[2:]
    n_ch = ff.shape[1]
    ffs = F.avg_pool3d(ff, grid_sp, stride=grid_sp)
    fms = F.avg_pool3d(fm, grid_sp, stride=grid_sp)
    eye = disp_hw * torch.eye(3, 4, device=ff.device, dtype=ff.dtype).unsqueeze(0)
    n = disp_hw * 2 + 1
    mesh = F.affine_grid(eye, (1, 1, n, n, n), align_corners=True).permute(0, 4, 1, 2, 3).reshape(3, -1, 1)

    def solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ssd, argmin = cau.correlate(a, b, disp_hw, grid_sp, (H, W, D), n_ch)
        if planar:  # a thin volume: only in-plane candidates (third component 0) may win
            ssd[mesh[2, :, 0] != 0] = torch.finfo(ssd.dtype).max
            argmin = ssd.argmin(0)
        return cau.coupled_convex(ssd, argmin, mesh, grid_sp, (H, W, D))

    disp_soft = solve(ffs, fms)
    if not ic:
        return F.interpolate(disp_soft * grid_sp, size=(H, W, D), mode="trilinear", align_corners=False)
    scale = torch.tensor([H // grid_sp - 1, W // grid_sp - 1, D // grid_sp - 1], device=ff.device,
                         dtype=ff.dtype).view(1, 3, 1, 1, 1) / 2
    disp_soft_ = solve(fms, ffs)
    with warnings.catch_warnings():  # the package's grid_sample calls leave align_corners at its default
        warnings.filterwarnings("ignore", "Default grid_sample and affine_grid behavior", UserWarning)
        disp_ice, _ = cau.inverse_consistency((disp_soft / scale).flip(1), (disp_soft_ / scale).flip(1), iter=15)
    return F.interpolate(disp_ice.flip(1) * scale * grid_sp, size=(H, W, D), mode="trilinear", align_corners=False)


def _smooth(d: torch.Tensor) -> torch.Tensor:
    for _ in range(3):  # ConvexAdam's B-spline-like smoothing of the Adam grid
        d = F.avg_pool3d(d, 3, stride=1, padding=1)
    return d


def adam_step(ff: torch.Tensor, fm: torch.Tensor, disp: torch.Tensor, lambda_weight: float, grid_sp_adam: int,
              niter: int, planar: bool) -> torch.Tensor:
    """Adam instance optimisation of `disp` (1, 3, H, W, D) on any feature volumes: SSD of the
    warped moving features (x 12, MIND's channel count, so lambda keeps ConvexAdam's meaning)
    plus lambda x diffusion regularisation, on a grid of `grid_sp_adam` voxels."""
    H, W, D = ff.shape[2:]
    g = grid_sp_adam
    size = (H // g, W // g, D // g)
    pf = F.avg_pool3d(ff, g, stride=g)
    pm = F.avg_pool3d(fm, g, stride=g)
    param = torch.nn.Parameter(F.interpolate(disp, size=size, mode="trilinear", align_corners=False).float() / g)
    opt = Adam([param], lr=1)
    grid0 = F.affine_grid(torch.eye(3, 4, device=ff.device).unsqueeze(0), (1, 1, *size), align_corners=False)
    scale = torch.tensor([(s - 1) / 2 for s in size], device=ff.device)
    keep = torch.tensor([1.0, 1.0, 0.0 if planar else 1.0], device=ff.device).view(1, 3, 1, 1, 1)
    for _ in range(niter):
        opt.zero_grad()
        d = _smooth(param * keep).permute(0, 2, 3, 4, 1)  # (1, h, w, d, 3)
        reg = lambda_weight * (((d[0, 1:] - d[0, :-1]) ** 2).mean() + ((d[0, :, 1:] - d[0, :, :-1]) ** 2).mean()
                               + ((d[0, :, :, 1:] - d[0, :, :, :-1]) ** 2).mean())
        grid = grid0 + (d / scale).flip(-1)
        sampled = F.grid_sample(pm, grid, mode="bilinear", align_corners=False)
        cost = ((sampled - pf) ** 2).mean(1) * 12
        (cost.mean() + reg).backward()
        opt.step()
    with torch.no_grad():
        fitted = _smooth(param * keep)
    return F.interpolate(fitted * g, size=(H, W, D), mode="trilinear", align_corners=False)


@register_protocol
class ConvexAdamReg(TrainingFreeHead):
    name: ClassVar[str] = "convexadam_reg"
    supports: ClassVar[frozenset[str]] = frozenset({"registration"})

    def __init__(self, features: str = "dino", n_components: int = 24, lambda_weight: float = 1.25,
                 grid_sp: int = 6, disp_hw: int = 4, niter: int = 80, grid_sp_adam: int = 2, ic: bool = True,
                 mind_r: int = 1, mind_d: int = 2, use_mask: bool = False, task: str = "registration",
                 seed: int = 0, device: str = "auto"):
        self.features = features
        self.n_components = n_components
        self.lambda_weight = lambda_weight
        self.grid_sp = grid_sp
        self.disp_hw = disp_hw
        self.niter = niter
        self.grid_sp_adam = grid_sp_adam
        self.ic = ic
        self.mind_r = mind_r
        self.mind_d = mind_d
        self.use_mask = use_mask
        self.task = task
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        self._choice("features", FEATURES)
        self._int("n_components", 1)
        self._float("lambda_weight", 0.0, inclusive=True)
        for p in ("grid_sp", "disp_hw", "grid_sp_adam", "mind_r", "mind_d"):
            self._int(p, 1)
        self._int("niter", 0)
        self._bool("ic")
        self._bool("use_mask")

    # -- features ------------------------------------------------------------------------------
    def _volumes(self, source: FeatureSource, fs: Sample, ms: Sample,
                 dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(1, C, H, W, D) feature volumes of both images and whether they are thin (2D)."""
        planar = fs.target is not None and fs.target.ndim == 2
        size = fs.images.shape[2:4]
        if ms.images.shape[1:4] != fs.images.shape[1:4]:
            raise ValueError(f"fixed {fs.case_id} {fs.images.shape[1:4]} and moving {ms.case_id} "
                             f"{ms.images.shape[1:4]} are not on one grid")
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        use_mind = "mind" in self.features and not (self.features == "dino+mind3d" and planar)
        if "dino" in self.features:
            a = torch.as_tensor(np.asarray(source.features(fs.case_id), dtype=np.float32), device=dev)
            b = torch.as_tensor(np.asarray(source.features(ms.case_id), dtype=np.float32), device=dev)
            pa, pb = pca_pair(a, b, min(int(self.n_components), a.shape[1]))
            vols = []
            for p in (pa, pb):  # (S, k, h, w) -> (1, k, S, H, W), unit length per voxel
                up = F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
                vols.append(F.normalize(up, dim=1).permute(1, 0, 2, 3).unsqueeze(0))
            parts.append((vols[0], vols[1]))
        if use_mind:
            imgs = [torch.as_tensor(s.images[0].astype(np.float32) / 255.0, device=dev) for s in (fs, ms)]
            mindssc = _convex_adam().MINDSSC
            if planar:  # MIND of the thin volume (through-plane neighbours repeat the image)
                mind = [mindssc(_thin(i[None, None], 3 * self.grid_sp), self.mind_r, self.mind_d, dev) for i in imgs]
                mind = [m[:, :, :, :, :1].permute(0, 1, 4, 2, 3) for m in mind]  # back to (1, 12, 1, H, W)
            else:
                mind = [mindssc(i[None, None], self.mind_r, self.mind_d, dev) for i in imgs]
            parts.append((mind[0], mind[1]))
        ff = torch.cat([p[0] for p in parts], dim=1).float()
        fm = torch.cat([p[1] for p in parts], dim=1).float()
        if self.use_mask:
            ff, fm = ff * self._mask(fs, dev), fm * self._mask(ms, dev)
        if planar:
            ff, fm = _thin(ff, 3 * self.grid_sp), _thin(fm, 3 * self.grid_sp)
        return ff, fm, planar

    @staticmethod
    def _mask(s: Sample, dev: torch.device) -> torch.Tensor:
        """Foreground of an image (non-zero pixels, holes filled, dilated by 2): (1, 1, S, H, W)."""
        fg = s.images[0] > 2
        fg = np.stack([ndimage.binary_dilation(ndimage.binary_fill_holes(z), iterations=2) for z in fg])
        return torch.as_tensor(fg, dtype=torch.float32, device=dev)[None, None]

    # -- registration --------------------------------------------------------------------------
    def _register(self, source: FeatureSource, pair: Pair) -> Registration:
        t0 = time.perf_counter()
        dev = torch.device(self.device_)
        fs, ms = source.sample(pair.fixed), source.sample(pair.moving)
        if fs.target is None or ms.target is None:
            raise ValueError(f"pair {pair.pair_id}: both frames need a segmentation to be evaluated")
        ff, fm, planar = self._volumes(source, fs, ms, dev)
        too_small = [n for n in ff.shape[2:] if n < 3 * self.grid_sp]
        if too_small:
            raise ValueError(f"pair {pair.pair_id}: image grid {tuple(ff.shape[2:])} is smaller than three times "
                             f"grid_sp={self.grid_sp} on some axis")
        with torch.no_grad():
            disp = convex_step(ff, fm, int(self.grid_sp), int(self.disp_hw), bool(self.ic), planar)
        t_convex = time.perf_counter() - t0
        if self.lambda_weight > 0 and self.niter > 0:
            with torch.enable_grad():
                disp = adam_step(ff, fm, disp, float(self.lambda_weight), int(self.grid_sp_adam),
                                 int(self.niter), planar)
        u = disp[0].detach().float().cpu().numpy()
        u = u[:2, :, :, 0] if planar else u
        moving_img = ms.images[0, 0] if planar else ms.images[0]
        return Registration(
            displacement=np.ascontiguousarray(u, dtype=np.float32),
            warped_target=warp_labels(ms.target, u),
            warped_image=warp_image(moving_img.astype(np.float32), u),
            info={"feature_channels": int(ff.shape[1]), "convex_s": t_convex,
                  "register_s": time.perf_counter() - t0, "planar": planar},
        )


@register_protocol
class MindConvexAdam(ConvexAdamReg):
    """The MIND + ConvexAdam baseline rows of Tables 15-16: the same head with `features: mind`
    (no encoder is run; the result is the same for every encoder and resolution of a grid)."""

    name: ClassVar[str] = "mind_convexadam"

    def __init__(self, features: str = "mind", n_components: int = 24, lambda_weight: float = 1.25,
                 grid_sp: int = 6, disp_hw: int = 4, niter: int = 80, grid_sp_adam: int = 2, ic: bool = True,
                 mind_r: int = 1, mind_d: int = 2, use_mask: bool = False, task: str = "registration",
                 seed: int = 0, device: str = "auto"):
        super().__init__(features, n_components, lambda_weight, grid_sp, disp_hw, niter, grid_sp_adam, ic,
                         mind_r, mind_d, use_mask, task, seed, device)
