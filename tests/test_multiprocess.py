"""``accelerate launch --multi_gpu --num_processes 2`` on the CPU (Accelerate's ``--cpu`` flag alone starts a
single process unless MPI is installed; ``--multi_gpu`` starts two through torchrun, and the Trainer joins
them on the CPU with the gloo backend when there is no GPU): a short training run on two processes ends with identical
weights on both and exactly one checkpoint, written by the main process only (no deadlock on save)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from imagen_lib.checkpoint import resolve

SCRIPT = r'''
import atexit
import sys
import torch

# registered before the Trainer's own exit handler, so it runs after it (atexit is last in, first out)
atexit.register(lambda: print("group alive at exit:", torch.distributed.is_initialized(), flush=True))
from safetensors.torch import save_file

from tiny_cascade import images, tiny_cascade
from imagen_lib.training.trainer import Trainer

out = sys.argv[1]
import os
rank = int(os.environ["RANK"])
torch.manual_seed(100 + rank)  # different initial weights and noise per rank: DDP must reconcile them
cascade = tiny_cascade(text_embed_dim=8, seed=100 + rank)
# no cpu=True: on a machine without a GPU the Trainer must still join the two processes
trainer = Trainer(cascade, lr=1e-2, max_batch_size=2, ema_update_after_step=0, ema_update_every=1)
assert trainer.accelerator.process_index == rank
for step in range(3):
    batch = {"images": images(3, 16, seed=10 * rank + step), "text_embeds": torch.randn(3, 4, 8)}
    trainer.train_step(step % 2, batch)
trainer.save(out + "/checkpoint")
trainer.save(out + "/checkpoint")  # saving again from the same run is allowed, and still one folder
weights = {f"net.{k}": v for k, v in cascade.state_dict().items()}
weights.update({f"ema1.{k}": v for k, v in trainer.stages[1].ema.ema_model.state_dict().items()})
save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}/rank{rank}.safetensors")
print("rank", rank, "done", trainer.accelerator.num_processes, flush=True)
'''


def _launch(script: Path, out: Path, port: int) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 script out`` on the CPU (gloo); fails the test with the
    output's tail when a process fails."""
    tests_dir = Path(__file__).resolve().parent
    # tiny_cascade (tests/) and this tree's imagen_lib are found through PYTHONPATH
    paths = [str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_two_processes_end_with_identical_weights_and_one_checkpoint(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    run = _launch(script, tmp_path, port=29517)
    assert "done 2" in run.stdout  # really two processes
    # the Trainer ended the process group itself: exiting with a gloo group alive can abort a finished run
    assert run.stdout.count("group alive at exit: False") == 2, run.stdout
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == ["checkpoint"]  # one checkpoint, no temporary or stale copies
    committed = Path(resolve(tmp_path / "checkpoint"))
    saved = load_file(committed / "stage1.safetensors")
    assert all(torch.equal(saved[k], a[f"net.nets.1.{k}"]) for k in saved)
    assert json.loads((committed / "trainer.json").read_text())["steps"] == [2, 1]


# --- gradient accumulation across two processes ----------------------------------------------------------

ACCUMULATION_SCRIPT = r'''
import json, os, sys
import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accumulation_common import micro_batches, seeded_forward
from tiny_cascade import tiny_cascade
from imagen_lib.training.trainer import Trainer

out = sys.argv[1]
rank = int(os.environ["RANK"])
trainer = Trainer(tiny_cascade(text_embed_dim=8, seed=7), lr=1e-2, eps=1e-3, gradient_accumulation_steps=2,
                  ema_update_after_step=0, ema_update_every=1, ema_beta=0.5)
order = [(rank, i) for i in range(4)]  # this process's half of each step: micro-batches (rank, 0..3)
forwards = seeded_forward(trainer.cascade, order)  # forward k draws its noise from (rank, k)'s seed
fired = []  # the micro-batch during whose backward an all-reduce ran


def counting_hook(state, bucket):
    fired.append(forwards[0] - 1)
    return allreduce_hook(None, bucket)


trainer.stages[0].wrapper.register_comm_hook(None, counting_hook)
trainer.fit(micro_batches(order), stage=0, steps=2, disable_progress=True)
if rank == 0:
    save_file({k: v.contiguous() for k, v in trainer.cascade.stages[0].net.state_dict().items()},
              out + "/ddp.safetensors")
    save_file({k: v.contiguous() for k, v in trainer.stages[0].ema.ema_model.state_dict().items()},
              out + "/ddp_ema.safetensors")
json.dump({"fired": fired, "steps": trainer.steps}, open(f"{out}/rank{rank}.json", "w"))
print("rank", rank, "done", trainer.accelerator.num_processes, flush=True)
'''

ACCUMULATION_COMMON = r'''
import torch
from tiny_cascade import images


def micro_batches(order):
    """The micro-batch of each (rank, index): its own images and text embeddings."""
    out = []
    for rank, i in order:
        g = torch.Generator().manual_seed(50 + 10 * rank + i)
        out.append({"images": images(2, 16, seed=10 * rank + i), "text_embeds": torch.randn(2, 4, 8, generator=g)})
    return out


def seeded_forward(cascade, order):
    """Before the cascade's k-th forward, seed torch with the seed of micro-batch order[k] (noise, timesteps and
    condition dropout then depend on the micro-batch alone, whichever process draws them). Returns [count]."""
    count = [0]

    def pre_hook(module, args, kwargs):
        rank, i = order[count[0]]
        torch.manual_seed(1000 + 100 * rank + i)
        count[0] += 1
    cascade.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return count
'''


def test_accumulation_across_two_processes_equals_one_process_and_skips_inner_all_reduces(tmp_path):
    """gradient_accumulation_steps=2 on 2 processes (each step: 2 micro-batches per process) gives the update of
    one process accumulating all 4 micro-batches of the step (float tolerance), and the gradients are all-reduced
    only in the last micro-batch's backward (no_sync on the first)."""
    (tmp_path / "accumulation_common.py").write_text(ACCUMULATION_COMMON)
    script = tmp_path / "accumulate_two.py"
    script.write_text(ACCUMULATION_SCRIPT)
    run = _launch(script, tmp_path, port=29518)
    assert "done 2" in run.stdout
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["steps"] == [2, 0]
        assert record["fired"] and set(record["fired"]) == {1, 3}, record["fired"]  # last micro-batch of each step
    # the same two steps in one process: all four micro-batches of each step accumulated here
    sys.path.insert(0, str(tmp_path))
    try:
        from accumulation_common import micro_batches, seeded_forward
    finally:
        sys.path.remove(str(tmp_path))
    from tiny_cascade import tiny_cascade

    from imagen_lib.training.trainer import Trainer

    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    # AdamW's eps raised on both sides: AdamW's first steps move each weight by about lr * sign(gradient), so at
    # eps=1e-8 a near-zero gradient turns summation-order rounding (one process's sum against an all-reduce of
    # two) into 1e-3 differences; with eps=1e-3 the same runs agree to 1e-8
    trainer = Trainer(tiny_cascade(text_embed_dim=8, seed=7), lr=1e-2, eps=1e-3, gradient_accumulation_steps=4,
                      cpu=True, ema_update_after_step=0, ema_update_every=1, ema_beta=0.5)
    seeded_forward(trainer.cascade, order)
    trainer.fit(micro_batches(order), stage=0, steps=2, disable_progress=True)
    assert trainer.steps == [2, 0]
    for name, mine in (("ddp", trainer.cascade.stages[0].net), ("ddp_ema", trainer.stages[0].ema.ema_model)):
        theirs = load_file(tmp_path / f"{name}.safetensors")
        for key, value in mine.state_dict().items():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
