"""VAE training on random patches: L1 reconstruction + KL, optional perceptual and adversarial terms.

The loss follows the official MAISI VAE recipe (L1, KL weight 1e-6; perceptual and patch-adversarial
terms as options). The posterior sample z = μ + σ·ε takes ε from (seed, step, position in the global
batch) rather than the global RNG, so a torchrun job and a single process see the same samples.

Two additions for small models:
- region weights: the L1 term can weight bone and lesion voxels (`bone_weight`, `tumor_weight`, from
  the case's label map; with `region_ring`, dilated by one voxel so their edges count too). Thin bone
  and small lesions are a few percent of a volume; unweighted, a small VAE blurs them away first.
- whole volumes: `patch_size: null` trains on whole cases (batches by shape), which is how the
  decoder sees them at inference; GroupNorm statistics of a patch and of a whole volume differ.
- encoder only (`encoder_only`): the decoder stays as it is, so the full model's images do not move
  while the encoder learns to give latents that decoder draws more faithfully.
- latent anchor (`anchor_weight`, with a base VAE): an L1 between μ and the base encoder's μ of the
  same input, on the latent voxels away from lesions (`anchor_margin` latent voxels around them). A
  lesion is a few hundred of a million voxels, so an L1 that weights it enough to move its latent
  would otherwise also move everything else the diffusion stages learnt; the anchor lets the lesion's
  latent move and holds the rest where it was.
- lesion patches (`lesion_patch_share`): that share of the patches is cut around a random lesion
  voxel of the case, so each step carries a lesion's gradient. Measured on the demo VAE's encoder
  with the anchor: it broke the whole-volume reconstruction (the encoder's GroupNorms normalise a
  patch by its own statistics; TRAINING.md), so use it where patches are what is decoded.
- sampled latents (`sampled_latents_from`, decoder only): part of the steps decode the latent the full
  model samples from the case's mask instead of the case's own, against the case's image
  (training.sampled says why).
The log records the posterior's mean σ and the spread of μ: their ratio says how much of a latent
sample is noise, which is what the diffusion stages would have to learn if they trained on samples.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import labels as L
from ..errors import OptionError
from ..models import (
    AUTOENCODER_FILE,
    build_network,
    compression_of,
    load_autoencoder_weights,
    save_autoencoder,
)
from .common import complete_model_folder, find_weight, unwrap, without_splits
from .config import network_config
from .data import BucketSampler, crop_patch, generator, load_cases, origin_around, patch_origin
from .trainer import Stage


class _VaeStep(torch.nn.Module):
    """Encode → sample with the given ε → decode, in one forward (DistributedDataParallel syncs one)."""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor, eps: torch.Tensor, z_fixed: torch.Tensor | None = None, fixed=None):
        """`z_fixed` replaces the posterior sample of the batch items where `fixed` is true."""
        z_mu, z_sigma = self.autoencoder.encode(x)
        z = z_mu + z_sigma * eps.to(z_mu.dtype)
        if z_fixed is not None:
            z = torch.where(fixed.view(-1, *([1] * (z.ndim - 1))), z_fixed.to(z.dtype), z)
        return self.autoencoder.decode(z), z_mu, z_sigma


def window_l1(
    recon: torch.Tensor, x: torch.Tensor, windows, weights: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Σ weight · L1 between the two images seen through HU windows [(lo, hi, weight), ...].

    Images are scaled to [0, 1] over [-1000, 1000] HU, so 50 HU of soft-tissue contrast is 2.5 % of
    the range and an L1 on that scale barely sees it; through a [-200, 200] window it is 12.5 %.
    Outside its window a term saturates and adds nothing. With `weights` (the region weights of the
    plain L1), each term is the weighted mean instead, so a lesion counts in its window as much as
    in the plain term.
    """
    if not windows:
        return None
    total = None
    for lo, hi, weight in windows:
        a, b = (lo + 1000.0) / 2000.0, (hi + 1000.0) / 2000.0  # the window in [0, 1] image units
        diff = (torch.clamp((recon - a) / (b - a), 0, 1) - torch.clamp((x - a) / (b - a), 0, 1)).abs()
        term = diff.mean() if weights is None else (diff * weights).sum() / weights.sum()
        total = float(weight) * term if total is None else total + float(weight) * term
    return total


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over latent voxels, averaged over the batch (MONAI/official form)."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1)
    return kl.sum(dim=tuple(range(1, kl.ndim))).mean()


