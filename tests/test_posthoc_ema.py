"""Post-hoc EMA (issue 21; EDM2 section 3): the tracked power-function EMAs follow EDM2's closed-form profile,
the least-squares reconstruction over stored snapshots recovers tracked EMAs to float tolerance and matches its
own profile prediction exactly, snapshots are safetensors + JSON that survive saves, rotation and resume (a
resumed run continues the tracked EMAs bit for bit), bad arguments name themselves, and ``imagen-lib ema``
writes a loadable checkpoint, refuses to overwrite one, and sweeps lengths through the shapes judge."""

import warnings

import pytest
import torch
from ema_pytorch.post_hoc_ema import p_dot_p, sigma_rel_to_gamma
from tiny_cascade import tiny_cascade, tiny_config
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imagen_lib import checkpoint as ckpt
from imagen_lib.cascade import Cascade
from imagen_lib.checkpoint.files import looks_pickled
from imagen_lib.cli import entry_point, main
from imagen_lib.commands.eval_shapes import evaluate_cascade
from imagen_lib.config import trainer_settings
from imagen_lib.training import posthoc_ema as ph
from imagen_lib.training.posthoc_ema import PostHocEMASettings, PostHocTracker, reconstruct_ema, relative_error
from imagen_lib.training.settings import TrainerSettings
from imagen_lib.training.trainer import Trainer

SIGMAS = [0.05, 0.10, 0.08]


class Vector(nn.Module):
    """A "network" that is one parameter vector, set by hand at every step."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))


def _toy_checkpoint(path, trajectory, sigma_rels, snapshot_every):
    """Track ``sigma_rels`` over ``trajectory`` (one row per optimizer step) with snapshots; write a minimal
    checkpoint at ``path`` with the snapshots beside it; returns the tracker."""
    net = Vector(trajectory.shape[1])
    tracker = PostHocTracker(PostHocEMASettings(sigma_rels, snapshot_every), [net])
    ckpt.write_checkpoint(path, config={"stages": [{}]}, run_id="toy")
    for row in trajectory:
        net.weight.data.copy_(row)
        tracker.update(0)
        tracker.after_step(0, path, "toy")
    return tracker


def _profile_integrals(gamma, t, edges):
    """EDM2's profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) integrated between consecutive edges."""
    cdf = (edges / t) ** (gamma + 1)
    return cdf[1:] - cdf[:-1]


