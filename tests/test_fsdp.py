"""FSDP 2 through Accelerate (imagen_lib.training.sharding), on two CPU processes with gloo.

torch's ``fully_shard`` runs on the CPU with gloo, but Accelerate turns ``distributed_type: FSDP`` on only for GPU
distributed types (on the CPU it stays MULTI_CPU, data parallel). The two-process script therefore sets the
accelerator's state to FSDP 2 by hand (:func:`force_fsdp`, test only); from there every line is the GPU one:
``Accelerator.prepare(net, optimizer)``, ``fully_shard`` per block, the sharded EMA, the collective gathers. The
test checks that training under FSDP computes what data parallel computes (same batches, float tolerance), that
its checkpoint loads into a plain Cascade bit-identically to the sharded weights (EMA included), and that a
resumed FSDP trainer holds exactly the saved weights, EMA and optimizer state and trains on.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_cascade import tiny_cascade, tiny_encoder_folder

from imagen_lib.cascade import Cascade
from imagen_lib.training import sharding
from imagen_lib.training.trainer import Trainer, TrainerSettings

SCRIPT = r'''
import os, sys
import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from tiny_cascade import images, tiny_cascade
from imagen_lib.text import T5TextEncoder
from imagen_lib.training import sharding
from imagen_lib.training.trainer import Trainer

out, mode, t5 = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])


def force_fsdp(accelerator):
    """Accelerate keeps a CPU run data parallel; FSDP 2 set by hand (what distributed_type: FSDP sets on GPUs)."""
    accelerator.state.fsdp_plugin = sharding.fsdp_plugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def whole(module):
    """Every tensor of a (possibly sharded) module, whole (DTensor.full_tensor: a gather of its own)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


def batch(step):
    return {"images": images(2, 16, seed=10 * step + rank), "texts": ["a red circle", "a blue square"]}  # this half


accelerator = Accelerator(cpu=True)
if mode != "ddp":
    force_fsdp(accelerator)
torch.manual_seed(0)
# AdamW's eps raised: its first steps move a weight by about lr * sign(gradient), which turns the rounding of other
# reduction orders (reduce-scatter per chunk against one all-reduce) into 1e-3 differences at eps=1e-8
trainer = Trainer(tiny_cascade(T5TextEncoder(t5, max_length=16)), lr=1e-2, eps=1e-3, accelerator=accelerator,
                  ema_update_after_step=0, ema_update_every=1, ema_beta=0.5, max_batch_size=1)  # 2 chunks a batch
assert trainer.sharded == (mode != "ddp")
if mode == "resume":
    trainer.load(out + "/checkpoint")
    nets = {f"stage{k}": whole(s.net) for k, s in enumerate(trainer.cascade.stages)}
    nets.update({f"stage{k}.ema": whole(s.ema.ema_model) for k, s in enumerate(trainer.stages)})
    optim = [sharding.optimizer_state(s.net, st.optimizer, True)
             for s, st in zip(trainer.cascade.stages, trainer.stages)]
    if rank == 0:
        save_file({f"{n}/{k}": v.contiguous() for n, sd in nets.items() for k, v in sd.items()},
                  out + "/resumed.safetensors")
        save_file({f"opt{k}/{i}/{name}": t for k, o in enumerate(optim) for i, s in o["state"].items()
                   for name, t in s.items()}, out + "/resumed_opt.safetensors")
    loss = trainer.train_step(1, batch(9))
    trainer.save(out + "/checkpoint")
    print("rank", rank, "resumed", trainer.steps, loss, flush=True)
    sys.exit(0)
torch.manual_seed(1 + rank)  # the same model everywhere, each process its own noise
for step in range(4):
    trainer.train_step(step % 2, batch(step))
nets = {f"stage{k}": whole(s.net) for k, s in enumerate(trainer.cascade.stages)}
nets.update({f"stage{k}.ema": whole(s.ema.ema_model) for k, s in enumerate(trainer.stages)})
trainer.save(out + "/checkpoint")
grid = trainer.write_samples(out + "/samples.png", ["a red circle"], seed=0)  # every process samples under FSDP
if rank == 0:
    save_file({f"{n}/{k}": v.contiguous() for n, sd in nets.items() for k, v in sd.items()}, out + "/live.safetensors")
