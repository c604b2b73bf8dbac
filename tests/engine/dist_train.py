"""Training run used by test_distributed.py: `python dist_train.py OUT BATCH [fsdp]`, single process or torchrun."""
import sys

import torch
from safetensors.torch import save_file

from intern2.engine import TrainConfig, Trainer
from intern2.tasks.image_cls import ImageClassificationTask, ImageClsConfig

out, batch, fsdp = sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "fsdp"
torch.set_num_threads(1)
cfg = ImageClsConfig(model="internimage_t", model_args=dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8],
                                                              drop_path_rate=0.0),
                     data="builtin:digits", img_size=32, hflip=0.0, label_smoothing=0.0,
                     train=TrainConfig(max_steps=3, batch_size=batch, lr=1e-3, freeze_bn=True, fsdp=fsdp,
                                       out_dir=out, device="cpu", log_every=1, checkpoint_every=3, seed=7))
trainer = Trainer(ImageClassificationTask(cfg), cfg.train)
trainer.fit()
if not fsdp:
    rank = trainer.dist.rank
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
