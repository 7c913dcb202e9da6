"""The latent prior: label fractions, the least-squares fit, the level shift, the prior file's checks,
`maisi-synth fit-prior` as a real process, and the sampler's one-time shift in the pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, save_nifti, torso_labels

from MaisiSynthLib import labels as L
from MaisiSynthLib.errors import ModelError
from MaisiSynthLib.latent_prior import (
    NUM_LABELS,
    PRIOR_FILE,
    LatentPrior,
    fit_latent_prior,
    label_fractions,
    level_shift,
    load_latent_prior,
    region_levels,
    save_latent_prior,
)
from MaisiSynthLib.models import load_models
from MaisiSynthLib.phantoms import write_phantoms
from MaisiSynthLib.pipeline import GenerateRequest, generate
from MaisiSynthLib.request import RequestError
from MaisiSynthLib.sampling import Conditioning, sample_latent, spacing_condition


def _blobs(shape=(16, 12, 8), seed=0) -> torch.Tensor:
    """Labels 0, 7 and 200 in smooth blobs (so latent voxels are pure and mixed), and 255 in one voxel."""
    g = torch.Generator().manual_seed(seed)
    field = F.avg_pool3d(torch.rand((1, 1, *shape), generator=g), 5, 1, 2)[0, 0]
    labels = torch.zeros(shape, dtype=torch.long)
    labels[field > field.median()] = 7
    labels[field > field.quantile(0.8)] = 200
    labels[0, 0, 0] = 255
    return labels


def test_label_fractions_are_the_block_means_of_the_one_hot_code():
    labels = _blobs()
    ids, fractions = label_fractions(labels, 4)
    assert ids.tolist() == [0, 7, 200, 255]
    expected = F.avg_pool3d(F.one_hot(labels, NUM_LABELS).permute(3, 0, 1, 2).float()[None], 4)[0][ids]
    assert torch.equal(fractions, expected)
    assert torch.allclose(fractions.sum(0), torch.ones(4, 3, 2))
    with pytest.raises(ValueError, match="multiples of 4"):
        label_fractions(labels[:15], 4)
    with pytest.raises(ValueError, match="0..255"):
        label_fractions(labels + 256, 4)


def test_the_fit_recovers_the_label_vectors_that_made_the_latents():
    truth = torch.zeros(NUM_LABELS, 3)
    truth[0], truth[7], truth[200], truth[255] = torch.tensor([[-1.0, 0, 0], [0.5, 2, 0], [3, -1, 1], [9, 9, 9]])

    def cases():
        for seed in range(4):
            labels = _blobs(seed=seed)
            ids, fractions = label_fractions(labels, 4)
            yield labels, torch.einsum("kc,kxyz->cxyz", truth[ids], fractions)

    prior = fit_latent_prior(cases(), 4)
    for label in (0, 7, 200, 255):
        assert torch.allclose(prior.label_means[label], truth[label], rtol=0.01, atol=1e-3), label
    assert (prior.label_weight > 0).nonzero()[:, 0].tolist() == [0, 7, 200, 255]
    assert prior.label_means[3].abs().sum() == 0  # never seen: no level


def test_the_level_shift_moves_each_region_to_the_prior_and_keeps_the_rest():
    labels = torch.zeros((16, 12, 8), dtype=torch.long)
    labels[8:] = 7
    labels[6:10, 4:8, 2:6] = 200  # mixed with both around it
    labels[0, 0, 0] = 255
    ids, fractions = label_fractions(labels, 4)
    means = torch.zeros(NUM_LABELS, 2)
    means[0], means[7], means[200] = torch.tensor([[1.0, -1.0], [4.0, 2.0], [-3.0, 0.5]])
    weight = torch.zeros(NUM_LABELS)
    weight[[0, 7, 200]] = 1.0  # 255 was never seen
    prior = LatentPrior(means, weight, 4)
    x0 = torch.randn((2, 4, 3, 2), generator=torch.Generator().manual_seed(2))
    before = region_levels(fractions, x0)
    moved = x0 + level_shift(prior, ids, fractions, x0, keep=(200,))
    after = region_levels(fractions, moved)
    assert torch.allclose(after[:2], means[[0, 7]], atol=1e-4)  # the regions' levels are the prior's
    assert torch.allclose(after[2:], before[2:], atol=1e-4)  # kept (a tumor) and unknown labels stay
    # what x0 holds inside a region beyond its level is unchanged: the shift is piecewise the same vector
    pure = fractions[1] == 1  # the blocks at x 12-15 hold label 7 only
    shift = (moved - x0)[:, pure]
    assert pure.sum() > 1 and torch.allclose(shift, shift[:, :1].expand_as(shift))


def test_the_prior_file_round_trips_and_anything_else_is_refused(tmp_path):
    prior = LatentPrior(torch.randn(NUM_LABELS, 4), torch.rand(NUM_LABELS), 4)
    path = tmp_path / PRIOR_FILE
    save_latent_prior(prior, path)
    assert [p.name for p in tmp_path.iterdir()] == [PRIOR_FILE]  # atomic: no temp file left
    back = load_latent_prior(path, 4, 4)
    assert torch.equal(back.label_means, prior.label_means) and torch.equal(back.label_weight, prior.label_weight)

    def refused(data, match, channels=4, compression=4):
        bad = tmp_path / "bad.pt"
        torch.save(data, bad)
        with pytest.raises(ModelError, match=match):
            load_latent_prior(bad, channels, compression)

    good = {"label_means": prior.label_means, "label_weight": prior.label_weight, "compression": 4, "format_version": 1}
    refused(good, r"\(256, 8\)", channels=8)
    refused(good, "compresses by 8", compression=8)
    refused({**good, "label_means": prior.label_means.int()}, "floating point")
    refused({**good, "label_weight": torch.full((NUM_LABELS,), float("nan"))}, "non-finite")
    refused([1, 2], "not a dict")
    refused({**good, "label_means": LatentPrior(None, None, 4)}, "needs pickle code execution")
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:1000])  # a torch file cut short
    with pytest.raises(ModelError, match="cannot read checkpoint bad.pt"):
        load_latent_prior(tmp_path / "bad.pt", 4, 4)


@pytest.fixture(scope="module")
def prior_model(tiny_model, tmp_path_factory):
    """The tiny model with a prior fitted by `maisi-synth fit-prior` (a real process) on 2 phantoms."""
    root = tmp_path_factory.mktemp("prior")
    folder = root / "model"
    shutil.copytree(tiny_model, folder)
    write_phantoms(root / "cases", 2, size=(64, 64, 32), spacing=(6.0, 6.0, 8.0), seed=3)
    result = run_cli("fit-prior", "--model-dir", str(folder), "--cases", str(root / "cases"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"wrote {folder / PRIOR_FILE}" in result.stdout and "from 2 cases" in result.stdout
    return folder


def test_fit_prior_writes_the_levels_of_the_labels_it_saw_and_refuses_bad_cases(prior_model, tmp_path):
    import nibabel as nib
    import numpy as np

    prior = load_latent_prior(prior_model / PRIOR_FILE, 4, 4)
    seen = set((prior.label_weight > 0).nonzero()[:, 0].tolist())
    assert {0, 1, 200} <= seen  # background, liver and body are in every phantom
    assert prior.label_means[1].abs().sum() > 0
    # a label map with an id the 8-bit code cannot hold: one line, exit 2, no prior written
    cases = tmp_path / "cases"
    cases.mkdir()
    labels = torso_labels(64).astype(np.int16)
    labels[0, 0, 0] = 300
    save_nifti(cases / "a_label.nii.gz", labels)
    save_nifti(cases / "a_image.nii.gz", np.zeros(labels.shape, dtype=np.float32))
    out = tmp_path / "p.pt"
    result = run_cli(
        "fit-prior", "--model-dir", str(prior_model), "--cases", str(cases), "--output", str(out), "--quiet"
    )
    assert result.returncode == 2 and "0..255" in result.stderr and "Fix:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    assert nib.load(cases / "a_label.nii.gz").shape == labels.shape  # the input is untouched


def test_fit_prior_fits_a_runs_cached_latents_when_given_and_refuses_a_foreign_cache(prior_model, tmp_path):
    """--latents fits the latents a run trained on (a refined cache) instead of encoding μ; a cache
    from another VAE, a missing case or a latent of the wrong shape is one line, exit 2, no prior."""
    from MaisiSynthLib.models import locate_model_folder
    from MaisiSynthLib.training.common import file_fingerprint

    cases = prior_model.parent / "cases"
    names = sorted(p.name[: -len("_image.nii.gz")] for p in cases.glob("*_image.nii.gz"))
    folder = tmp_path / "latents" / (file_fingerprint(locate_model_folder(prior_model).autoencoder_path) + "-refined-x")
    folder.mkdir(parents=True)
    for name in names:  # every latent voxel 0.5: the least-squares level of every label is 0.5 × scale
        torch.save(torch.full((4, 16, 16, 8), 0.5), folder / f"{name}.pt")
    out = tmp_path / "cached.pt"

    def fit(latents, output=out):
        args = ("--cases", str(cases), "--latents", str(latents), "--output", str(output), "--quiet")
        return run_cli("fit-prior", "--model-dir", str(prior_model), *args)

    result = fit(folder)
    assert result.returncode == 0, result.stderr
    prior = load_latent_prior(out, 4, 4)
    scale = float(load_models(prior_model, "cpu").scale_factor)
    seen = prior.label_weight > 0
    assert (prior.label_means[seen] - 0.5 * scale).abs().max() < 1e-3  # (the fit's ridge: ~1e-6)
    encoded = load_latent_prior(prior_model / PRIOR_FILE, 4, 4)  # fitted to μ: not constant
    assert encoded.label_means[seen].std() > 0.01
    # another VAE's cache (the folder name carries the encoding VAE's fingerprint)
    other = tmp_path / "latents" / "0123456789ab-refined-x"
    shutil.copytree(folder, other)
    bad_out = tmp_path / "bad.pt"
    for latents, match in (
        (other, "not encoded by this model's VAE"),
        (folder, f"no latent for case {names[0]}"),
        (folder, "not a tensor of shape [4, 16, 16, 8]"),
    ):
        if match.startswith("no latent"):
            (folder / f"{names[0]}.pt").rename(tmp_path / "kept.pt")
        elif match.startswith("not a tensor"):
            (tmp_path / "kept.pt").rename(folder / f"{names[0]}.pt")
            torch.save(torch.zeros(4, 8, 8, 8), folder / f"{names[-1]}.pt")
        result = fit(latents, bad_out)
        assert result.returncode == 2 and match in result.stderr and "Fix:" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not bad_out.exists()


def test_the_sampler_shifts_once_at_the_first_timestep_below_the_threshold(prior_model):
    models = load_models(prior_model, "cpu")
    labels = torch.from_numpy(torso_labels(64).astype("int64"))[None, None]
    from MaisiSynthLib.masks import binary_code

    calls, steps = [], []

    def no_shift(x0):
        calls.append(x0.clone())
        return torch.zeros_like(x0)

    shape = models.latent_shape((64, 64, 64))

    def run(level_prior, prior_from=1.0):
        cond = Conditioning(binary_code(labels), spacing_condition((3.0, 3.0, 3.0)), torch.tensor([1]))
        cond.level_prior, cond.prior_from = level_prior, prior_from
        return sample_latent(models, cond, shape, seed=4, num_steps=6, callback=lambda info: steps.append(info))

    plain = run(None)
    steps.clear()
    # a zero shift must leave the trajectory bit for bit, with every step reported once, in order
    assert torch.equal(run(no_shift, 0.5), plain)
    assert [s["i"] for s in steps] == list(range(6)) and {s["total"] for s in steps} == {6}
    assert len(calls) == 1 and calls[0].shape == shape
    first_below = next(s["t"] for s in steps if s["t"] <= 500)
    assert steps[[s["t"] for s in steps].index(first_below)]["i"] > 0  # not at the first step
    # a real shift moves the latent
    assert not torch.equal(run(lambda x0: torch.ones_like(x0), 0.5), plain)


def test_the_bone_shift_comes_after_the_first_and_moves_bone_labels_only(prior_model):
    from MaisiSynthLib.masks import binary_code
    from MaisiSynthLib.pipeline import _level_prior

    models = load_models(prior_model, "cpu")
    labels = torch.from_numpy(torso_labels(64).astype("int64"))
    labels[28:36, 12:20, 8:40] = 33  # a vertebral column (bone) next to the organs
    labels[28:30, 12:14, 22:26] = L.BONE_LESION  # a lesion in the column, an eighth of two latent voxels
    shape = models.latent_shape((64, 64, 64))
    steps, calls = [], []

    def no_shift(name):
        def shift(x0):
            calls.append((name, len(steps)))  # how many steps were taken when it was called
            return torch.zeros_like(x0)

        return shift

    def run(level_prior, bone_prior, prior_from=0.5, bone_from=0.3):
        cond = Conditioning(binary_code(labels[None, None]), spacing_condition((3.0, 3.0, 3.0)), torch.tensor([1]))
        cond.level_prior, cond.prior_from = level_prior, prior_from
        cond.bone_prior, cond.bone_prior_from = bone_prior, bone_from
        return sample_latent(models, cond, shape, seed=4, num_steps=8, callback=lambda info: steps.append(info))

    plain = run(None, None)
    t = [s["t"] for s in steps]
    steps.clear()
    # two zero shifts: the same trajectory, every step reported once, the bone shift strictly later
    assert torch.equal(run(no_shift("all"), no_shift("bone")), plain)
    assert [s["i"] for s in steps] == list(range(8))
    first, later = next(i for i, v in enumerate(t) if v <= 500), next(i for i, v in enumerate(t) if v <= 300)
    assert first < later and calls == [("all", first), ("bone", later)]
    # a threshold above the first shift's takes the next timestep; no bone shift without the prior
    calls.clear()
    steps.clear()
    run(no_shift("all"), no_shift("bone"), bone_from=0.9)
    assert calls == [("all", first), ("bone", first + 1)]
    calls.clear()
    steps.clear()
    assert torch.equal(run(None, no_shift("bone")), plain) and calls == []

    # the bone-only shift: zero on every latent voxel without bone and on those holding a lesion voxel,
    # the full shift's value on those with bone only (tumors and other labels stay where they are)
    every, bone = _level_prior(models, labels)
    x0 = torch.randn(shape)
    from MaisiSynthLib.latent_prior import label_fractions

    ids, fractions = label_fractions(labels, models.compression)
    bone_share = fractions[ids == 33][0]
    lesion_share = fractions[ids == L.BONE_LESION][0]
    moved = bone(x0)[0]
    assert moved.abs().amax(0)[bone_share == 0].max() == 0
    assert ((bone_share > 0) & (lesion_share > 0)).sum() == 2  # mostly bone, with part of the lesion
    assert moved.abs().amax(0)[lesion_share > 0].max() == 0
    assert moved.abs().amax(0)[(bone_share > 0) & (lesion_share == 0)].min() > 0
    assert every(x0)[0].abs().amax(0)[lesion_share > 0].min() > 0  # the first shift does move them
    pure = bone_share == 1
    assert pure.any() and torch.allclose(moved[:, pure], every(x0)[0][:, pure], atol=1e-5)


def test_latent_prior_from_comes_from_the_model_unless_the_request_sets_it(prior_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(prior_model, folder)
    mask = save_nifti(tmp_path / "mask.nii.gz", torso_labels(64))

    def run(name, **kw):
        return generate(
            GenerateRequest(mask=mask, output=tmp_path / name, model_dir=folder, steps=4, **kw), keep_latent=True
        )

    off = run("a.nii.gz")  # the tiny model's settings leave it off
    on = run("b.nii.gz", latent_prior_from=0.6)
    assert off.latent_prior_from == 1.0 and on.latent_prior_from == 0.6
    assert not torch.equal(off.latent, on.latent)
    assert run("c.nii.gz", controlnet=False, latent_prior_from=0.6).latent_prior_from == 1.0  # no mask code

    settings_path = folder / "maisi_synth.json"
    settings = json.loads(settings_path.read_text()) if settings_path.exists() else {}
    settings.setdefault("inference", {})["latent_prior_from"] = 0.6
    settings_path.write_text(json.dumps(settings))
    default, explicit_off = run("d.nii.gz"), run("e.nii.gz", latent_prior_from=1.0)
    assert torch.equal(default.latent, on.latent) and torch.equal(explicit_off.latent, off.latent)

    for bad in (0, 1.5, "0.6", True):
        with pytest.raises(RequestError, match="latent_prior_from"):
            run("f.nii.gz", latent_prior_from=bad)

    # the bone-only second shift is a model setting, used only with the prior on
    settings["inference"]["latent_prior_bone_from"] = 0.3
    settings_path.write_text(json.dumps(settings))
    assert torch.equal(run("h.nii.gz", latent_prior_from=1.0).latent, off.latent)
    for bad in (1, -0.1, "0.3", True):
        settings["inference"]["latent_prior_bone_from"] = bad
        settings_path.write_text(json.dumps(settings))
        with pytest.raises(ModelError, match="latent_prior_bone_from") as refused:
            run("f.nii.gz")
        assert "maisi_synth.json" in refused.value.one_line()
    settings["inference"]["latent_prior_bone_from"] = 0.3
    settings_path.write_text(json.dumps(settings))
    (folder / PRIOR_FILE).unlink()
    with pytest.raises(ModelError, match="has no latent_prior.pt") as refused:
        run("g.nii.gz")
    assert "maisi-synth fit-prior" in refused.value.one_line()
    assert not (tmp_path / "f.nii.gz").exists() and not (tmp_path / "g.nii.gz").exists()