print("rank", rank, mode, "done", trainer.accelerator.num_processes, grid, flush=True)
'''


def _launch(tmp_path: Path, out: Path, mode: str, port: int) -> str:
    script, t5 = tmp_path / "fsdp_two.py", tmp_path / "t5"
    script.write_text(SCRIPT)
    if not t5.exists():
        tiny_encoder_folder(t5)  # once, before the processes start (each would race to build its own)
    tests_dir = Path(__file__).resolve().parent
    paths = [str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), str(out), mode, str(t5)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return run.stdout


def test_fsdp_trains_like_ddp_saves_a_plain_checkpoint_and_resumes(tmp_path):
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    fsdp.mkdir()
    ddp.mkdir()
    assert "fsdp done 2" in _launch(tmp_path, fsdp, "fsdp", 29527)
    assert "ddp done 2" in _launch(tmp_path, ddp, "ddp", 29528)
    assert (fsdp / "samples.png").is_file()
    live = load_file(fsdp / "live.safetensors")
    # the FSDP checkpoint loads into a plain, unsharded Cascade: exactly the sharded weights, EMA and raw
    for use_ema, suffix in ((True, ".ema"), (False, "")):
        plain = Cascade.from_checkpoint(fsdp / "checkpoint", use_ema=use_ema, load_text_encoder=False)
        for k, stage in enumerate(plain.stages):
            for name, value in stage.net.state_dict().items():
                assert torch.equal(value, live[f"stage{k}{suffix}/{name}"]), (k, suffix, name)
    # FSDP computes what data parallel computes on the same global batches (float tolerance: other reductions)
    reference = load_file(ddp / "live.safetensors")
    assert reference.keys() == live.keys()
    for name in live:
        torch.testing.assert_close(live[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
    # resume under FSDP: the same weights, EMA and optimizer state, then it trains and saves on
    out = _launch(tmp_path, fsdp, "resume", 29529)
    assert "resumed [2, 3]" in out
    resumed = load_file(fsdp / "resumed.safetensors")
    assert resumed.keys() == live.keys() and all(torch.equal(resumed[k], live[k]) for k in live)
    first = sorted((fsdp / "checkpoint").glob("v*/trainer.safetensors"))[0]  # the version resumed from
    saved = load_file(first)
    opt = load_file(fsdp / "resumed_opt.safetensors")
    for key, value in opt.items():  # opt{k}/{index}/{name} -> opt{k}.state.{index}.{name} in trainer.safetensors
        stage, index, name = key.split("/")
        assert torch.equal(value, saved[f"{stage}.state.{index}.{name}"]), key


# --- what runs in one process ----------------------------------------------------------------------------


def test_fsdp_setting_is_checked_and_warns_when_it_cannot_shard():
    with pytest.raises(TypeError, match="fsdp: expected True or False"):
        TrainerSettings(fsdp="yes")
    with pytest.warns(UserWarning, match="fsdp: ignored: Accelerate shards only over several GPUs"):
        trainer = Trainer(tiny_cascade(text_embed_dim=8), cpu=True, fsdp=True)
    assert trainer.sharded is False and trainer.settings.config["fsdp"] is True


def test_fsdp_plugin_is_version_2_with_whole_tensor_checkpoints():
    plugin = sharding.fsdp_plugin(activation_checkpointing=True)
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing
    assert plugin.reshard_after_forward is True
    assert list(plugin.transformer_cls_names_to_wrap) == list(sharding.WRAP_CLASSES)
    from imagen_lib.nn import attention, layers  # the wrapped classes exist under these names

    assert hasattr(layers, "ResBlock") and hasattr(attention, "AttentionBlock")


class _Acc:
    def __init__(self, kind, version=2):
        from accelerate.utils import DistributedType

        self.distributed_type = getattr(DistributedType, kind)
        self.state = type("S", (), {"fsdp_plugin": type("P", (), {"fsdp_version": version})()})()


def test_unsupported_sharding_set_ups_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="DeepSpeed is not supported.*FSDP 2"):
        sharding.is_sharded(_Acc("DEEPSPEED"))
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        sharding.is_sharded(_Acc("FSDP", version=1))
    with pytest.raises(ValueError, match="text_encoder.trainable: a trainable text encoder cannot be sharded"):
        sharding.is_sharded(_Acc("FSDP"), train_text=True)
    assert sharding.is_sharded(_Acc("FSDP")) and not sharding.is_sharded(_Acc("MULTI_CPU"))


def test_unsharded_state_paths_are_the_plain_ones():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert sharding.full_state_dict(net, False).keys() == net.state_dict().keys()
    state = sharding.optimizer_state(net, opt, False)
    assert state["state"].keys() == {0, 1}
    fresh = torch.optim.AdamW(net.parameters())
    sharding.load_optimizer_state(net, fresh, state, False)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert sharding.whole(None) is None and torch.equal(sharding.whole(torch.ones(())), torch.ones(()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.check_finite_weights(None, {"stage0": net.state_dict()}, "x", None, False)
    bad = {"w": torch.tensor([float("nan")])}
    from imagen_lib.training.nonfinite import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="stage0.safetensors would hold NaN"):
        sharding.check_finite_weights(None, {"stage0": bad}, "x", None, False)