class VaeStage(Stage):
    name = "vae"

    def prepare(self) -> None:
        self.network = network_config(self.config)
        c = compression_of(self.network)
        self.patch = None if self.cfg["patch_size"] is None else tuple(int(p) for p in self.cfg["patch_size"])
        if self.patch is not None and (len(self.patch) != 3 or any(p <= 0 or p % c for p in self.patch)):
            raise OptionError(
                f"vae.patch_size {list(self.patch)} must be three positive multiples of {c}",
                f"e.g. --set vae.patch_size=[{4 * c},{4 * c},{4 * c}] (or null for whole volumes)",
            )
        self.cases = load_cases(self.config["cases"], 1 if self.patch else c)
        self.global_batch = int(self.cfg["batch_size"]) * self.ctx.world_size
        # Patches are cut per sample, so every case fits every batch: one bucket. Whole volumes
        # stack only with others of their shape.
        shapes = [(0,)] * len(self.cases) if self.patch else [case.shape for case in self.cases]
        self.sampler = BucketSampler(shapes, self.global_batch, int(self.config["seed"]))
        self.region_ids = {
            "bone": torch.tensor(L.BONE_REGION),
            "tumor": torch.tensor(L.TUMORS),
        }
        share = self.cfg["lesion_patch_share"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise OptionError(f"vae.lesion_patch_share is {share!r}", "give a share in [0, 1], e.g. 0.8")
        if share > 0 and self.patch is None:
            raise OptionError(
                "vae.lesion_patch_share cuts patches around lesions, so it needs vae.patch_size",
                "set vae.patch_size, e.g. --set vae.patch_size=[64,64,32]",
            )
        self.lesion_share = float(share)
        # (n, 3) lesion voxel coordinates per case, for the patches cut around one
        self.lesion_voxels = [
            torch.nonzero(torch.isin(case.labels[0], self.region_ids["tumor"])) if share > 0 else None
            for case in self.cases
        ]
        autoencoder = build_network(self.network, "autoencoder_def", "cpu")
        base = find_weight(self.config["base_model_dir"], AUTOENCODER_FILE)
        if base is not None:  # fine-tune from an existing VAE
            load_autoencoder_weights(autoencoder, base)
        if self.cfg["decoder_only"]:
            if base is None:
                raise OptionError(
                    "vae.decoder_only needs an existing VAE to keep the encoder of",
                    "set base_model_dir to a model folder with autoencoder_v1.pt",
                )
            # GroupNorm statistics depend on the input size, so a decoder trained on patches draws a
            # whole volume with an intensity offset; tuning the decoder alone fixes that without
            # moving the latents.
            for name in ("encoder", "quant_conv_mu", "quant_conv_log_sigma"):
                getattr(autoencoder, name).requires_grad_(False)
        if self.cfg["encoder_only"]:
            if self.cfg["decoder_only"] or base is None:
                raise OptionError(
                    "vae.encoder_only needs an existing VAE whose decoder it keeps, and excludes vae.decoder_only",
                    "set base_model_dir to a model folder with autoencoder_v1.pt and vae.decoder_only=false",
                )
            # The decoder is what the diffusion stages' samples are drawn through at inference; with it
            # fixed, a better encoder finds latents the decoder can already draw (a small lesion's edge)
            # and nothing the full model generates changes.
            for name in ("decoder", "post_quant_conv"):
                getattr(autoencoder, name).requires_grad_(False)
        self.anchor = None
        if float(self.cfg["anchor_weight"]) > 0:
            margin = self.cfg["anchor_margin"]
            if base is None or isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
                raise OptionError(
                    "vae.anchor_weight holds μ near an existing VAE's, so it needs that VAE and an "
                    f"integer vae.anchor_margin >= 0 (got {margin!r})",
                    "set base_model_dir to a model folder with autoencoder_v1.pt, e.g. vae.anchor_margin=1",
                )
            # A frozen copy of the starting encoder: its μ of each batch is where the latent stays.
            # Only encode() is called on it, so the decoder half is dropped (half the VAE's memory).
            self.anchor = copy.deepcopy(autoencoder).requires_grad_(False).eval()
            self.anchor.decoder = self.anchor.post_quant_conv = None
            self.anchor.to(self.device)
        self.sampled = None
        if self.cfg["sampled_latents_from"] is not None:
            self.sampled = self._sampled_latents(c)
        self.step_module = _VaeStep(without_splits(autoencoder))
        self.perceptual = None
        if float(self.cfg["perceptual_weight"]) > 0:
            self.perceptual = _perceptual_loss().to(self.device)
        self.discriminator = None
        if float(self.cfg["adversarial_weight"]) > 0:
            from monai.losses.adversarial_loss import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            torch.manual_seed(int(self.config["seed"]))
            disc = PatchDiscriminator(
                spatial_dims=3, num_layers_d=3, channels=32, in_channels=1, out_channels=1, norm="INSTANCE"
            )
            self.discriminator = disc.to(self.device)
            self.disc_model = self.ctx.wrap(self.discriminator)
            self.disc_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=float(self.cfg["discriminator_lr"])
            )
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
        self._fake: torch.Tensor | None = None
        self._real: torch.Tensor | None = None
        if self.ctx.is_main:
            complete_model_folder(self.config, self.network, keeps_encoder=bool(self.cfg["decoder_only"]))

    def _sampled_latents(self, compression: int) -> list[torch.Tensor]:
        from .sampled import sampled_latents

        source, fraction = self.cfg["sampled_latents_from"], self.cfg["sampled_fraction"]
        if not isinstance(source, str):
            raise OptionError(f"vae.sampled_latents_from is {source!r}", "give a model folder path (or null)")
        if not self.cfg["decoder_only"] or self.patch is not None:
            raise OptionError(
                "vae.sampled_latents_from trains the decoder on latents of the model's latent space, "
                "so it needs vae.decoder_only=true and whole volumes",
                "add --set vae.decoder_only=true --set vae.patch_size=null",
            )
        if isinstance(fraction, bool) or not 0.0 < float(fraction) <= 1.0:
            raise OptionError(f"vae.sampled_fraction is {fraction!r}", "give a share in (0, 1], e.g. 0.5")
        channels = int(self.network.get("latent_channels", 4))
        return sampled_latents(self.config, self.ctx, self.cases, channels, compression)

    def trainable(self) -> torch.nn.Module:
        return self.step_module

    def batch(self, step: int):
        """(images, posterior ε, L1 weights, sampled latents or None, which items use them, lesion
        masks) of this process's slice of step `step`."""
        seed = int(self.config["seed"])
        per_rank = int(self.cfg["batch_size"])
        patches, eps, weights, fixed, lesions = [], [], [], [], []
        c = compression_of(self.network)
        latent_channels = int(self.network.get("latent_channels", 4))
        local = self.sampler.local(step, self.ctx.rank, per_rank)
        self.last_batch = [(pos, self.cases[i].name) for pos, i in local]
        for pos, index in local:
            g = generator(seed, step, pos, 0xA7C4)
            case = self.cases[index]
            patch = self.patch or case.shape
            origin = patch_origin(case.shape, patch, g)
            if self.lesion_share > 0 and len(self.lesion_voxels[index]):
                # its own stream, so a run without lesion patches draws everything else alike
                h = generator(seed, step, pos, 0x1E51)
                if float(torch.rand((), generator=h)) < self.lesion_share:
                    voxels = self.lesion_voxels[index]
                    centre = voxels[int(torch.randint(len(voxels), (1,), generator=h))].tolist()
                    origin = origin_around(case.shape, patch, centre, h)
            patches.append(crop_patch(case.image, origin, patch, fill=0.0))
            eps.append(torch.randn((latent_channels, *(p // c for p in patch)), generator=g))
            labels = crop_patch(case.labels, origin, patch, fill=0)
            weights.append(self.region_weights(labels))
            lesions.append(torch.isin(labels, self.region_ids["tumor"]))
            if self.sampled is not None:  # its own stream: the draws above stay those of a run without
                draw = torch.rand((), generator=generator(seed, step, pos, 0x5A3D))
                fixed.append(bool(draw < float(self.cfg["sampled_fraction"])))
        z_fixed = use = None
        if self.sampled is not None:
            z_fixed = torch.stack([self.sampled[i] for _, i in local]).to(self.device)
            use = torch.tensor(fixed, device=self.device)
        return (
            torch.stack(patches).to(self.device),
            torch.stack(eps).to(self.device),
            torch.stack(weights).to(self.device),
            z_fixed,
            use,
            torch.stack(lesions).to(self.device),
        )

    def region_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """1 everywhere, `bone_weight` / `tumor_weight` on bone / lesion voxels and (with `region_ring`)
        the voxel around them.

        With the ring, an edge counts the same on both sides, so a voxel whose class the latent leaves
        uncertain still goes to the L1 median of what it could be (mostly the tissue around a thin
        bone or small lesion). Without it, the weighted median tips such a voxel towards bone/lesion."""
        weights = torch.ones(labels.shape, dtype=torch.float32)
        for region in ("bone", "tumor"):
            w = float(self.cfg[f"{region}_weight"])
            if w != 1.0:
                inside = torch.isin(labels, self.region_ids[region])
                if self.cfg["region_ring"]:
                    inside = F.max_pool3d(inside.float()[None], kernel_size=3, stride=1, padding=1)[0] > 0
                weights[inside] = torch.clamp(weights[inside], min=w)
        return weights

    def loss(self, model: torch.nn.Module, step: int):
        x, eps, weights, z_fixed, use, lesions = self.batch(step)
        eps = eps * float(self.cfg["posterior_noise"])
        recon, z_mu, z_sigma = model(x, eps, z_fixed, use)
        l1 = ((recon.float() - x).abs() * weights).sum() / weights.sum()
        kl = kl_loss(z_mu, z_sigma)
        loss = l1 + float(self.cfg["kl_weight"]) * kl
        windowed = window_l1(recon.float(), x, self.cfg["windows"], weights if self.cfg["weighted_windows"] else None)
        if windowed is not None:
            loss = loss + windowed
        metrics = {
            "l1": float(l1.detach()),
            "windowed_l1": float(windowed.detach()) if windowed is not None else 0.0,
            "kl": float(kl.detach()),
            # the posterior's noise next to its signal: σ̄ / std(μ) is the noise share of a sample
            "sigma_mean": float(z_sigma.detach().float().mean()),
            "mu_std": float(z_mu.detach().float().std()),
        }
        if self.anchor is not None:
            anchor = self.anchor_term(x, z_mu, lesions)
            loss = loss + float(self.cfg["anchor_weight"]) * anchor
            metrics["anchor"] = float(anchor.detach())
        if use is not None:
            metrics["sampled"] = float(use.float().mean())
        if self.perceptual is not None:
            perceptual = self.perceptual(recon.float(), x)
            loss = loss + float(self.cfg["perceptual_weight"]) * perceptual
            metrics["perceptual"] = float(perceptual.detach())
        if self.discriminator is not None and step >= int(self.cfg["adversarial_start"]):
            self.discriminator.requires_grad_(False)
            logits = self.disc_model(recon.float().contiguous())[-1]
            generator_loss = self.adv_loss(logits, target_is_real=True, for_discriminator=False)
            loss = loss + float(self.cfg["adversarial_weight"]) * generator_loss
            metrics["adversarial"] = float(generator_loss.detach())
            self._fake, self._real = recon.detach().float(), x
        return loss, metrics

    def anchor_term(self, x: torch.Tensor, z_mu: torch.Tensor, lesions: torch.Tensor) -> torch.Tensor:
        """Mean |μ − μ_base| over the latent voxels more than `anchor_margin` voxels from any lesion."""
        with torch.no_grad():
            base_mu, _ = self.anchor.encode(x)
            near = F.adaptive_max_pool3d(lesions.float(), tuple(z_mu.shape[2:]))  # (B, 1, *latent)
            m = int(self.cfg["anchor_margin"])
            if m:
                near = F.max_pool3d(near, kernel_size=2 * m + 1, stride=1, padding=m)
            keep = (1.0 - near).expand_as(z_mu)
        diff = (z_mu.float() - base_mu.float()).abs() * keep
        return diff.sum() / keep.sum().clamp(min=1.0)

    def after_step(self, step: int) -> None:
        if self._fake is None:
            return
        self.discriminator.requires_grad_(True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        fake = self.disc_model(self._fake.contiguous())[-1]
        real = self.disc_model(self._real.contiguous())[-1]
        d_loss = 0.5 * (
            self.adv_loss(fake, target_is_real=False, for_discriminator=True)
            + self.adv_loss(real, target_is_real=True, for_discriminator=True)
        )
        d_loss.backward()
        self.disc_optimizer.step()
        self._fake = self._real = None

    def save(self, module: torch.nn.Module, step: int, loss: float) -> None:
        model_dir = Path(self.config["model_dir"])
        model_dir.mkdir(parents=True, exist_ok=True)
        save_autoencoder(model_dir / AUTOENCODER_FILE, unwrap(module).autoencoder)

    def extra_state(self) -> dict:
        if self.discriminator is None:
            return {}
        return {
            "discriminator": self.discriminator.state_dict(),
            "discriminator_optimizer": self.disc_optimizer.state_dict(),
        }

    def load_extra_state(self, state: dict) -> None:
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_optimizer.load_state_dict(state["discriminator_optimizer"])


def _perceptual_loss() -> torch.nn.Module:
    """MONAI's 2.5-D perceptual loss; its backbone weights are a download, so say so when missing."""
    try:
        from monai.losses.perceptual import PerceptualLoss

        return PerceptualLoss(spatial_dims=3, network_type="squeeze", is_fake_3d=True, fake_3d_ratio=0.2).eval()
    except Exception as exc:  # noqa: BLE001 - any failure means the pretrained backbone is unavailable
        raise OptionError(
            f"the perceptual loss needs pretrained backbone weights that could not be loaded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
            "install lpips/torchvision with network access, or keep vae.perceptual_weight=0",
        ) from None