def _step_intervals(n):
    """The (start, end] of each optimizer step's weights in EDM2 time (see posthoc_ema's docstring)."""
    return torch.tensor([0.0, *range(2, n + 2)], dtype=torch.float64)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_the_tracked_ema_follows_edm2s_power_function_profile(sigma_rel):
    n = 40
    tracker = PostHocTracker(PostHocEMASettings([sigma_rel], 5), [Vector(n)])
    net = tracker.emas[0][0].model
    for s in range(n):  # weights e_s at step s: the EMA's component s is the weight the EMA gives step s
        net.weight.data.zero_()
        net.weight.data[s] = 1
        tracker.update(0)
    weights = tracker.emas[0][0].ema_model.weight.double()
    gamma = sigma_rel_to_gamma(sigma_rel)
    expected = _profile_integrals(gamma, n + 1, _step_intervals(n))
    assert torch.allclose(weights, expected, atol=1e-6) and abs(float(weights.sum()) - 1) < 1e-5
    # sigma_rel is the profile's standard deviation over t (EDM2 eq. 3)
    assert abs(((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 - sigma_rel) < 1e-9


def test_reconstruction_recovers_tracked_emas_and_matches_its_least_squares_profile(tmp_path):
    n, every = 60, 6
    path = tmp_path / "toy"
    tracker = _toy_checkpoint(path, torch.eye(n), SIGMAS, every)  # one-hot trajectory: weights = step weights
    assert [s.step for s in ph.list_snapshots(path) if s.sigma_rel == 0.05] == list(range(every, n + 1, every))
    for i, sigma in enumerate(SIGMAS):  # a tracked length is one of the snapshots: recovered to float tolerance
        direct = tracker.emas[0][i].ema_model.state_dict()
        assert relative_error(reconstruct_ema(path, sigma)[0], direct) < 1e-6
    rebuilt = reconstruct_ema(path, 0.08, from_sigma_rels=[0.05, 0.10])[0]["weight"].double()
    # the combination's step weights are exactly the integrals of the least-squares profile sum_i c_i p_i
    chosen = [s for s in ph.list_snapshots(path) if s.sigma_rel in (0.05, 0.10)]
    c = ph.snapshot_weights(chosen, 0.08, n)
    predicted = sum(ci * torch.cat([_profile_integrals(s.gamma, s.step + 1, _step_intervals(s.step)),
                                    torch.zeros(n - s.step, dtype=torch.float64)]) for ci, s in zip(c, chosen))
    assert torch.allclose(rebuilt, predicted, atol=1e-6)
    # ... and that profile is the least-squares match of the 0.08 profile: close to the directly tracked EMA
    assert relative_error({"weight": rebuilt}, tracker.emas[0][2].ema_model.state_dict()) < 0.05
    t = torch.tensor([s.step + 1.0 for s in chosen], dtype=torch.float64)
    g = torch.tensor([s.gamma for s in chosen], dtype=torch.float64)
    target = torch.tensor([n + 1.0], dtype=torch.float64), torch.tensor([sigma_rel_to_gamma(0.08)], dtype=torch.float64)
    residual = (p_dot_p(*target, *target) - 2 * c @ p_dot_p(t, g, *target) + c @ p_dot_p(t[:, None], g[:, None], t, g)
                @ c)
    assert float(residual) / float(p_dot_p(*target, *target)) < 1e-3
    # at an earlier step, only the snapshots up to it are used
    assert relative_error(reconstruct_ema(path, 0.05, step=30)[0],
                          ckpt.read_tensors(path / "posthoc_ema" / "stage0-step-0000030", "ema0")) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# the Trainer: snapshots in the checkpoint folder, saves, rotation, resume
# ---------------------------------------------------------------------------------------------------------


class Items(Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"images": torch.rand(3, 16, 16, generator=g) * 2 - 1,
                "text_embeds": torch.randn(3, 32, generator=g), "text_mask": torch.ones(3, dtype=bool)}


def _loader():
    return DataLoader(Items(), batch_size=4, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))


POSTHOC = {"sigma_rels": [0.05, 0.10], "snapshot_every": 2}


def _trainer(**settings):
    torch.manual_seed(0)
    return Trainer(tiny_cascade(seed=0), lr=1e-3, total_steps=8, ema_update_after_step=0, ema_update_every=1,
                   posthoc_ema=POSTHOC, **settings)


def _tracked(trainer):
    return [t.clone() for emas in trainer.posthoc_ema.emas for ema in emas
            for t in [*ema.ema_model.state_dict().values(), ema.step, ema.initted]]


def test_snapshots_are_safetensors_survive_rotation_and_resume_continues_the_tracked_emas_exactly(tmp_path):
    whole = _trainer()
    whole.fit(_loader(), 0, 8, out_dir=tmp_path / "whole", start_batch=None, disable_progress=True)
    first = _trainer(keep_last=1)
    first.fit(_loader(), 0, 5, out_dir=tmp_path / "run", save_every=1, start_batch=None, disable_progress=True)
    checkpoint = tmp_path / "run" / "checkpoint"
    snapshots = sorted(p.name for p in (checkpoint / "posthoc_ema").iterdir())
    assert snapshots == ["stage0-step-0000002", "stage0-step-0000004"]  # five saves with keep_last=1 kept them
    resumed = Trainer(tiny_cascade(seed=1), lr=1e-3, total_steps=8, ema_update_after_step=0, ema_update_every=1,
                      posthoc_ema=POSTHOC).load(checkpoint)
    for a, b in zip(_tracked(first), _tracked(resumed), strict=True):  # round trip
        assert torch.equal(a, b)
    resumed.fit(_loader(), 0, 3, out_dir=tmp_path / "run", start_batch=None, disable_progress=True)
    for a, b in zip(_tracked(whole), _tracked(resumed), strict=True):  # resume continues them exactly
        assert torch.equal(a, b)
    resumed.save(checkpoint, overwrite=True)
    for step in (2, 4, 6, 8):
        name = f"stage0-step-{step:07d}"
        for i in range(2):
            assert torch.equal(ckpt.read_tensors(checkpoint / "posthoc_ema" / name, f"ema{i}")["init_conv.weight"],
                               ckpt.read_tensors(tmp_path / "whole" / "checkpoint" / "posthoc_ema" / name,
                                                 f"ema{i}")["init_conv.weight"])
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors", ""} and all(p.name == "latest" for p in files
                                                                                if not p.suffix)
    assert not any(looks_pickled(p.read_bytes()[:4]) for p in files)
    version = ckpt.resolve(checkpoint)
    assert ckpt.has_file(version, "stage0.posthoc1.safetensors") and ckpt.has_file(version, "posthoc_ema.json")
    assert len(ph.list_snapshots(checkpoint, stage=0)) == 8 and not ph.list_snapshots(checkpoint, stage=1)


