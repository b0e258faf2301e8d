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
import sys
import torch
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


def test_two_processes_end_with_identical_weights_and_one_checkpoint(tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    tests_dir = Path(__file__).resolve().parent
    # tiny_cascade (tests/) and this tree's imagen_lib are found through PYTHONPATH
    paths = [str(tests_dir), str(tests_dir.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(script), str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "done 2" in run.stdout  # really two processes
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