def test_an_interrupted_snapshot_and_another_runs_snapshots_are_not_used(tmp_path):
    trainer = _trainer()
    trainer.fit(_loader(), 0, 4, out_dir=tmp_path, save_every=4, start_batch=None, disable_progress=True)
    checkpoint = tmp_path / "checkpoint"
    killed = checkpoint / "posthoc_ema" / "stage0-step-0000006" / "v000001-0123abcd"  # no pointer: never committed
    killed.mkdir(parents=True)
    (killed / "ema0.safetensors").write_bytes(b"\x00" * 5)
    ckpt.write_checkpoint(checkpoint / "posthoc_ema" / "stage0-step-0000008", run_id="another run",
                          config={"format": ph.SNAPSHOT_FORMAT, "stage": 0, "step": 8, "sigma_rels": [0.05],
                                  "gammas": [sigma_rel_to_gamma(0.05)], "run_id": "another run"})
    assert [s.step for s in ph.list_snapshots(checkpoint)] == [2, 2, 4, 4]
    assert set(reconstruct_ema(checkpoint, 0.07)) == {0}


def test_bad_post_hoc_arguments_name_themselves(tmp_path):
    for value, message in [({"sigma_rels": [0.05, 0.5]}, r"posthoc_ema\.sigma_rels\[1\]: expected a finite number > 0"),
                           ({"sigma_rels": []}, r"posthoc_ema\.sigma_rels: expected a non-empty list"),
                           ({"sigma_rels": [0.1, 0.1]}, r"posthoc_ema\.sigma_rels: expected distinct"),
                           ({"snapshot_every": 0}, r"posthoc_ema\.snapshot_every: expected an int >= 1"),
                           ({"every": 3}, r"posthoc_ema: unknown keys \['every'\]"),
                           (0.05, r"posthoc_ema: expected None, a PostHocEMASettings or a dict")]:
        with pytest.raises((TypeError, ValueError), match=message):
            TrainerSettings(posthoc_ema=value)
    config = tiny_config()
    config["trainer"]["posthoc_ema"] = {"sigma_rels": [0.05, 0.1], "snapshot_every": 7}
    assert trainer_settings(config).posthoc_ema == PostHocEMASettings([0.05, 0.1], 7)
    config["trainer"]["posthoc_ema"] = {"snapshot_every": -1}
    with pytest.raises(ValueError, match="posthoc_ema.snapshot_every"):
        trainer_settings(config)
    trainer = _trainer()
    with pytest.raises(ValueError, match="out_dir: needed to write samples, checkpoints or post-hoc EMA snapshots"):
        trainer.fit(_loader(), 0, 2, disable_progress=True)
    trainer.fit(_loader(), 0, 2, out_dir=tmp_path, save_every=2, disable_progress=True)
    checkpoint = tmp_path / "checkpoint"
    for kwargs, message in [({"sigma_rel": 0.3}, "sigma_rel: expected a finite number > 0 and < 0.2886"),
                            ({"sigma_rel": 0.1, "step": 3}, r"step: expected an int >= 1 and <= 2, got 3"),
                            ({"sigma_rel": 0.1, "stages": [1]}, r"stages: stage 1 has no snapshots"),
                            ({"sigma_rel": 0.1, "from_sigma_rels": [0.2]},
                             r"from_sigma_rels: stage 0 has no snapshots of sigma_rel \[0.2\]")]:
        with pytest.raises(ValueError, match=message):
            reconstruct_ema(checkpoint, **kwargs)
    with pytest.raises(FileNotFoundError, match="has no post-hoc EMA snapshots"):
        reconstruct_ema(tmp_path / "nothing", 0.1)
    plain = Trainer(tiny_cascade(seed=0), lr=1e-3)
    plain.save(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=r"no post-hoc EMA snapshots \(posthoc_ema/\); train with"):
        reconstruct_ema(tmp_path / "plain", 0.1)
    with pytest.warns(UserWarning, match="holds no post-hoc EMA state; stage 0's EMAs start at its step 2"):
        _trainer().load(_saved_without_tracking(tmp_path))


def _saved_without_tracking(tmp_path):
    trainer = Trainer(tiny_cascade(seed=0), lr=1e-3)
    trainer.fit(_loader(), 0, 2, disable_progress=True)
    return trainer.save(tmp_path / "untracked")


def test_the_ema_command_writes_a_loadable_checkpoint_refuses_to_overwrite_and_sweeps(tmp_path, capsys):
    config = tiny_config(steps=4)
    config["trainer"].update(posthoc_ema={"sigma_rels": [0.05, 0.10], "snapshot_every": 2})
    from imagen_lib.config import build_cascade
    from imagen_lib.training.loop import train_stages

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(build_cascade(config), settings=trainer_settings(config), cpu=True)
        train_stages(trainer, config, tmp_path / "run", progress=False)
    checkpoint = str(tmp_path / "run" / "checkpoint")
    out = str(tmp_path / "ema08")
    assert main(["ema", checkpoint, "--sigma-rel", "0.08", "--out", out]) == 0
    loaded = Cascade.from_checkpoint(out)
    expected = reconstruct_ema(checkpoint, 0.08)
    assert set(expected) == {0, 1}
    for k in (0, 1):
        for key, value in loaded.stages[k].net.state_dict().items():
            assert torch.equal(value, expected[k][key]), key
    assert ckpt.read_json(out, "reconstruction")["sigma_rel"] == 0.08
    assert entry_point(["ema", checkpoint, "--sigma-rel", "0.1", "--out", out]) == 2
    assert "already holds a checkpoint; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["ema", checkpoint, "--sigma-rel", "0.1", "--out", out, "--overwrite"]) == 0
    assert entry_point(["ema", checkpoint, "--sigma-rel", "0.1"]) == 2
    assert "--out: needed with --sigma-rel" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["ema", checkpoint, "--sweep", "0.05", "0.12", "--n", "3", "--batch-size", "3",
                 "--json", str(tmp_path / "sweep.json")]) == 0
    table = capsys.readouterr().out
    assert "classic" in table and "sigma 0.05" in table and "sigma 0.12" in table and "all right" in table
    from imagen_lib.commands.ema import sweep

    base_rows = sweep(checkpoint, [0.05], n=3, batch_size=3, progress=False, stop_at_stage=0)
    cascade = Cascade.from_checkpoint(checkpoint)
    base_report, _, images = evaluate_cascade(cascade, 3, 0, batch_size=3, progress=False, stop_at_stage=0)
    assert images.shape[-1] == cascade.stages[0].image_size  # judged at the base's size
    assert base_rows[0]["ema"] == "classic" and base_rows[0]["accuracy"] == base_report["accuracy"]


def test_a_stage_trained_in_its_own_process_keeps_its_snapshots(tmp_path):
    import contextlib
    import io
    import json

    config = tiny_config(steps=4)
    config["parallel_stages"] = {"threads_per_stage": 1, "join_at_step": 2}
    config["trainer"].update(posthoc_ema={"sigma_rels": [0.05, 0.10], "snapshot_every": 2})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(tmp_path / "config.json"), "--out", str(tmp_path / "run"), "--no-progress",
                     "--cpu"]) == 0
    checkpoint = tmp_path / "run" / "checkpoint"
    snapshots = ph.list_snapshots(checkpoint)
    assert [(s.stage, s.step) for s in snapshots[::2]] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert len({s.run_id for s in snapshots}) == 2  # the background stage's process is another run
    assert set(reconstruct_ema(checkpoint, 0.07)) == {0, 1}
